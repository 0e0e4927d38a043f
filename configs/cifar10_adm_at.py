"""The paper's AT recipe: fine-tune a standard CIFAR-10 ADM checkpoint with free L2 AT.

Set the checkpoint to start from: --config.init_from=WORKDIR_OF_A_CIFAR10_ADM_RUN
"""
from configs import cifar10_adm


def get_config():
  config = cifar10_adm.get_config()
  config.adv.method = 'free'
  config.adv.norm = 'l2'
  config.adv.steps = 3
  config.adv.step_size = 0.1
  config.adv.radius = 0.1
  config.adv.radius_scale = 'per_dim'
  config.adv.init = 'zero'
  config.adv.target = 'delta_detach'
  config.training.timestep_sampler = 'loss_second_moment'
  config.training.num_steps = 100_000
  return config
