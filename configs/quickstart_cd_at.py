"""quickstart_cd with free AT on the student's input: the same number of optimizer updates
(K = 3 updates per minibatch, a third of the minibatches) and one teacher step per minibatch."""
from configs import at_recipe, quickstart_cd


def get_config():
  config = at_recipe.apply_free_at(quickstart_cd.get_config())
  # The paper's strength per pixel (its absolute 0.1 would be ~7x stronger on 8x8 digits).
  at_recipe.paper_strength_per_pixel(config)
  config.training.num_steps = 300
  config.training.log_every = 50
  config.training.checkpoint_every = 100
  config.training.sample_every = 300
  return config
