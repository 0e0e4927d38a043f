"""ADM on CIFAR-10 32x32, unconditional (the paper's base model)."""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'cifar10'
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = True

  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (16, 8)
  config.model.num_head_channels = 32
  config.model.dropout = 0.3
  config.model.learn_sigma = True
  config.model.resblock_updown = True
  config.model.use_scale_shift_norm = True
  config.model.dtype = 'bfloat16'

  config.diffusion.num_timesteps = 1000
  config.diffusion.schedule = 'cosine'

  config.training.batch_size = 128
  config.training.num_steps = 250_000
  config.training.lr = 1e-4
  config.training.ema_rates = (0.9999,)
  config.training.log_every = 100
  config.training.checkpoint_every = 5_000
  config.training.sample_every = 10_000
  config.training.sample_steps = 250
  return config
