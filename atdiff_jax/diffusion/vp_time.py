"""The discrete VP process read in continuous time, inside jit.

A teacher DPM of this project knows T integer timesteps. Consistency models need times in
between (pairs drawn from continuous distributions, grids of any size), so, as DPM-Solver's
'discrete' schedule does (samplers/dpm_solver.py, on the host), log alpha with alpha =
sqrt(abar) is read as piecewise linear through the integer timesteps t = 0..T-1 of the
original scale, the scale the networks take as their time input.

The variance-exploding view: x~ = x_t / alpha_t and sigma~_t = sigma_t / alpha_t =
sqrt((1 - abar_t) / abar_t); the probability-flow ODE is dx~ / dsigma~ = eps(x_t, t).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@flax.struct.dataclass
class VPTime:
  """log alpha(t) on [0, T-1] (clamped outside); build with `VPTime.create(betas)`."""
  log_alpha_grid: Array  # (T,) float32, log sqrt(abar_t) at t = 0..T-1, decreasing

  @classmethod
  def create(cls, betas) -> 'VPTime':
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2 or not np.all((betas > 0) & (betas < 1)):
      raise ValueError('betas must be a 1-D array of at least 2 values in (0, 1)')
    return cls(log_alpha_grid=jnp.asarray(0.5 * np.cumsum(np.log1p(-betas)), jnp.float32))

  @property
  def num_timesteps(self) -> int:
    return self.log_alpha_grid.shape[0]

  def _grid(self) -> Array:
    return jnp.arange(self.num_timesteps, dtype=jnp.float32)

  def log_alpha(self, t) -> Array:
    return jnp.interp(jnp.asarray(t, jnp.float32), self._grid(), self.log_alpha_grid)

  def alpha(self, t) -> Array:
    """sqrt(abar_t)."""
    return jnp.exp(self.log_alpha(t))

  def sigma(self, t) -> Array:
    """sqrt(1 - abar_t)."""
    return jnp.sqrt(-jnp.expm1(2.0 * self.log_alpha(t)))

  def ve_sigma(self, t) -> Array:
    """sigma~_t = sqrt((1 - abar_t) / abar_t), the noise level of x_t / alpha_t."""
    return jnp.sqrt(jnp.expm1(-2.0 * self.log_alpha(t)))

  def time_of_ve_sigma(self, ve_sigma) -> Array:
    """The (fractional) timestep whose sigma~ is `ve_sigma`; the inverse of `ve_sigma`."""
    log_alpha = -0.5 * jnp.log1p(jnp.square(jnp.asarray(ve_sigma, jnp.float32)))
    return jnp.interp(log_alpha, self.log_alpha_grid[::-1], self._grid()[::-1])


def broadcast_to(values: Array, ndim: int) -> Array:
  """(B,) per-example values shaped (B, 1, ..., 1) for data with `ndim` axes."""
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))
