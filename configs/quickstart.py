"""A few minutes on a laptop CPU: the embedded 8x8 digits and a tiny U-Net."""
from configs import default


def get_config():
  config = default.get_config()
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.diffusion.num_timesteps = 1000
  config.training.batch_size = 64
  config.training.num_steps = 1500
  config.training.lr = 5e-4
  config.training.ema_rates = (0.995,)
  config.training.log_every = 100
  config.training.checkpoint_every = 500
  config.training.sample_every = 1500
  config.training.sample_steps = 100
  return config
