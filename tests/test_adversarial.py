"""Perturbation math (balls, steps, starts) and the DPM loss's adversarial targets."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from atdiff_jax import adversarial
from atdiff_jax.objectives import dpm
from atdiff_jax.models import create_model, make_apply_fn
from atdiff_jax.diffusion import diffusion_of as make_diffusion

SHAPE = (6, 4, 4, 3)


def _ball(norm, radius=0.5, step=0.3):
  return adversarial.BallSpec(norm=norm, radius=radius, step_size=step)


def test_per_dim_radius_scales_l2_only():
  adv = ml_collections.ConfigDict(
      {'radius': 0.1, 'radius_scale': 'per_dim', 'norm': 'l2', 'step_size': 0.1})
  assert adversarial.BallSpec.from_config(adv, (32, 32, 3)).radius == pytest.approx(
      0.1 * math.sqrt(3072))  # the paper's 5.54
  adv.norm = 'linf'
  assert adversarial.BallSpec.from_config(adv, (32, 32, 3)).radius == pytest.approx(0.1)
  adv.norm, adv.radius_scale = 'l2', 'absolute'
  assert adversarial.BallSpec.from_config(adv, (32, 32, 3)).radius == pytest.approx(0.1)


@pytest.mark.parametrize('shape', [(8, 8, 1), (32, 32, 3), (64, 64, 3)])
def test_per_dim_step_is_the_absolute_step_times_sqrt_d(shape):
  """Per-pixel units give the ball and the step of the absolute form scaled by sqrt(d), and
  so one per-pixel RMS per ascent step on every image shape."""
  d = math.prod(shape)
  per_dim = ml_collections.ConfigDict({'radius': 0.1, 'radius_scale': 'per_dim', 'norm': 'l2',
                                       'step_size': 0.002, 'step_size_scale': 'per_dim'})
  absolute = ml_collections.ConfigDict({
      'radius': 0.1 * math.sqrt(d), 'radius_scale': 'absolute', 'norm': 'l2',
      'step_size': 0.002 * math.sqrt(d), 'step_size_scale': 'absolute'})
  ball = adversarial.BallSpec.from_config(per_dim, shape)
  reference = adversarial.BallSpec.from_config(absolute, shape)
  assert ball.norm == reference.norm
  assert ball.radius == pytest.approx(reference.radius, rel=1e-12)
  assert ball.step_size == pytest.approx(reference.step_size, rel=1e-12)
  grad = jax.random.normal(jax.random.key(0), (4,) + shape)
  delta = adversarial.ascent_step(jnp.zeros((4,) + shape), grad, ball)
  rms = np.sqrt(np.mean(np.square(np.asarray(delta)).reshape(4, -1), axis=1))
  np.testing.assert_allclose(rms, 0.002, rtol=1e-5)
  per_dim.norm = 'linf'  # an L-inf step is per coordinate in both units
  assert adversarial.BallSpec.from_config(per_dim, shape).step_size == pytest.approx(0.002)


def test_step_without_a_unit_field_is_absolute():
  """Runs written before step_size_scale existed keep their absolute step, bit for bit."""
  adv = ml_collections.ConfigDict(
      {'radius': 0.1, 'radius_scale': 'per_dim', 'norm': 'l2', 'step_size': 0.1})
  assert adversarial.BallSpec.from_config(adv, (32, 32, 3)).step_size == 0.1


def test_paper_strength_configs():
  """The reference-equivalent CIFAR-10 config keeps the absolute 0.1; the quickstart AT
  configs take the same strength per pixel, 0.1 / sqrt(3072)."""
  from configs import cifar10_adm_at, quickstart_at, quickstart_cd_at
  cifar = cifar10_adm_at.get_config().adv
  assert (cifar.step_size, cifar.step_size_scale) == (0.1, 'absolute')
  for module in (quickstart_at, quickstart_cd_at):
    config = module.get_config()
    ball = adversarial.BallSpec.from_config(config.adv, (8, 8, 1))
    assert ball.step_size == pytest.approx(0.1 / math.sqrt(3072) * 8)


@pytest.mark.parametrize('norm', ['l2', 'linf'])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_steps_and_starts_stay_inside_every_ball(norm, seed):
  ball = _ball(norm)
  rng = jax.random.key(seed)
  delta = adversarial.init_delta(rng, SHAPE, ball, 'uniform')
  assert np.all(adversarial.norms(delta, norm) <= ball.radius * (1 + 1e-6))
  for i in range(5):  # large random gradients push every sample to its boundary
    grad = 10 * jax.random.normal(jax.random.fold_in(rng, i), SHAPE)
    delta = adversarial.ascent_step(delta, grad, ball)
    np.testing.assert_array_less(adversarial.norms(delta, norm), ball.radius * (1 + 1e-6))
  np.testing.assert_allclose(adversarial.norms(delta, norm), ball.radius, rtol=1e-5)


def test_l2_step_is_normalised_per_sample():
  ball = _ball('l2', radius=100.0, step=0.25)
  grad = jnp.stack([jnp.full(SHAPE[1:], 1e-4), jnp.full(SHAPE[1:], 1e4)] * 3)
  step = adversarial.ascent_step(jnp.zeros(SHAPE), grad, ball)
  np.testing.assert_allclose(adversarial.l2_norms(step), 0.25, rtol=1e-5)


@pytest.mark.parametrize('norm', ['l2', 'linf'])
def test_scale_multiplies_each_samples_radius_and_step(norm):
  ball = _ball(norm, radius=0.5, step=0.5)
  scale = jnp.array([0.0, 0.1, 0.5, 1.0, 2.0, 0.3])[:, None, None, None]
  grad = jax.random.normal(jax.random.key(1), SHAPE)
  delta = adversarial.ascent_step(jnp.zeros(SHAPE), grad, ball, scale)
  # One step of the radius's length from 0 ends on each scaled boundary; scale 0 stays at 0.
  np.testing.assert_allclose(adversarial.norms(delta, norm), 0.5 * scale[:, 0, 0, 0],
                             rtol=1e-5)
  assert not np.any(np.asarray(delta[0]))


def test_linf_step_is_sign_and_clip():
  ball = _ball('linf', radius=0.5, step=0.3)
  grad = jax.random.normal(jax.random.key(0), SHAPE)
  delta = adversarial.ascent_step(jnp.full(SHAPE, 0.4), grad, ball)
  expected = np.clip(0.4 + 0.3 * np.sign(np.asarray(grad)), -0.5, 0.5)
  np.testing.assert_allclose(delta, expected, rtol=1e-6)


def test_uniform_l2_start_fills_the_ball():
  ball = _ball('l2', radius=2.0)
  delta = adversarial.init_delta(jax.random.key(0), (512, 2, 1, 1), ball, 'uniform')
  radii = np.asarray(adversarial.l2_norms(delta))
  assert radii.max() <= 2.0 and radii.min() >= 0.0
  # In 2-D, uniform in the disc means P(r < R/2) = 1/4.
  assert abs(np.mean(radii < 1.0) - 0.25) < 0.06


def test_zero_start_and_zero_radius_are_zero():
  for ball, init in ((_ball('l2'), 'zero'), (_ball('linf', radius=0.0), 'uniform')):
    assert not np.any(adversarial.init_delta(jax.random.key(0), SHAPE, ball, init))


# --- the DPM objective's targets ------------------------------------------------------


def test_target_variants_match_their_formulas():
  rng = np.random.default_rng(0)
  noise, x_t, delta = (jnp.asarray(rng.standard_normal(SHAPE), jnp.float32) for _ in range(3))
  sigma = jnp.asarray(rng.uniform(0.1, 1.0, (SHAPE[0], 1, 1, 1)), jnp.float32)
  target, x_vb = dpm.eps_target_and_vb_input('original', noise, x_t, delta, sigma)
  np.testing.assert_array_equal(target, noise)
  np.testing.assert_array_equal(x_vb, x_t)
  for variant in ('delta', 'delta_detach'):
    target, x_vb = dpm.eps_target_and_vb_input(variant, noise, x_t, delta, sigma)
    np.testing.assert_allclose(target, noise + delta / sigma, rtol=1e-6)
    np.testing.assert_allclose(x_vb, x_t + delta, rtol=1e-6)
  # The target's gradient in delta: 1/sigma with 'delta', none at all with 'delta_detach'.
  grad = lambda v: jax.grad(lambda d: jnp.sum(
      dpm.eps_target_and_vb_input(v, noise, x_t, d, sigma)[0]))(delta)
  np.testing.assert_allclose(grad('delta'), jnp.broadcast_to(1 / sigma, SHAPE), rtol=1e-6)
  assert not np.any(grad('delta_detach'))


@pytest.fixture(scope='module')
def fixed_model_and_batch():
  """A micro U-Net with params pushed off the zero init, so its output depends on x."""
  import conftest  # pylint: disable=g-import-not-at-top
  config = conftest.tiny_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  model = create_model(config)
  params = model.init({'params': jax.random.key(0)}, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)),
                      train=False)['params']
  params = jax.tree.map(
      lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
  rng = np.random.default_rng(1)
  batch = {
      'x0': jnp.asarray(rng.uniform(-1, 1, (8, 8, 8, 1)), jnp.float32),
      't': jnp.asarray(rng.integers(1, 100, 8), jnp.int32),
      'noise': jnp.asarray(rng.standard_normal((8, 8, 8, 1)), jnp.float32),
      'weights': jnp.ones((8,)),
  }
  return config, model, params, batch


def _loss_fn(config, model, target):
  return dpm.make_loss_fn(make_apply_fn(model), make_diffusion(config), learn_sigma=True,
                          rescale_vb=True, target=target, train=False)


@pytest.mark.parametrize('norm', ['l2', 'linf'])
def test_one_ascent_step_raises_the_loss(fixed_model_and_batch, norm):
  config, model, params, batch = fixed_model_and_batch
  loss_fn = jax.jit(_loss_fn(config, model, 'original'))
  ball = adversarial.BallSpec(norm=norm, radius=0.05, step_size=0.05 if norm == 'l2' else 0.01)
  delta = jnp.zeros_like(batch['x0'])
  grad = jax.grad(lambda d: loss_fn(params, batch, d, None)[0])(delta)
  stepped = adversarial.ascent_step(delta, grad, ball)
  clean = loss_fn(params, batch, delta, None)[0]
  assert loss_fn(params, batch, stepped, None)[0] > clean
  # ... and the per-example losses rise too, not only their mean.
  assert np.mean(loss_fn(params, batch, stepped, None)[1]['losses']
                 > loss_fn(params, batch, delta, None)[1]['losses']) >= 0.75


def test_delta_detach_gradient_reaches_delta_only_through_the_model(fixed_model_and_batch):
  config, model, params, batch = fixed_model_and_batch
  delta = 0.01 * jax.random.normal(jax.random.key(3), batch['x0'].shape)
  detached = _loss_fn(config, model, 'delta_detach')
  grad = jax.grad(lambda d: detached(params, batch, d, None)[0])(delta)

  # The same loss with the target (and VB input) frozen at delta's value: only the model
  # input carries delta. Its gradient must equal delta_detach's.
  diffusion = make_diffusion(config)
  apply_fn = make_apply_fn(model)

  def model_path_only(d):
    x_t = diffusion.q_sample(batch['x0'], batch['t'], batch['noise'])
    target = batch['noise'] + delta / diffusion.sigma(batch['t'])
    from atdiff_jax.diffusion import hybrid_loss  # pylint: disable=g-import-not-at-top
    out = apply_fn(params, x_t + d, batch['t'])
    terms = hybrid_loss(diffusion, out, batch['x0'], x_t + delta, batch['t'], target,
                        learn_sigma=True, rescale_vb=True)
    return jnp.mean(terms['loss'])

  np.testing.assert_allclose(grad, jax.grad(model_path_only)(delta), rtol=1e-4, atol=1e-9)
  with_target = _loss_fn(config, model, 'delta')
  grad_delta = jax.grad(lambda d: with_target(params, batch, d, None)[0])(delta)
  assert np.max(np.abs(grad_delta - grad)) > 1e-3 * np.max(np.abs(grad))
