"""ADM on ImageNet 64x64, class-conditional (the model ADM-ES starts from)."""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'imagenet_resized/64x64'
  config.data.image_size = 64
  config.data.channels = 3
  config.data.random_flip = True

  config.model.ch = 192
  config.model.ch_mult = (1, 2, 3, 4)
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (32, 16, 8)
  config.model.num_head_channels = 64
  config.model.dropout = 0.1
  config.model.learn_sigma = True
  config.model.num_classes = 1000
  config.model.resblock_updown = True
  config.model.use_scale_shift_norm = True
  config.model.dtype = 'bfloat16'

  config.diffusion.num_timesteps = 1000
  config.diffusion.schedule = 'cosine'

  config.training.batch_size = 2048
  config.training.num_steps = 540_000
  config.training.lr = 1e-4
  config.training.ema_rates = (0.9999,)
  config.training.log_every = 100
  config.training.checkpoint_every = 5_000
  config.training.sample_every = 10_000
  config.training.sample_steps = 250
  return config
