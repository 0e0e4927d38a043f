"""Perturbation math for adversarial training, independent of the training objective.

Everything is per sample: a batch of perturbations delta (B, H, W, C) lives in a batch of
norm balls, one per example, and each example's ascent direction is normalised on its own.
Only parameter gradients ever cross devices; delta stays with its examples.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections

_TINY = 1e-12
# The reference's ascent step: an L2 length of 0.1 on CIFAR-10's 32x32x3 images, about 0.0018
# RMS per pixel. In per-pixel units (adv.step_size_scale='per_dim') it is the same strength on
# any image shape; the absolute 0.1 on 8x8x1 images would be ~7x stronger.
REFERENCE_STEP_PER_PIXEL = 0.1 / math.sqrt(32 * 32 * 3)


@dataclasses.dataclass(frozen=True)
class BallSpec:
  """A norm ball and an ascent step size, both in the norm's own units."""
  norm: str          # 'l2' | 'linf'
  radius: float
  step_size: float

  @classmethod
  def from_config(cls, adv: ml_collections.ConfigDict, sample_shape) -> 'BallSpec':
    """Radius and step size in their units (`adv.radius_scale`, `adv.step_size_scale`):
    `per_dim` values are per-pixel RMS, so an L2 value v means v * sqrt(H*W*C) (the same
    strength on every image shape); `absolute` values are the norm's own. An L-inf value is
    already per coordinate, so it is the same under both."""
    return cls(norm=adv.norm,
               radius=_in_norm_units(adv.radius, adv.radius_scale, adv.norm, sample_shape),
               step_size=_in_norm_units(adv.step_size, adv.get('step_size_scale', 'absolute'),
                                        adv.norm, sample_shape))


def _in_norm_units(value: float, scale: str, norm: str, sample_shape) -> float:
  value = float(value)
  if scale == 'per_dim' and norm == 'l2':
    value *= math.sqrt(math.prod(sample_shape))
  return value


def _per_sample(reduce, x: jax.Array) -> jax.Array:
  """Reduces over every axis but the first, keeping dims for broadcasting."""
  return reduce(x, axis=tuple(range(1, x.ndim)), keepdims=True)


def l2_norms(x: jax.Array) -> jax.Array:
  """Per-sample L2 norms, shape (B,)."""
  return jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1))


def norms(x: jax.Array, norm: str) -> jax.Array:
  """Per-sample norms in the ball's norm, shape (B,)."""
  if norm == 'l2':
    return l2_norms(x)
  return jnp.max(jnp.abs(x.reshape(x.shape[0], -1)), axis=1)


def project(delta: jax.Array, ball: BallSpec, scale: jax.Array | float = 1.0) -> jax.Array:
  """Nearest point of each sample's ball; `scale` (per sample, broadcastable) multiplies the
  radius, and a scale of 0 leaves only delta = 0."""
  radius = ball.radius * scale
  if ball.norm == 'linf':
    return jnp.clip(delta, -radius, radius)
  norm = jnp.sqrt(_per_sample(jnp.sum, jnp.square(delta)))
  return delta * jnp.minimum(1.0, radius / jnp.maximum(norm, _TINY))


def ascent_step(delta: jax.Array, grad: jax.Array, ball: BallSpec,
                scale: jax.Array | float = 1.0) -> jax.Array:
  """One projected steepest-ascent step: g/|g|_2 per sample for L2, sign(g) for L-inf.

  `scale` (per sample, broadcastable) multiplies both the radius and the step size.
  """
  grad = grad.astype(delta.dtype)
  if ball.norm == 'linf':
    direction = jnp.sign(grad)
  else:
    norm = jnp.sqrt(_per_sample(jnp.sum, jnp.square(grad)))
    direction = grad / jnp.maximum(norm, _TINY)
  return project(delta + (ball.step_size * scale) * direction, ball, scale)


def init_delta(rng: jax.Array, shape, ball: BallSpec, init: str,
               dtype=jnp.float32) -> jax.Array:
  """Start of the inner maximisation: zero, or uniform inside the ball."""
  if init == 'zero' or ball.radius == 0.0:
    return jnp.zeros(shape, dtype)
  if ball.norm == 'linf':
    return jax.random.uniform(rng, shape, dtype, -ball.radius, ball.radius)
  # Uniform in the L2 ball: a uniform direction times radius * U^(1/d).
  dir_rng, r_rng = jax.random.split(rng)
  direction = jax.random.normal(dir_rng, shape, dtype)
  direction /= jnp.maximum(jnp.sqrt(_per_sample(jnp.sum, jnp.square(direction))), _TINY)
  dim = math.prod(shape[1:])
  u = jax.random.uniform(r_rng, (shape[0],) + (1,) * (len(shape) - 1), dtype)
  return direction * ball.radius * u ** (1.0 / dim)
