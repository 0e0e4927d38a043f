"""Pieces every sampler shares: calling the model, eps scaling, x0 clipping, noise, sharding.

A model function has the signature `model_fn(x, t, y) -> output`: `x` is NHWC float32,
`t` a float32 vector (B,) of timesteps on the ORIGINAL diffusion's scale (0..T-1, possibly
fractional), `y` int32 labels (B,) or None. The output has C channels (eps) or 2C channels
(eps, v) for learned-sigma models, where v in [-1, 1] interpolates the log variance.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding

ModelFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


class StepContext(NamedTuple):
  """What a perturb_fn knows of the step it acts on."""
  step: jax.Array   # scan step (0 = the first model call)
  t: jax.Array      # (B,) model time on the original scale
  alpha: jax.Array  # sqrt(abar) of that time: x_t ~ N(alpha x0, sigma^2 I) in training
  sigma: jax.Array  # sqrt(1 - abar)
  key: jax.Array    # a key of this step's own, for the perturbation's randomness


# perturb_fn(model_fn, x, y, ctx) -> x': replaces the sampler's state x before the model call
# of step ctx.step. model_fn is the model the sampler calls (parameters bound), so an
# adversary can attack it. For the robustness probe.
PerturbFn = Callable[[ModelFn, jax.Array, jax.Array | None, StepContext], jax.Array]
# Folded into a sampler's rng for perturbation keys; leaves the sampler's own noise as it is.
_PERTURB_STREAM = 0x5EED


class Trajectory(NamedTuple):
  """What the model saw at each of a sampler's N steps, in the order they were taken.

  x_t at step i is meant to follow q(x_t | x0) = N(alpha[i] x0, sigma[i]^2 I).
  """
  t: jax.Array      # (N,) model time on the original scale
  alpha: jax.Array  # (N,) sqrt(abar) of that time
  sigma: jax.Array  # (N,) sqrt(1 - abar)
  x: jax.Array      # (N, B, H, W, C) the model's input (after any perturb_fn)
  eps: jax.Array    # (N, B, H, W, C) the model's eps, after eps scaling


def as_betas(betas) -> np.ndarray:
  """Validates a concrete beta schedule and returns it as float64."""
  if isinstance(betas, jax.core.Tracer):
    raise TypeError('betas must be a concrete (numpy) array; samplers precompute their '
                    'per-step constants on the host.')
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 2:
    raise ValueError(f'betas must be a 1-D array with at least 2 entries, got shape {betas.shape}.')
  if not (np.all(betas > 0) and np.all(betas <= 1)):
    raise ValueError('betas must lie in (0, 1].')
  return betas


def check_shape(shape: Sequence[int]) -> tuple[int, ...]:
  """Returns `shape` as a tuple of ints after checking it is NHWC."""
  shape = tuple(int(d) for d in shape)
  if len(shape) != 4 or min(shape) < 1:
    raise ValueError(f'shape must be (batch, height, width, channels), got {shape}.')
  return shape


def check_num_steps(num_steps: int, num_timesteps: int | None = None) -> int:
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f'num_steps must be a positive integer, got {num_steps!r}.')
  if num_timesteps is not None and num_steps > num_timesteps:
    raise ValueError(f'num_steps={num_steps} exceeds the {num_timesteps} diffusion timesteps.')
  return int(num_steps)


def check_labels(y: jax.Array | None, batch: int) -> jax.Array | None:
  if y is None:
    return None
  if y.shape != (batch,):
    raise ValueError(f'labels must have shape ({batch},), got {y.shape}.')
  return y


def split_model_output(output: jax.Array, channels: int) -> tuple[jax.Array, jax.Array | None]:
  """Splits a model output into (eps, v); v is None for eps-only models."""
  output = output.astype(jnp.float32)
  if output.shape[-1] == channels:
    return output, None
  if output.shape[-1] == 2 * channels:
    return output[..., :channels], output[..., channels:]
  raise ValueError(f'model output has {output.shape[-1]} channels; expected {channels} (eps) '
                   f'or {2 * channels} (eps and learned variance) for {channels}-channel images.')


def scale_eps(eps: jax.Array, eps_scale: float) -> jax.Array:
  """Epsilon scaling (ADM-ES): eps / lambda. lambda == 1 returns eps untouched."""
  if eps_scale == 1.0:
    return eps
  return eps / jnp.float32(eps_scale)


def maybe_clip_x0(x0: jax.Array, clip: bool) -> jax.Array:
  """Clips a predicted x0 to the data range [-1, 1] when asked."""
  return jnp.clip(x0, -1.0, 1.0) if clip else x0


def call_model(model_fn: ModelFn, x: jax.Array, t: jax.Array, y: jax.Array | None,
               eps_scale: float) -> tuple[jax.Array, jax.Array | None]:
  """Evaluates the model at scalar time `t` (original scale): returns (scaled eps, v or None)."""
  t_vec = jnp.full((x.shape[0],), t, dtype=jnp.float32)
  eps, v = split_model_output(model_fn(x, t_vec, y), x.shape[-1])
  return scale_eps(eps, eps_scale), v


# A sampler returns x0, or (x0, Trajectory) with return_trajectory=True.
SampleOutput = jax.Array | tuple[jax.Array, Trajectory]


def trajectory_output(x0: jax.Array, seen: tuple[jax.Array, jax.Array] | None,
                      per_step: dict[str, jax.Array]) -> SampleOutput:
  """x0 alone, or with the Trajectory when the scan recorded (inputs, eps)."""
  if seen is None:
    return x0
  return x0, Trajectory(t=per_step['t'], alpha=per_step['alpha'], sigma=per_step['sigma'],
                        x=seen[0], eps=seen[1])


def model_input(model_fn: ModelFn, x: jax.Array, y: jax.Array | None, c: dict[str, jax.Array],
                rng: jax.Array, perturb_fn: PerturbFn | None,
                sharding: NamedSharding | None) -> jax.Array:
  """The state as the model sees it at step c['step']: x, or perturb_fn's replacement.

  `c` is the scan's per-step slice (with 'step', 't', 'alpha', 'sigma'); `rng` the sampler's.
  """
  if perturb_fn is None:
    return x
  key = jax.random.fold_in(jax.random.fold_in(rng, _PERTURB_STREAM), c['step'])
  ctx = StepContext(step=c['step'], t=jnp.full((x.shape[0],), c['t'], dtype=jnp.float32),
                    alpha=c['alpha'], sigma=c['sigma'], key=key)
  return constrain(perturb_fn(model_fn, x, y, ctx).astype(x.dtype), sharding)


def constrain(x: jax.Array, sharding: NamedSharding | None) -> jax.Array:
  """Pins `x` to `sharding` inside jit, whichever axis types the mesh uses."""
  if sharding is None:
    return x
  mesh = sharding.mesh
  if any(t == AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def split_rng(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(key for the initial noise, key from which step j's noise is folded)."""
  init_key, step_key = jax.random.split(rng)
  return init_key, step_key


def normal(key: jax.Array, shape: tuple[int, ...],
           sharding: NamedSharding | None) -> jax.Array:
  """Standard normal noise of the GLOBAL shape, so results do not depend on the device count."""
  return constrain(jax.random.normal(key, shape, dtype=jnp.float32), sharding)


def step_noise(step_key: jax.Array, step: jax.Array, shape: tuple[int, ...],
               sharding: NamedSharding | None) -> jax.Array:
  """The noise of scan step `step` (0 = first step taken)."""
  return normal(jax.random.fold_in(step_key, step), shape, sharding)


def reversed_f32(values: np.ndarray) -> jax.Array:
  """Per-step float64 constants as float32, in the order a reverse-time scan visits them."""
  return jnp.asarray(np.asarray(values)[::-1].copy(), dtype=jnp.float32)
