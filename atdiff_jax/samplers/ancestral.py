"""Ancestral (DDPM / improved-DDPM) sampling over ADM's respaced timesteps."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from atdiff_jax.samplers import common
from atdiff_jax.samplers import respace


def sample_ancestral(model_fn: common.ModelFn,
                     rng: jax.Array,
                     shape: Sequence[int],
                     betas,
                     num_steps: int,
                     *,
                     y: jax.Array | None = None,
                     eps_scale: float = 1.0,
                     clip_x0: bool = True,
                     respacing: str | Sequence[int] | None = None,
                     fixed_variance: str = 'large',
                     sharding: NamedSharding | None = None,
                     perturb_fn: common.PerturbFn | None = None,
                     return_trajectory: bool = False) -> common.SampleOutput:
  """Draws x0 samples with ADM's p_sample loop; one model call per step.

  Learned-sigma models (2C output channels) use their learned-range variance,
  exp(frac * log beta_i + (1 - frac) * log posterior_var_i) with frac = (v + 1) / 2, in the
  respaced process. Eps-only models use `fixed_variance`: 'large' (betas; ADM's default)
  or 'small' (posterior variance). The last step returns the posterior mean, without noise.
  `shape`, `num_steps`, `betas` and the keyword options are static under jit.
  """
  shape = common.check_shape(shape)
  y = common.check_labels(y, shape[0])
  process = respace.respaced_process(betas, num_steps, respacing)
  fixed_log_var = process.fixed_log_variance(fixed_variance)
  per_step = {
      't': common.reversed_f32(process.timestep_map.astype(np.float64)),
      'alpha': common.reversed_f32(np.sqrt(process.alphas_cumprod)),
      'sigma': common.reversed_f32(np.sqrt(1.0 - process.alphas_cumprod)),
      'sqrt_recip_abar': common.reversed_f32(process.sqrt_recip_alphas_cumprod),
      'sqrt_recipm1_abar': common.reversed_f32(process.sqrt_recipm1_alphas_cumprod),
      'coef_x0': common.reversed_f32(process.posterior_mean_coef1),
      'coef_xt': common.reversed_f32(process.posterior_mean_coef2),
      'min_log_var': common.reversed_f32(process.posterior_log_variance_clipped),
      'max_log_var': common.reversed_f32(np.log(process.betas)),
      'fixed_log_var': common.reversed_f32(fixed_log_var),
      'step': jnp.arange(num_steps, dtype=jnp.int32),
  }
  init_key, step_key = common.split_rng(rng)
  x_init = common.normal(init_key, shape, sharding)

  def step(x, c):
    x = common.model_input(model_fn, x, y, c, rng, perturb_fn, sharding)
    eps, v = common.call_model(model_fn, x, c['t'], y, eps_scale)
    x0 = c['sqrt_recip_abar'] * x - c['sqrt_recipm1_abar'] * eps
    x0 = common.maybe_clip_x0(x0, clip_x0)
    mean = c['coef_x0'] * x0 + c['coef_xt'] * x
    if v is None:
      log_var = c['fixed_log_var']
    else:
      frac = (v + 1.0) / 2.0
      log_var = frac * c['max_log_var'] + (1.0 - frac) * c['min_log_var']
    noise = common.step_noise(step_key, c['step'], shape, sharding)
    is_last = c['step'] == num_steps - 1
    x_next = jnp.where(is_last, mean, mean + jnp.exp(0.5 * log_var) * noise)
    return common.constrain(x_next, sharding), (x, eps) if return_trajectory else None

  x0, seen = jax.lax.scan(step, x_init, per_step)
  return common.trajectory_output(x0, seen, per_step)
