"""Test setup: 8 simulated CPU devices, configured before JAX initialises a backend."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (must follow the environment set-up above)

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

from configs import default  # noqa: E402


def tiny_config():
  """The smallest model that still has every kind of block: tests stay fast on 2 cores."""
  config = default.get_config()
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.num_head_channels = 16
  config.diffusion.num_timesteps = 100
  config.training.batch_size = 16
  config.training.num_steps = 4
  config.training.lr = 1e-3
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  config.training.sample_every = 0
  config.training.sample_steps = 5
  config.training.num_samples = 8
  return config


@pytest.fixture
def config():
  return tiny_config()
