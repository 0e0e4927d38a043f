"""The paper's AT recipe: fine-tune a standard CIFAR-10 ADM checkpoint with free L2 AT.

Set the checkpoint to start from: --config.init_from=WORKDIR_OF_A_CIFAR10_ADM_RUN
"""
from configs import at_recipe, cifar10_adm


def get_config():
  config = at_recipe.apply_free_at(cifar10_adm.get_config())
  config.training.num_steps = 100_000
  return config
