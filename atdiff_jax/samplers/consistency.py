"""Consistency sampling: one model call per step, re-noising in between.

x = f(z, t_0) with z ~ N(0, I) at the first time; then for each next time t_i the sample is
sent forward from the boundary t_min to t_i, x_t = (alpha_t / alpha_min) x + sqrt(1 -
(alpha_t / alpha_min)^2) z (the exact VP transition), and x = f(x_t, t_i). The model is an eps
model whose x0 prediction (x - sigma eps) / alpha is the consistency function (a consistency
run is wrapped so by `from_config.params_model_fn`); any eps model can be sampled this way.

The output f is a sample of the t_min marginal: t_min is the model's boundary (f(x, t_min) =
x), so a consistency run samples with its own `consistency.t_min` (`from_config.sampler_defaults`).

Times: `timesteps`, on the original scale, descending and all above t_min; by default a
Karras grid (rho = 7) of num_steps + 1 noise levels sigma~ from `sigma_max` down to that of
t_min, without its last point (f is the identity there).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from atdiff_jax.diffusion.vp_time import VPTime
from atdiff_jax.samplers import common

RHO = 7.0


def default_timesteps(vp: VPTime, num_steps: int, sigma_max: float,
                      t_min: float = 0.0) -> np.ndarray:
  """num_steps original-scale times, descending from the time of sigma~ = sigma_max and all
  above t_min."""
  sigma_min = float(vp.ve_sigma(float(t_min)))
  if not sigma_min < sigma_max:
    raise ValueError(f'sigma_max={sigma_max} must be above sigma~ = {sigma_min:.4g} of '
                     f't_min={t_min}.')
  lo, hi = sigma_min ** (1 / RHO), sigma_max ** (1 / RHO)
  sigmas = (hi + np.arange(num_steps) / num_steps * (lo - hi)) ** RHO
  times = np.asarray(vp.time_of_ve_sigma(jnp.asarray(sigmas, jnp.float32)), np.float64)
  # In float32 the last time could round onto t_min, where f is the identity.
  if not np.all(times > t_min):
    raise ValueError(f'{num_steps} steps do not fit between t_min={t_min} and sigma_max='
                     f'{sigma_max} (default times {times.tolist()}); use fewer steps.')
  return times


def check_timesteps(timesteps: Sequence[float], num_steps: int, num_timesteps: int,
                    t_min: float = 0.0) -> np.ndarray:
  times = np.asarray(timesteps, np.float64).reshape(-1)
  if times.shape[0] != num_steps:
    raise ValueError(f'timesteps has {times.shape[0]} entries; one per step ({num_steps}) is '
                     'needed.')
  if not (np.all(times > t_min) and np.all(times <= num_timesteps - 1)
          and np.all(np.diff(times) < 0)):
    # At or below t_min, f is the identity: such a step would return its noisy input.
    raise ValueError(f'timesteps must decrease strictly within (t_min={t_min:g}, '
                     f'{num_timesteps - 1}], got {times.tolist()}.')
  return times


def check_t_min(t_min: float, num_timesteps: int) -> float:
  t_min = float(t_min)
  if not 0.0 <= t_min < num_timesteps - 1:
    raise ValueError(f't_min must lie in [0, {num_timesteps - 1}), got {t_min}.')
  return t_min


def sample_consistency(model_fn: common.ModelFn,
                       rng: jax.Array,
                       shape: Sequence[int],
                       betas,
                       num_steps: int,
                       *,
                       y: jax.Array | None = None,
                       eps_scale: float = 1.0,
                       clip_x0: bool = True,
                       sigma_max: float = 80.0,
                       t_min: float = 0.0,
                       timesteps: Sequence[float] | None = None,
                       sharding: NamedSharding | None = None,
                       perturb_fn: common.PerturbFn | None = None,
                       return_trajectory: bool = False) -> common.SampleOutput:
  """Draws samples with `num_steps` consistency steps (see the module docstring).

  `t_min` is the boundary timestep of the consistency function: samples carry the t_min
  marginal. A learned variance output, if present, is ignored.
  """
  shape = common.check_shape(shape)
  y = common.check_labels(y, shape[0])
  betas = common.as_betas(betas)
  t_min = check_t_min(t_min, betas.shape[0])
  with jax.ensure_compile_time_eval():  # host constants, though this runs inside jit
    vp = VPTime.create(betas)
    if timesteps is None or len(timesteps) == 0:
      if not 0 < sigma_max:
        raise ValueError(f'sigma_max must be > 0, got {sigma_max}.')
      times = default_timesteps(vp, num_steps, float(sigma_max), t_min)
    else:
      times = check_timesteps(timesteps, num_steps, betas.shape[0], t_min)
    alpha = np.asarray(vp.alpha(jnp.asarray(times, jnp.float32)), np.float64)
    sigma = np.asarray(vp.sigma(jnp.asarray(times, jnp.float32)), np.float64)
    alpha_min = float(vp.alpha(t_min))
  # f lands on the t_min marginal, so re-noising starts there: for VP, q(x_t | x_min) has
  # mean (alpha_t / alpha_min) x_min and variance 1 - (alpha_t / alpha_min)^2.
  ratio = alpha / alpha_min
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  per_step = {
      't': f32(times), 'alpha': f32(alpha), 'sigma': f32(sigma),
      'inv_alpha': f32(1.0 / alpha),
      # Re-noising into step i (unused at step 0, which starts from pure noise).
      'renoise_mean': f32(ratio), 'renoise_std': f32(np.sqrt(np.maximum(1.0 - ratio**2, 0.0))),
      'step': jnp.arange(num_steps, dtype=jnp.int32),
  }
  init_key, step_key = common.split_rng(rng)
  x_init = common.normal(init_key, shape, sharding)

  def step(x0, c):
    noise = common.step_noise(step_key, c['step'], shape, sharding)
    x = jnp.where(c['step'] == 0, x_init, c['renoise_mean'] * x0 + c['renoise_std'] * noise)
    x = common.model_input(model_fn, common.constrain(x, sharding), y, c, rng, perturb_fn,
                           sharding)
    eps, _ = common.call_model(model_fn, x, c['t'], y, eps_scale)
    x0 = common.maybe_clip_x0((x - c['sigma'] * eps) * c['inv_alpha'], clip_x0)
    return common.constrain(x0, sharding), (x, eps) if return_trajectory else None

  x0, seen = jax.lax.scan(step, common.constrain(jnp.zeros(shape, jnp.float32), sharding),
                          per_step)
  return common.trajectory_output(x0, seen, per_step)
