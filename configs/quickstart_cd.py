"""Consistency distillation of the quickstart DPM (workdir/quickstart) in minutes on a CPU."""
from configs import consistency_recipe, quickstart


def get_config():
  config = consistency_recipe.distillation(quickstart.get_config(), teacher='workdir/quickstart')
  config.consistency.num_points = 10  # fewer, longer teacher steps: quicker to distil
  config.training.num_steps = 900
  config.training.lr = 2e-4
  config.training.log_every = 100
  config.training.checkpoint_every = 300
  config.training.sample_every = 900
  config.eval.num_samples = 512
  config.probe.num_samples = 512
  return config
