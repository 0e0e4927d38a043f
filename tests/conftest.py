"""Test setup: 8 simulated CPU devices, configured before JAX initialises a backend."""
import contextlib
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# Test programs are tiny and compile-bound: cheaper LLVM passes halve the suite's time.
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402  (must follow the environment set-up above)

jax.config.update("jax_num_cpu_devices", 8)
# Tests build the same programs many times (a fresh closure per train() call); the
# persistent cache turns every repeat compile into a lookup.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="atdiff_xla_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import flax.linen as nn  # noqa: E402
import numpy as np  # noqa: E402
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


def assert_trees_equal(a, b, **tol):
  """Same structure and leaves: bitwise, or within `tol` (assert_allclose's rtol / atol)."""
  a, b = jax.device_get(a), jax.device_get(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if tol:
      np.testing.assert_allclose(x, y, **tol)
    else:
      np.testing.assert_array_equal(x, y)


class ToyDenoiser(nn.Module):
  """A two-conv stand-in for the U-Net with its call signature: it compiles in about a
  second, so step-level tests can afford many variants. Its output depends on x, t and y."""
  out_channels: int = 2

  @nn.compact
  def __call__(self, x, t, y=None, *, train=False):
    h = nn.silu(nn.Conv(8, (3, 3))(x) * (1.0 + t[:, None, None, None] / 100.0))
    if y is not None:
      h = h + nn.Embed(10, 8)(y)[:, None, None, :]
    return nn.Conv(self.out_channels, (3, 3))(h)


@contextlib.contextmanager
def no_compiles(kind: str = 'compile'):
  """Asserts that the block compiles nothing: no JAX event whose name holds `kind`
  ('compile': tracing and lowering too; 'backend_compile': XLA compiles only)."""
  events = []
  listener = lambda event, *_, **__: events.append(event) if kind in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not events, events
