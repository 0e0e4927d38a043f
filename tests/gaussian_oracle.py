"""Gaussian data and its exact denoisers: closed-form stand-ins for a trained model.

If x0 ~ N(mu, diag(s^2)), then x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar) and the optimal
eps is sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar), elementwise.
"""
import jax
import jax.numpy as jnp
import numpy as np

from atdiff_jax import samplers
from atdiff_jax.diffusion.schedules import get_beta_schedule

T = 100
BETAS = get_beta_schedule('cosine', T)
ABAR = np.cumprod(1.0 - BETAS)
MU = np.array([0.3, -0.5])
STD = np.array([0.5, 0.3])


def key(seed):
  # 'rbg' keys compile several times faster than threefry on CPU; the sharding test, which
  # relies on threefry's partitionable bits, uses the default implementation.
  return jax.random.key(seed, impl='rbg')


def optimal_eps(x, abar, mu=MU):
  s2 = jnp.asarray(STD**2, jnp.float32)
  return jnp.sqrt(1.0 - abar) * (x - jnp.sqrt(abar) * mu) / (abar * s2 + 1.0 - abar)


def log_sqrt_abar(t):
  """Piecewise-linear log sqrt(abar) over integer timesteps, extended linearly past both ends."""
  la = jnp.asarray(0.5 * np.log(ABAR), jnp.float32)
  grid = jnp.arange(T, dtype=jnp.float32)
  inside = jnp.interp(jnp.clip(t, 0.0, T - 1.0), grid, la)
  below = jnp.minimum(t, 0.0) * (la[1] - la[0])
  above = jnp.maximum(t - (T - 1.0), 0.0) * (la[-1] - la[-2])
  return inside + below + above


def oracle_model(x, t, y):
  """Optimal eps at (possibly fractional) original-scale time t; labels shift the mean."""
  abar = jnp.exp(2.0 * log_sqrt_abar(t))[:, None, None, None]
  mu = jnp.asarray(MU, jnp.float32)
  if y is not None:
    mu = mu + 0.1 * y.astype(jnp.float32)[:, None, None, None]
  return optimal_eps(x, abar, mu)


def learned_sigma_oracle(num_steps):
  """2C-output model: optimal eps plus v giving the EXACT reverse variance of the respaced chain.

  For Gaussian data the reverse step is Gaussian with mean c1 E[x0|x_t] + c2 x_t (what
  ADM computes) and variance Var(x_prev) - alpha Var(x_prev)^2 / Var(x_t); so ancestral
  sampling with this model is exact at any number of steps.
  """
  kept = np.array(sorted(samplers.space_timesteps(T, [num_steps])))
  a = ABAR[kept]
  a_prev = np.append(1.0, a[:-1])
  beta = 1.0 - a / a_prev
  post_var = beta * (1.0 - a_prev) / (1.0 - a)
  table = {k: jnp.asarray(v, jnp.float32) for k, v in {
      'a': a, 'a_prev': a_prev, 'log_beta': np.log(beta),
      'log_post': np.log(np.append(post_var[1], post_var[1:]))}.items()}
  s2 = jnp.asarray(STD**2, jnp.float32)

  def model(x, t, y):
    i = jnp.searchsorted(jnp.asarray(kept), t.astype(jnp.int32))
    get = lambda k: table[k][i][:, None, None, None]
    var_prev = get('a_prev') * s2 + 1.0 - get('a_prev')
    var_t = get('a') * s2 + 1.0 - get('a')
    reverse_var = var_prev - get('a') / get('a_prev') * var_prev**2 / var_t
    frac = (jnp.log(reverse_var) - get('log_post')) / (get('log_beta') - get('log_post'))
    v = jnp.broadcast_to(2.0 * frac - 1.0, x.shape)
    return jnp.concatenate([optimal_eps(x, get('a')), v], axis=-1)

  return model
