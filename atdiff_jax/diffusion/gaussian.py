"""Discrete-time Gaussian diffusion (DDPM / improved DDPM / ADM conventions).

Timesteps are 0-based: t = 0 is the first noising step and t = T - 1 the last.
All methods take t as an int32 vector of shape (B,) and broadcast the per-step
coefficients over the trailing (e.g. H, W, C) axes of the data.
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def split_eps(model_output: Array, channels: int, learn_sigma: bool) -> Array:
  """The eps half of a model output, after checking its channel count (C, or 2C with the
  learned-range variance in the second half)."""
  expected = 2 * channels if learn_sigma else channels
  if model_output.shape[-1] != expected:
    raise ValueError(f'model output has {model_output.shape[-1]} channels; expected {expected} '
                     f'for {channels}-channel data with learn_sigma={learn_sigma}.')
  return model_output[..., :channels]


def _extract(table: Array, t: Array, ndim: int) -> Array:
  """table[t] reshaped to (B, 1, ..., 1) with `ndim` axes in total."""
  t = jnp.asarray(t)
  sharding = jax.typeof(t).sharding
  if any(axis is not None for axis in sharding.spec):
    # t is sharded over an Explicit mesh axis: the gather must be told to keep that.
    values = table.at[t].get(out_sharding=sharding)
  else:
    values = jnp.take(table, t, axis=0)
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


@flax.struct.dataclass
class GaussianDiffusion:
  """Coefficient tables of a diffusion process; a pytree usable inside jit.

  Tables are computed in float64 NumPy and stored as float32 arrays (T,).
  Build with `GaussianDiffusion.create(betas)`.
  """
  betas: Array
  log_betas: Array
  alphas_cumprod: Array
  alphas_cumprod_prev: Array
  sqrt_alphas_cumprod: Array
  sqrt_one_minus_alphas_cumprod: Array
  sqrt_recip_alphas_cumprod: Array
  sqrt_recipm1_alphas_cumprod: Array
  posterior_variance: Array
  posterior_log_variance_clipped: Array
  posterior_mean_coef1: Array
  posterior_mean_coef2: Array
  # ADM's fixed-large variance: [posterior_variance[1], betas[1:]].
  fixed_large_variance: Array
  fixed_large_log_variance: Array
  num_timesteps: int = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, betas: Any) -> 'GaussianDiffusion':
    """Precomputes all coefficient tables from betas (T,), with 0 < beta < 1."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
      raise ValueError(f'betas must be a 1-D array of at least 2 steps, got shape {betas.shape}.')
    if not np.all((betas > 0) & (betas < 1)):
      raise ValueError('every beta must lie strictly between 0 and 1 '
                       f'(got min {betas.min():.3g}, max {betas.max():.3g}); '
                       "the 'linear' schedule needs at least 21 timesteps.")
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    # posterior_variance[0] is 0; reuse step 1's value so the log stays finite.
    posterior_log_variance_clipped = np.log(
        np.append(posterior_variance[1], posterior_variance[1:]))
    fixed_large_variance = np.append(posterior_variance[1], betas[1:])
    tables = dict(
        betas=betas,
        log_betas=np.log(betas),
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        fixed_large_variance=fixed_large_variance,
        fixed_large_log_variance=np.log(fixed_large_variance),
    )
    return cls(num_timesteps=int(betas.shape[0]),
               # Cast on the host: a device-side cast compiles a program.
               **{k: jnp.asarray(np.asarray(v, np.float32)) for k, v in tables.items()})

  def q_sample(self, x0: Array, t: Array, noise: Array) -> Array:
    """Samples x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I)."""
    return (_extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0 +
            _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

  def sigma(self, t: Array, ndim: int = 4) -> Array:
    """sqrt(1 - abar_t), shaped (B, 1, ..., 1) to broadcast over data with `ndim` axes."""
    return _extract(self.sqrt_one_minus_alphas_cumprod, t, ndim)

  def q_posterior(self, x0: Array, x_t: Array, t: Array) -> tuple[Array, Array, Array]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
    mean = (_extract(self.posterior_mean_coef1, t, x_t.ndim) * x0 +
            _extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t)
    variance = _extract(self.posterior_variance, t, x_t.ndim)
    log_variance = _extract(self.posterior_log_variance_clipped, t, x_t.ndim)
    return mean, variance, log_variance

  def predict_x0_from_eps(self, x_t: Array, t: Array, eps: Array) -> Array:
    """Inverts q_sample: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t -
            _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

  def predict_eps_from_x0(self, x_t: Array, t: Array, x0: Array) -> Array:
    """The noise that takes x0 to x_t at step t."""
    return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0) /
            _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

  def p_mean_variance(self, model_output: Array, x_t: Array, t: Array, *,
                      learn_sigma: bool, clip_denoised: bool = False) -> dict[str, Array]:
    """The reverse step p(x_{t-1} | x_t) given an eps-predicting model's output.

    learn_sigma=True: model_output has 2C channels (last axis); the first C are eps,
      the last C are v in [-1, 1] interpolating the log-variance between the
      posterior's (v = -1) and beta_t (v = +1): improved DDPM's learned range.
    learn_sigma=False: ADM's fixed-large variance, [posterior_variance[1], betas[1:]].

    Returns float32 arrays: mean, variance, log_variance, pred_x0 (clipped to [-1, 1]
    when clip_denoised) and eps (the model's eps, or, when clip_denoised, the eps
    consistent with the clipped pred_x0, as DDIM-style samplers want).
    """
    model_output = model_output.astype(jnp.float32)
    x_t = x_t.astype(jnp.float32)
    eps = split_eps(model_output, x_t.shape[-1], learn_sigma)
    if learn_sigma:
      frac = (model_output[..., x_t.shape[-1]:] + 1.0) / 2.0
      max_log = _extract(self.log_betas, t, x_t.ndim)
      min_log = _extract(self.posterior_log_variance_clipped, t, x_t.ndim)
      log_variance = frac * max_log + (1.0 - frac) * min_log
      variance = jnp.exp(log_variance)
    else:
      shape = x_t.shape
      variance = jnp.broadcast_to(_extract(self.fixed_large_variance, t, x_t.ndim), shape)
      log_variance = jnp.broadcast_to(_extract(self.fixed_large_log_variance, t, x_t.ndim), shape)
    pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
    if clip_denoised:
      pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
      eps = self.predict_eps_from_x0(x_t, t, pred_x0)
    mean, _, _ = self.q_posterior(pred_x0, x_t, t)
    return dict(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0, eps=eps)
