"""Easy consistency tuning (CT started from a DPM) of the quickstart DPM, in minutes on a CPU."""
from configs import consistency_recipe, quickstart


def get_config():
  config = consistency_recipe.easy_consistency_tuning(quickstart.get_config())
  config.init_from = 'workdir/quickstart'
  config.consistency.ect_stage_updates = 150  # six stages: the pair gap halves five times
  return consistency_recipe.quickstart_budget(config)
