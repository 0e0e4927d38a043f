"""Free L2 AT fine-tuning of the ImageNet 64x64 ADM (--config.init_from=WORKDIR)."""
from configs import imagenet64_adm


def get_config():
  config = imagenet64_adm.get_config()
  config.adv.method = 'free'
  config.adv.norm = 'l2'
  config.adv.steps = 3
  config.adv.step_size = 0.1
  config.adv.radius = 0.1
  config.adv.radius_scale = 'per_dim'
  config.adv.target = 'delta_detach'
  config.training.timestep_sampler = 'loss_second_moment'
  config.training.num_steps = 100_000
  return config
