"""Diffusion and consistency samplers as pure, jittable functions, selected by name.

Each sampler has the signature
  sample(model_fn, rng, shape, betas, num_steps, *, y=None, eps_scale=1.0, clip_x0=..., **opts)
and returns x0 samples of `shape`; see `common` for the model function's contract.
For the probes, every sampler also takes `perturb_fn` (common.PerturbFn: replaces the
state before each model call) and `return_trajectory` (then it returns (x0,
common.Trajectory): each step's time, noise level, model input and eps).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh

from atdiff_jax import parallel
from atdiff_jax.samplers import common
from atdiff_jax.samplers.ancestral import sample_ancestral
from atdiff_jax.samplers.common import PerturbFn, Trajectory
from atdiff_jax.samplers.consistency import sample_consistency
from atdiff_jax.samplers.ddim import sample_ddim
from atdiff_jax.samplers.dpm_solver import sample_dpm_solver_pp
from atdiff_jax.samplers.respace import space_timesteps

SAMPLERS: dict[str, Callable[..., jax.Array]] = {
    'ancestral': sample_ancestral,
    'ddim': sample_ddim,
    'dpm_solver++': sample_dpm_solver_pp,
    'consistency': sample_consistency,
}



def get_sampler(name: str) -> Callable[..., jax.Array]:
  """The sampler registered under `name`."""
  try:
    return SAMPLERS[name]
  except KeyError:
    raise ValueError(f'Unknown sampler {name!r}; allowed: {", ".join(SAMPLERS)}.') from None


def make_sample_fn(model_fn: Callable[..., jax.Array],
                   sampler_name: str,
                   betas,
                   num_steps: int,
                   shape: Sequence[int],
                   mesh: Mesh | None = None,
                   **opts: Any) -> Callable[..., jax.Array]:
  """A jitted `sample(rng, y=None, *model_args) -> x0` for one sampler configuration.

  `model_args` (e.g. the parameters) are passed on as model_fn(x, t, y, *model_args), so
  that they are inputs of the compiled function rather than constants baked into it.
  With a mesh, the batch is sharded over its 'data' axis: noise is drawn on the global
  shape, so samples equal those of a single device for the same rng.
  """
  sampler = get_sampler(sampler_name)
  if 'sharding' in opts:
    raise ValueError('pass a mesh instead of a sharding.')
  if 'y' in opts:
    raise ValueError('labels are an argument of the returned function, not an option.')
  try:  # unknown options fail now, in the user's words, not inside the first trace
    inspect.signature(sampler).bind(model_fn, None, shape, betas, num_steps, **opts)
  except TypeError as e:
    raise TypeError(f'invalid options for sampler {sampler_name!r}: {e}') from None
  shape = common.check_shape(shape)
  betas = common.as_betas(betas)
  common.check_num_steps(num_steps)
  sharding = None
  if mesh is not None:
    num_shards = parallel.num_shards(mesh)
    if shape[0] % num_shards:
      raise ValueError(f'batch size {shape[0]} is not divisible by the {num_shards} devices '
                       f"of the mesh axis '{parallel.AXIS}'.")
    sharding = parallel.batch_sharding(mesh)

  def sample(rng: jax.Array, y: jax.Array | None = None, *model_args: Any) -> jax.Array:
    if y is not None:
      y = common.constrain(common.check_labels(y, shape[0]), sharding)
    bound = model_fn if not model_args else (
        lambda x, t, labels: model_fn(x, t, labels, *model_args))
    return sampler(bound, rng, shape, betas, num_steps, y=y, sharding=sharding, **opts)

  if sharding is None or opts.get('return_trajectory'):
    return jax.jit(sample)
  return jax.jit(sample, out_shardings=sharding)


__all__ = [
    'PerturbFn',
    'SAMPLERS',
    'Trajectory',
    'get_sampler',
    'make_sample_fn',
    'sample_ancestral',
    'sample_consistency',
    'sample_ddim',
    'sample_dpm_solver_pp',
    'space_timesteps',
]
