"""cifar10_ct with the paper's free AT on the student's input, at the same update budget."""
from configs import at_recipe, cifar10_ct


def get_config():
  config = at_recipe.apply_free_at(cifar10_ct.get_config())
  config.training.num_steps = cifar10_ct.get_config().training.num_steps // config.adv.steps
  return config
