"""The paper's adversarial-training settings, shared by every *_at config."""
from atdiff_jax.adversarial import REFERENCE_STEP_PER_PIXEL


def apply_free_at(config):
  """Free (efficient) AT: K=3 passes, L2 ball of radius 0.1 per dimension, alpha=0.1,
  delta_detach target, ADM's loss-second-moment timestep sampler (method.md section 2).
  For a consistency objective, the ball and the scheme are the same; its pairs, not a
  timestep sampler, set which times are trained."""
  config.adv.method = 'free'
  config.adv.norm = 'l2'
  config.adv.steps = 3
  config.adv.step_size = 0.1
  config.adv.step_size_scale = 'absolute'
  config.adv.radius = 0.1
  config.adv.radius_scale = 'per_dim'
  config.adv.init = 'zero'
  config.adv.target = 'delta_detach'
  if config.get('objective', 'dpm') == 'dpm':
    config.training.timestep_sampler = 'loss_second_moment'
  return config


def paper_strength_per_pixel(config, multiple=1.0):
  """The ascent step at `multiple` times the paper's per-pixel strength, on any image shape
  (on CIFAR-10, multiple 1 is the reference's absolute 0.1 up to float rounding)."""
  config.adv.step_size = multiple * REFERENCE_STEP_PER_PIXEL
  config.adv.step_size_scale = 'per_dim'
  return config
