"""Training losses for eps-predicting diffusion models: MSE plus ADM's VB term."""
import math

import jax
import jax.numpy as jnp

from atdiff_jax.diffusion.gaussian import GaussianDiffusion, split_eps

Array = jax.Array

# Probabilities are floored here before taking logs (as in ADM).
_MIN_PROB = 1e-12


def _mean_flat(x: Array) -> Array:
  """Mean over all axes but the first."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
  """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) +
                jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: Array) -> Array:
  """Fast tanh approximation of the standard normal CDF (as in ADM / PixelCNN++)."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: Array, means: Array, log_scales: Array) -> Array:
  """Elementwise log-likelihood (nats) of data x in [-1, 1] quantised to 256 bins.

  Each bin has width 2/255 around x; the outermost bins extend to +-infinity.
  """
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, _MIN_PROB))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, _MIN_PROB))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, _MIN_PROB))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bits(diffusion: GaussianDiffusion, model_output: Array, x0: Array, x_t: Array,
                  t: Array) -> Array:
  """Per-example variational-bound term (bits per dimension) of a learned-sigma model.

  KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, and the decoder's negative
  log-likelihood of x0 for t == 0. model_output has 2C channels (eps, v).
  """
  true_mean, _, true_log_var = diffusion.q_posterior(x0, x_t, t)
  out = diffusion.p_mean_variance(model_output, x_t, t, learn_sigma=True)
  kl = _mean_flat(normal_kl(true_mean, true_log_var, out['mean'], out['log_variance']))
  decoder_nll = -_mean_flat(discretized_gaussian_log_likelihood(
      x0, means=out['mean'], log_scales=0.5 * out['log_variance']))
  return jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)


def hybrid_loss(diffusion: GaussianDiffusion, model_output: Array, x0: Array, x_t: Array,
                t: Array, eps_target: Array, *, learn_sigma: bool,
                rescale_vb: bool = True) -> dict[str, Array]:
  """ADM's training loss for an eps-predicting model; all outputs are per example (B,).

  mse: mean over pixels of (eps_pred - eps_target)^2.
  vb (learn_sigma only): the VB term with the model's mean built from a stop-gradient
    eps, so it trains only the variance channels; the true posterior is taken at the
    given x0 and x_t. x_t is used as given (it may be adversarially perturbed and may
    carry gradient: the caller decides). Scaled by T / 1000 when rescale_vb, so its
    weight does not depend on the number of steps (ADM's rescaled MSE). Zero otherwise.
  loss: mse + vb. Everything is computed in float32.
  """
  model_output = model_output.astype(jnp.float32)
  x0 = x0.astype(jnp.float32)
  x_t = x_t.astype(jnp.float32)
  eps_target = eps_target.astype(jnp.float32)
  channels = x0.shape[-1]
  eps_pred = split_eps(model_output, channels, learn_sigma)
  mse = _mean_flat(jnp.square(eps_pred - eps_target))
  if learn_sigma:
    # The VB term must not move the mean: it only learns the variance (improved DDPM).
    frozen_out = jnp.concatenate(
        [jax.lax.stop_gradient(eps_pred), model_output[..., channels:]], axis=-1)
    vb = vb_terms_bits(diffusion, frozen_out, x0, x_t, t)
    if rescale_vb:
      vb = vb * (diffusion.num_timesteps / 1000.0)
  else:
    vb = jnp.zeros_like(mse)
  return dict(loss=mse + vb, mse=mse, vb=vb)
