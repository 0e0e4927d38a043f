"""The consistency function on a VP teacher's time axis, and a CM seen as an eps model.

f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t), with x0_pred = (x - sigma_t eps) / alpha_t
from the network's eps output (the student starts as the teacher, so x0_pred starts as the
teacher's one-step denoiser). Two choices of scalings:
- 'lcm' (Latent Consistency Models): on the timestep, u = timestep_scaling * (t - t_min):
  c_skip = sd^2 / (u^2 + sd^2), c_out = u / sqrt(u^2 + sd^2). With the default scaling 10,
  c_skip is below 1e-3 from t = 2 on: f is the network's x0 prediction everywhere but at
  the boundary, so the student can undo a perturbation of its input at every t it is
  trained on (what AT asks of it).
- 'cm' (Consistency Models, EDM form) on the VE noise level sigma~ = sqrt((1 - abar)/abar):
  s = sigma~_t - sigma~_min, c_skip = sd^2 / (s^2 + sd^2), c_out = s / sqrt(sigma~_t^2 + sd^2)
  (the CM paper's c_out divided by sd, because x0_pred is already in data units, as LCM
  does). c_skip stays near 1 up to sigma~ ~ 0.1, where a perturbation of x passes through.
Both give the boundary condition f(x, t_min) = x exactly (not up to rounding).

`eps_of_consistency` turns f back into the eps whose x0 prediction is f, so that a
consistency model can be handed to every sampler and probe as an eps model.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from atdiff_jax.diffusion.vp_time import VPTime, broadcast_to

SCALINGS = ('lcm', 'cm')
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Parametrisation:
  """c_skip and c_out of the consistency function; t_min is the boundary timestep."""
  scalings: str = 'lcm'
  sigma_data: float = 0.5
  timestep_scaling: float = 10.0
  t_min: float = 0.0

  def __post_init__(self):
    if self.scalings not in SCALINGS:
      raise ValueError(f'unknown scalings {self.scalings!r}; allowed: {", ".join(SCALINGS)}')

  @classmethod
  def from_config(cls, consistency_config) -> 'Parametrisation':
    c = consistency_config
    return cls(scalings=c.scalings, sigma_data=float(c.sigma_data),
               timestep_scaling=float(c.timestep_scaling), t_min=float(c.t_min))

  def coefficients(self, vp: VPTime, t: Array) -> tuple[Array, Array]:
    """(c_skip, c_out), each (B,) for times t (B,) on the original scale."""
    t = jnp.asarray(t, jnp.float32)
    sd2 = jnp.float32(self.sigma_data**2)
    if self.scalings == 'lcm':
      u = self.timestep_scaling * (t - self.t_min)
      c_skip, c_out = sd2 / (u * u + sd2), u / jnp.sqrt(u * u + sd2)
    else:
      ve = vp.ve_sigma(t)
      s = ve - vp.ve_sigma(jnp.full_like(t, self.t_min))
      c_skip, c_out = sd2 / (s * s + sd2), s / jnp.sqrt(ve * ve + sd2)
    at_boundary = t <= self.t_min
    return jnp.where(at_boundary, 1.0, c_skip), jnp.where(at_boundary, 0.0, c_out)

  def __call__(self, vp: VPTime, x: Array, t: Array, eps: Array) -> Array:
    """f(x, t) from the network's eps at (x, t); float32."""
    x, eps = x.astype(jnp.float32), eps.astype(jnp.float32)
    alpha, sigma = broadcast_to(vp.alpha(t), x.ndim), broadcast_to(vp.sigma(t), x.ndim)
    c_skip, c_out = (broadcast_to(c, x.ndim) for c in self.coefficients(vp, t))
    return c_skip * x + c_out * ((x - sigma * eps) / alpha)


def eps_of_consistency(vp: VPTime, x: Array, t: Array, f: Array) -> Array:
  """The eps whose x0 prediction (x - sigma_t eps) / alpha_t is f."""
  alpha, sigma = broadcast_to(vp.alpha(t), x.ndim), broadcast_to(vp.sigma(t), x.ndim)
  return (x - alpha * f) / sigma


def as_eps_model(model_fn: Callable[..., Array], parametrisation: Parametrisation,
                 vp: VPTime, channels: int) -> Callable[..., Array]:
  """A consistency network `model_fn(x, t, y, *args) -> output` (eps in the first
  `channels` channels) as an eps model whose x0 prediction is the consistency function."""

  def eps_model(x, t, y, *args):
    eps = model_fn(x, t, y, *args)[..., :channels].astype(jnp.float32)
    return eps_of_consistency(vp, x, t, parametrisation(vp, x, t, eps))

  return eps_model
