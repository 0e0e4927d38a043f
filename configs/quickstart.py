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
  # Most pixels of the digits sit at the range's ends: without x0 clipping DPM-Solver++'s
  # samples stall at fd_digits ~32 for any NFE; with it they reach ~15 by NFE 10.
  config.eval.sampler_options.dpm_solver_pp.clip_x0 = True
  return config
