"""Consistency distillation of the class-conditional ImageNet 64x64 ADM (the run in
runs/imagenet64_adm, or --config.teacher=WORKDIR); CM's ImageNet-64 CD settings: 40 Karras
points, batch 2048, lr 8e-6."""
from configs import consistency_recipe, imagenet64_adm


def get_config():
  config = consistency_recipe.distillation(imagenet64_adm.get_config(),
                                            teacher='runs/imagenet64_adm')
  config.consistency.num_points = 40
  config.training.num_steps = 600_000
  config.training.lr = 8e-6
  return config
