"""The quickstart with the paper's efficient (free) adversarial training."""
from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.adv.method = 'free'
  config.adv.norm = 'l2'
  config.adv.steps = 3
  config.adv.step_size = 0.1
  config.adv.radius = 0.1
  config.adv.target = 'delta_detach'
  config.training.timestep_sampler = 'loss_second_moment'
  # Free AT makes K optimizer updates per minibatch: a third of the minibatches keeps the
  # number of updates (and the cost) equal to the standard quickstart.
  config.training.num_steps = 500
  config.training.log_every = 50
  config.training.checkpoint_every = 250
  config.training.sample_every = 500
  return config
