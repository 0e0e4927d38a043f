"""Consistency distillation of the quickstart DPM (workdir/quickstart) in minutes on a CPU."""
from configs import consistency_recipe, quickstart


def get_config():
  config = consistency_recipe.distillation(quickstart.get_config(), teacher='workdir/quickstart')
  config.consistency.num_points = 10  # fewer, longer teacher steps: quicker to distil
  return consistency_recipe.quickstart_budget(config)
