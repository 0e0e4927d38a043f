"""DDIM sampling (Song et al. 2021) over ADM's respaced timesteps."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from atdiff_jax.samplers import common
from atdiff_jax.samplers import respace


def ddim_sigmas(process: respace.RespacedProcess, eta: float) -> np.ndarray:
  """sigma_i = eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev).

  eta = 1 gives the respaced process's posterior standard deviation (ancestral sampling).
  """
  abar, abar_prev = process.alphas_cumprod, process.alphas_cumprod_prev
  return eta * np.sqrt((1.0 - abar_prev) / (1.0 - abar)) * np.sqrt(1.0 - abar / abar_prev)


def sample_ddim(model_fn: common.ModelFn,
                rng: jax.Array,
                shape: Sequence[int],
                betas,
                num_steps: int,
                *,
                y: jax.Array | None = None,
                eps_scale: float = 1.0,
                clip_x0: bool = True,
                eta: float = 0.0,
                respacing: str | Sequence[int] | None = None,
                sharding: NamedSharding | None = None,
                perturb_fn: common.PerturbFn | None = None,
                return_trajectory: bool = False) -> common.SampleOutput:
  """Draws x0 samples with DDIM; one model call per step, deterministic for eta = 0.

  As in ADM, eps is recomputed from the (possibly clipped) x0 prediction before the update
  x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z. A learned
  variance output, if present, is ignored. `respacing` is as for the ancestral sampler
  (pass 'ddim' for DDIM's integer-stride steps).
  """
  if eta < 0:
    raise ValueError(f'eta must be non-negative, got {eta}.')
  shape = common.check_shape(shape)
  y = common.check_labels(y, shape[0])
  process = respace.respaced_process(betas, num_steps, respacing)
  sigmas = ddim_sigmas(process, eta)
  abar_prev = process.alphas_cumprod_prev
  per_step = {
      't': common.reversed_f32(process.timestep_map.astype(np.float64)),
      'alpha': common.reversed_f32(np.sqrt(process.alphas_cumprod)),
      'sigma': common.reversed_f32(np.sqrt(1.0 - process.alphas_cumprod)),
      'sqrt_recip_abar': common.reversed_f32(process.sqrt_recip_alphas_cumprod),
      'sqrt_recipm1_abar': common.reversed_f32(process.sqrt_recipm1_alphas_cumprod),
      'recip_sqrt_recipm1_abar': common.reversed_f32(1.0 / process.sqrt_recipm1_alphas_cumprod),
      'sqrt_abar_prev': common.reversed_f32(np.sqrt(abar_prev)),
      'eps_coef': common.reversed_f32(np.sqrt(np.maximum(1.0 - abar_prev - sigmas**2, 0.0))),
      'noise_std': common.reversed_f32(sigmas),
      'step': jnp.arange(num_steps, dtype=jnp.int32),
  }
  stochastic = eta > 0
  init_key, step_key = common.split_rng(rng)
  x_init = common.normal(init_key, shape, sharding)

  def step(x, c):
    x = common.model_input(model_fn, x, y, c, rng, perturb_fn, sharding)
    eps, _ = common.call_model(model_fn, x, c['t'], y, eps_scale)
    x0 = c['sqrt_recip_abar'] * x - c['sqrt_recipm1_abar'] * eps
    x0 = common.maybe_clip_x0(x0, clip_x0)
    # A multiply (not a divide) rounds the same in every partitioning of the batch.
    eps = (c['sqrt_recip_abar'] * x - x0) * c['recip_sqrt_recipm1_abar']
    x_next = c['sqrt_abar_prev'] * x0 + c['eps_coef'] * eps
    if stochastic:
      noise = common.step_noise(step_key, c['step'], shape, sharding)
      is_last = c['step'] == num_steps - 1
      x_next = jnp.where(is_last, x_next, x_next + c['noise_std'] * noise)
    return common.constrain(x_next, sharding), (x, eps) if return_trajectory else None

  x0, seen = jax.lax.scan(step, x_init, per_step)
  return common.trajectory_output(x0, seen, per_step)
