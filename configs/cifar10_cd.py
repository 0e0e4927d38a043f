"""Consistency distillation of a CIFAR-10 ADM: the run in runs/adm (configs/cifar10_adm.py),
or --config.teacher=WORKDIR.

CM's CIFAR-10 CD budget: batch 512, 800k updates at lr 4e-4, 18 Karras points, mu = 0.
"""
from configs import cifar10_adm, consistency_recipe


def get_config():
  config = consistency_recipe.distillation(cifar10_adm.get_config(), teacher='runs/adm')
  config.model.dropout = 0.0  # the student regresses onto deterministic teacher steps
  config.training.batch_size = 512
  config.training.num_steps = 800_000
  config.training.lr = 4e-4
  config.training.ema_rates = (0.9999,)
  return config
