"""Tests for the Gaussian diffusion math: schedules, q, posterior, p, hybrid loss."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atdiff_jax.diffusion import (
    SCHEDULES,
    GaussianDiffusion,
    get_beta_schedule,
    hybrid_loss,
)

B, H, W, C = 6, 4, 4, 3


def _cosine_abar(s: float) -> float:
  return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


@pytest.fixture(scope='module')
def cosine_diffusion() -> GaussianDiffusion:
  return GaussianDiffusion.create(get_beta_schedule('cosine', 1000))


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize('num_timesteps', [1000, 50])
def test_linear_schedule_closed_form(num_timesteps):
  betas = get_beta_schedule('linear', num_timesteps)
  assert betas.dtype == np.float64 and betas.shape == (num_timesteps,)
  scale = 1000 / num_timesteps
  start, end = scale * 1e-4, scale * 0.02
  for t in [0, 1, num_timesteps // 2, num_timesteps - 1]:
    expected = start + (end - start) * t / (num_timesteps - 1)
    assert betas[t] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize('num_timesteps', [1000, 50])
def test_cosine_schedule_closed_form(num_timesteps):
  betas = get_beta_schedule('cosine', num_timesteps)
  assert betas.dtype == np.float64 and betas.shape == (num_timesteps,)
  for t in [0, 1, num_timesteps // 3, num_timesteps - 2, num_timesteps - 1]:
    ratio = _cosine_abar((t + 1) / num_timesteps) / _cosine_abar(t / num_timesteps)
    assert betas[t] == pytest.approx(min(1 - ratio, 0.999), rel=1e-10)
  assert betas[-1] == 0.999  # alpha_bar(1) = 0: clipped
  # alpha_bar of the schedule follows the cosine curve (relative to its start).
  abar = np.cumprod(1 - betas)
  t = num_timesteps // 2
  expected = _cosine_abar((t + 1) / num_timesteps) / _cosine_abar(0)
  assert abar[t] == pytest.approx(expected, rel=1e-10)


def test_unknown_schedule_names_allowed_values():
  assert SCHEDULES == ('linear', 'cosine')
  with pytest.raises(ValueError, match="linear, cosine"):
    get_beta_schedule('quadratic', 10)


def test_create_rejects_invalid_betas():
  with pytest.raises(ValueError, match='strictly between 0 and 1'):
    GaussianDiffusion.create(get_beta_schedule('linear', 10))  # betas up to 2.0
  with pytest.raises(ValueError, match='1-D'):
    GaussianDiffusion.create(np.full((2, 3), 0.1))


# ---------------------------------------------------------------- coefficient tables

@pytest.mark.parametrize('name,num_timesteps', [('cosine', 1000), ('linear', 50)])
def test_tables_match_closed_forms(name, num_timesteps):
  betas = get_beta_schedule(name, num_timesteps)
  diffusion = GaussianDiffusion.create(betas)
  assert diffusion.num_timesteps == num_timesteps
  assert diffusion.posterior_mean_coef1.dtype == jnp.float32
  tables = {k: np.asarray(getattr(diffusion, k), np.float64) for k in (
      'alphas_cumprod', 'alphas_cumprod_prev', 'posterior_variance', 'posterior_mean_coef1',
      'posterior_mean_coef2', 'posterior_log_variance_clipped', 'sqrt_recipm1_alphas_cumprod',
      'log_betas')}
  for t in [0, 1, 7, num_timesteps // 2, num_timesteps - 1]:
    abar = np.prod(1 - betas[:t + 1])
    abar_prev = np.prod(1 - betas[:t])
    beta, alpha = betas[t], 1 - betas[t]
    assert tables['alphas_cumprod'][t] == pytest.approx(abar, rel=1e-5)
    assert tables['alphas_cumprod_prev'][t] == pytest.approx(abar_prev, rel=1e-5)
    assert tables['posterior_variance'][t] == pytest.approx(
        beta * (1 - abar_prev) / (1 - abar), rel=1e-5, abs=1e-30)
    assert tables['posterior_mean_coef1'][t] == pytest.approx(
        beta * math.sqrt(abar_prev) / (1 - abar), rel=1e-5)
    assert tables['posterior_mean_coef2'][t] == pytest.approx(
        (1 - abar_prev) * math.sqrt(alpha) / (1 - abar), rel=1e-5, abs=1e-30)
    assert tables['sqrt_recipm1_alphas_cumprod'][t] == pytest.approx(
        math.sqrt(1 / abar - 1), rel=1e-5)
    assert tables['log_betas'][t] == pytest.approx(math.log(beta), rel=1e-5)
  # The posterior variance at t = 0 is zero; its clipped log reuses t = 1.
  assert tables['posterior_variance'][0] == 0.0
  assert tables['posterior_log_variance_clipped'][0] == tables['posterior_log_variance_clipped'][1]
  assert tables['posterior_log_variance_clipped'][1] == pytest.approx(
      math.log(tables['posterior_variance'][1]), rel=1e-5)


# ---------------------------------------------------------------- q and posterior

def test_q_sample_identity_and_inverse(cosine_diffusion):
  d = cosine_diffusion
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (B, H, W, C)).astype(np.float32)
  noise = rng.normal(size=(B, H, W, C)).astype(np.float32)
  t = np.array([0, 1, 10, 250, 500, 900], np.int32)

  @jax.jit
  def forward_and_back(d, x0, t, noise):
    x_t = d.q_sample(x0, t, noise)
    return (x_t, d.predict_x0_from_eps(x_t, t, noise), d.predict_eps_from_x0(x_t, t, x0),
            d.sigma(t), d.sigma(t, ndim=2))

  x_t, x0_back, eps_back, sigma, sigma_2d = forward_and_back(d, x0, t, noise)
  abar = np.cumprod(1 - get_beta_schedule('cosine', 1000))[t][:, None, None, None]
  np.testing.assert_allclose(x_t, np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(x0_back, x0, atol=2e-4)
  # At t = 0 eps is barely identifiable (sigma ~ 0.006): skip it.
  np.testing.assert_allclose(eps_back[1:], noise[1:], atol=2e-3)
  assert sigma.shape == (B, 1, 1, 1) and sigma_2d.shape == (B, 1)
  np.testing.assert_allclose(sigma[:, 0, 0, 0], np.sqrt(1 - abar[:, 0, 0, 0]), rtol=1e-5)


def test_q_sample_statistics(cosine_diffusion):
  d = cosine_diffusion
  n = 20000
  x0 = jnp.full((n, 1), 0.7)
  t = jnp.full((n,), 300, jnp.int32)
  x_t = np.asarray(d.q_sample(x0, t, jax.random.normal(jax.random.key(1), (n, 1))))
  abar = float(d.alphas_cumprod[300])
  assert x_t.mean() == pytest.approx(0.7 * math.sqrt(abar), abs=0.02)
  assert x_t.std() == pytest.approx(math.sqrt(1 - abar), rel=0.02)


@pytest.mark.parametrize('name,num_timesteps', [('cosine', 1000), ('linear', 50)])
def test_q_posterior_matches_bayes(name, num_timesteps):
  """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), both Gaussian."""
  betas = get_beta_schedule(name, num_timesteps)
  d = GaussianDiffusion.create(betas)
  rng = np.random.default_rng(0)
  t = np.array([1, 2, num_timesteps // 4, num_timesteps // 2, num_timesteps - 2, num_timesteps - 1])
  x0 = rng.uniform(-1, 1, (len(t), 2, 2, C))
  x_t = rng.normal(size=(len(t), 2, 2, C))
  mean, var, log_var = d.q_posterior(jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32),
                                     jnp.asarray(t, jnp.int32))
  for i, ti in enumerate(t):
    abar_prev = np.prod(1 - betas[:ti])
    alpha = 1 - betas[ti]
    precision = 1 / (1 - abar_prev) + alpha / betas[ti]
    post_var = 1 / precision
    post_mean = post_var * (math.sqrt(abar_prev) * x0[i] / (1 - abar_prev) +
                            math.sqrt(alpha) * x_t[i] / betas[ti])
    np.testing.assert_allclose(mean[i], post_mean, rtol=1e-4, atol=1e-5)
    assert float(var[i].squeeze()) == pytest.approx(post_var, rel=1e-4)
    assert float(log_var[i].squeeze()) == pytest.approx(math.log(post_var), rel=1e-4, abs=1e-5)


def test_q_posterior_at_t0_returns_x0(cosine_diffusion):
  x0 = jnp.linspace(-1, 1, 12).reshape(1, 2, 2, 3)
  mean, var, _ = cosine_diffusion.q_posterior(x0, x0 * 0.3 + 0.1, jnp.zeros((1,), jnp.int32))
  np.testing.assert_allclose(mean, x0, atol=1e-6)
  assert float(var.squeeze()) == 0.0


# ---------------------------------------------------------------- p_mean_variance

_p_mean_variance = jax.jit(GaussianDiffusion.p_mean_variance,
                           static_argnames=('learn_sigma', 'clip_denoised'))


def test_p_mean_variance_learned_range_ends(cosine_diffusion):
  d = cosine_diffusion
  t = jnp.array([0, 3, 400, 999], jnp.int32)
  x_t = jax.random.normal(jax.random.key(2), (4, 2, 2, C))
  eps = jax.random.normal(jax.random.key(3), (4, 2, 2, C))
  idx = np.asarray(t)
  for v, table in [(1.0, d.log_betas), (-1.0, d.posterior_log_variance_clipped)]:
    out = _p_mean_variance(d, jnp.concatenate([eps, jnp.full_like(eps, v)], -1), x_t, t,
                            learn_sigma=True)
    expected = np.broadcast_to(np.asarray(table)[idx][:, None, None, None], x_t.shape)
    np.testing.assert_allclose(out['log_variance'], expected, rtol=1e-6)
    np.testing.assert_allclose(out['variance'], np.exp(expected), rtol=1e-5)
  # Midpoint: the geometric mean of the two ends.
  out = _p_mean_variance(d, jnp.concatenate([eps, jnp.zeros_like(eps)], -1), x_t, t,
                          learn_sigma=True)
  mid = 0.5 * (np.asarray(d.log_betas)[idx] + np.asarray(d.posterior_log_variance_clipped)[idx])
  np.testing.assert_allclose(out['log_variance'][:, 0, 0, 0], mid, rtol=1e-6)
  # The mean is the posterior mean at the predicted x0.
  pred_x0 = d.predict_x0_from_eps(x_t, t, eps)
  np.testing.assert_allclose(out['pred_x0'], pred_x0, rtol=1e-6)
  np.testing.assert_allclose(out['mean'], d.q_posterior(pred_x0, x_t, t)[0], rtol=1e-6)
  np.testing.assert_allclose(out['eps'], eps)


def test_p_mean_variance_fixed_large_and_clipping(cosine_diffusion):
  d = cosine_diffusion
  t = jnp.array([0, 1, 500], jnp.int32)
  x_t = 3.0 * jax.random.normal(jax.random.key(4), (3, 2, 2, C))
  eps = jax.random.normal(jax.random.key(5), (3, 2, 2, C))
  out = _p_mean_variance(d, eps, x_t, t, learn_sigma=False, clip_denoised=True)
  betas = np.asarray(d.betas)
  expected = np.array([float(d.posterior_variance[1]), betas[1], betas[500]])
  np.testing.assert_allclose(out['variance'][:, 0, 0, 0], expected, rtol=1e-6)
  np.testing.assert_allclose(out['log_variance'][:, 1, 1, 2], np.log(expected), rtol=1e-5)
  assert out['variance'].shape == x_t.shape
  assert float(jnp.max(jnp.abs(out['pred_x0']))) <= 1.0
  # eps is consistent with the clipped x0.
  np.testing.assert_allclose(d.predict_x0_from_eps(x_t, t, out['eps']), out['pred_x0'], atol=1e-3)
  with pytest.raises(ValueError, match='expected 6'):
    d.p_mean_variance(eps, x_t, t, learn_sigma=True)


# ---------------------------------------------------------------- hybrid loss

_hybrid_loss = jax.jit(hybrid_loss, static_argnames=('learn_sigma', 'rescale_vb'))


def _np_cdf(x):
  return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _np_hybrid_loss(betas, model_output, x0, x_t, t, eps_target, learn_sigma, rescale_vb):
  """Float64 NumPy re-derivation of ADM's hybrid loss, per example."""
  model_output, x0, x_t, eps_target = (np.asarray(a, np.float64)
                                       for a in (model_output, x0, x_t, eps_target))
  n_steps = len(betas)
  eps = model_output[..., :C]
  mse = ((eps - eps_target) ** 2).mean(axis=(1, 2, 3))
  if not learn_sigma:
    return mse, np.zeros_like(mse)
  v = model_output[..., C:]
  vb = np.zeros(len(t))
  for i, ti in enumerate(t):
    beta, alpha = betas[ti], 1 - betas[ti]
    abar = np.prod(1 - betas[:ti + 1])
    abar_prev = np.prod(1 - betas[:ti])
    abar_1, abar_0 = np.prod(1 - betas[:2]), 1 - betas[0]
    coef1 = beta * math.sqrt(abar_prev) / (1 - abar)
    coef2 = (1 - abar_prev) * math.sqrt(alpha) / (1 - abar)
    var_1 = betas[1] * (1 - abar_0) / (1 - abar_1)
    true_var = var_1 if ti == 0 else beta * (1 - abar_prev) / (1 - abar)
    true_mean = coef1 * x0[i] + coef2 * x_t[i]
    pred_x0 = (x_t[i] - math.sqrt(1 - abar) * eps[i]) / math.sqrt(abar)
    model_mean = coef1 * pred_x0 + coef2 * x_t[i]
    frac = (v[i] + 1) / 2
    model_var = beta ** frac * true_var ** (1 - frac)
    if ti == 0:
      std = np.sqrt(model_var)
      upper = _np_cdf((x0[i] - model_mean + 1 / 255) / std)
      lower = _np_cdf((x0[i] - model_mean - 1 / 255) / std)
      prob = np.where(x0[i] < -0.999, upper, np.where(x0[i] > 0.999, 1 - lower, upper - lower))
      nats = -np.log(np.maximum(prob, 1e-12)).mean()
    else:
      kl = (0.5 * np.log(model_var / true_var) +
            (true_var + (true_mean - model_mean) ** 2) / (2 * model_var) - 0.5)
      nats = kl.mean()
    vb[i] = nats / math.log(2)
  if rescale_vb:
    vb *= n_steps / 1000
  return mse + vb, vb


def _loss_inputs(num_timesteps, learn_sigma, seed=0):
  rng = np.random.default_rng(seed)
  t = np.array([0, 0, 1, num_timesteps // 3, num_timesteps - 2, num_timesteps - 1])
  # Data on the 256-level grid, including both edges (the decoder's open-ended bins).
  x0 = rng.integers(0, 256, (B, H, W, C)) / 127.5 - 1.0
  x0[0, 0, 0] = [-1.0, 1.0, 0.0]
  noise = rng.normal(size=(B, H, W, C))
  eps_pred = noise + 0.3 * rng.normal(size=noise.shape)
  parts = [eps_pred]
  if learn_sigma:
    parts.append(rng.uniform(-1, 1, noise.shape))
  return t, x0, noise, np.concatenate(parts, -1)


@pytest.mark.parametrize('learn_sigma', [True, False])
@pytest.mark.parametrize('name,num_timesteps,rescale_vb', [
    ('cosine', 1000, True), ('linear', 50, True), ('linear', 50, False)])
def test_hybrid_loss_matches_numpy(learn_sigma, name, num_timesteps, rescale_vb):
  betas = get_beta_schedule(name, num_timesteps)
  d = GaussianDiffusion.create(betas)
  t, x0, noise, model_output = _loss_inputs(num_timesteps, learn_sigma)
  abar = np.cumprod(1 - betas)[t][:, None, None, None]
  x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
  # Perturbed off q_sample(x0), as adversarial training feeds it (scaled to the noise
  # level, so float32 keeps the t = 0 decoder's bin probabilities resolvable).
  x_t = x_t + 0.1 * np.sqrt(1 - abar) * np.random.default_rng(1).normal(size=x_t.shape)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  out = _hybrid_loss(
      d, f32(model_output), f32(x0), f32(x_t), jnp.asarray(t, jnp.int32), f32(noise),
      learn_sigma=learn_sigma, rescale_vb=rescale_vb)
  # Compare against the float32-rounded inputs the JAX side saw.
  as32 = lambda a: np.asarray(a, np.float32).astype(np.float64)
  loss, vb = _np_hybrid_loss(betas, as32(model_output), as32(x0), as32(x_t), t, as32(noise),
                             learn_sigma, rescale_vb)
  for key in ('loss', 'mse', 'vb'):
    assert out[key].shape == (B,) and out[key].dtype == jnp.float32
  np.testing.assert_allclose(out['vb'], vb, rtol=2e-3, atol=1e-5)
  np.testing.assert_allclose(out['loss'], loss, rtol=2e-3, atol=1e-5)
  np.testing.assert_allclose(out['loss'], out['mse'] + out['vb'], rtol=1e-6)
  if learn_sigma:
    assert np.all(vb > 0)


def test_hybrid_loss_computes_in_float32_from_bf16(cosine_diffusion):
  t, x0, noise, model_output = _loss_inputs(1000, True)
  x_t = jnp.asarray(x0 * 0.5 + noise * 0.8, jnp.float32)
  t = jnp.asarray(t, jnp.int32)
  bf16_out = jnp.asarray(model_output, jnp.bfloat16)
  out_bf16 = _hybrid_loss(cosine_diffusion, bf16_out, jnp.asarray(x0, jnp.float32), x_t, t,
                         jnp.asarray(noise, jnp.float32), learn_sigma=True)
  out_f32 = _hybrid_loss(cosine_diffusion, bf16_out.astype(jnp.float32),
                        jnp.asarray(x0, jnp.float32), x_t, t, jnp.asarray(noise, jnp.float32),
                        learn_sigma=True)
  for key in ('loss', 'mse', 'vb'):
    assert out_bf16[key].dtype == jnp.float32
    np.testing.assert_allclose(out_bf16[key], out_f32[key], rtol=1e-6)


def _vb_inputs(d):
  t, x0, noise, model_output = _loss_inputs(d.num_timesteps, True, seed=3)
  x_t = d.q_sample(jnp.asarray(x0, jnp.float32), jnp.asarray(t, jnp.int32),
                   jnp.asarray(noise, jnp.float32))
  return (jnp.asarray(model_output, jnp.float32), jnp.asarray(x0, jnp.float32), x_t,
          jnp.asarray(t, jnp.int32), jnp.asarray(noise, jnp.float32))


def test_vb_gradient_reaches_only_variance_channels(cosine_diffusion):
  d = cosine_diffusion
  model_output, x0, x_t, t, noise = _vb_inputs(d)
  vb_sum = lambda mo: jnp.sum(hybrid_loss(d, mo, x0, x_t, t, noise, learn_sigma=True)['vb'])
  grad = np.asarray(jax.jit(jax.grad(vb_sum))(model_output))
  assert np.all(grad[..., :C] == 0.0)
  assert np.all(np.isfinite(grad))
  # Every example (the t == 0 decoder term included) trains its variance channels.
  assert np.all(np.abs(grad[..., C:]).sum(axis=(1, 2, 3)) > 0)
  # The MSE, in turn, trains the eps channels only.
  mse_sum = lambda mo: jnp.sum(hybrid_loss(d, mo, x0, x_t, t, noise, learn_sigma=True)['mse'])
  grad_mse = np.asarray(jax.jit(jax.grad(mse_sum))(model_output))
  assert np.all(grad_mse[..., C:] == 0.0)
  assert np.any(grad_mse[..., :C] != 0.0)


def test_vb_gradient_flows_to_x_t(cosine_diffusion):
  d = cosine_diffusion
  model_output, x0, x_t, t, noise = _vb_inputs(d)
  vb_sum = jax.jit(
      lambda xt: jnp.sum(hybrid_loss(d, model_output, x0, xt, t, noise, learn_sigma=True)['vb']))
  grad = np.asarray(jax.jit(jax.grad(vb_sum))(x_t))
  assert np.all(np.isfinite(grad))
  # t > 0 examples: x_t enters the true and model posterior means with different weights.
  assert np.all(np.abs(grad[2:]).sum(axis=(1, 2, 3)) > 0)
  # Finite-difference check of the directional derivative, on the mid-range t rows
  # (t = 1, T/3) where vb is smooth on the scale of the step.
  mask = jnp.zeros((B, 1, 1, 1)).at[2:4].set(1.0)
  direction = mask * jax.random.normal(jax.random.key(7), x_t.shape)
  h = 1e-3
  fd = (vb_sum(x_t + h * direction) - vb_sum(x_t - h * direction)) / (2 * h)
  assert float(jnp.vdot(grad, direction)) == pytest.approx(float(fd), rel=2e-2)


def test_diffusion_is_a_pytree_for_jit_and_shard_map(cosine_diffusion):
  d = cosine_diffusion
  assert len(jax.tree.leaves(d)) == 14
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  n = 2 * jax.device_count()
  x0 = jnp.linspace(-1, 1, n * 4 * C).reshape(n, 2, 2, C)
  noise = jnp.ones_like(x0)
  t = jnp.arange(n, dtype=jnp.int32) * 50
  spec = jax.sharding.PartitionSpec('data')
  x0, noise, t = jax.device_put((x0, noise, t), jax.sharding.NamedSharding(mesh, spec))

  @jax.jit
  def sharded(diff, x0, noise, t):
    # Passed as an argument (replicated) and used per shard.
    return jax.shard_map(lambda a, b, c: diff.q_sample(a, c, b), mesh=mesh,
                         in_specs=(spec, spec, spec), out_specs=spec)(x0, noise, t)

  # And passed straight through shard_map as a (replicated) operand.
  @jax.jit
  def as_operand(diff, x0, noise, t):
    return jax.shard_map(lambda df, a, b, c: df.q_sample(a, c, b), mesh=mesh,
                         in_specs=(jax.sharding.PartitionSpec(), spec, spec, spec),
                         out_specs=spec)(diff, x0, noise, t)

  expected = d.q_sample(x0, t, noise)
  np.testing.assert_allclose(sharded(d, x0, noise, t), expected, rtol=1e-6)
  np.testing.assert_allclose(as_operand(d, x0, noise, t), expected, rtol=1e-6)
