"""Free L2 AT fine-tuning of the ImageNet 64x64 ADM (--config.init_from=WORKDIR)."""
from configs import at_recipe, imagenet64_adm


def get_config():
  config = at_recipe.apply_free_at(imagenet64_adm.get_config())
  config.training.num_steps = 100_000
  return config
