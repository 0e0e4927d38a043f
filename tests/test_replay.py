"""Adversarial replays inside the compiled step: free, PGD, FGSM against the standard step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import conftest
from atdiff_jax import replay
from atdiff_jax.config import updates_per_minibatch
from atdiff_jax.diffusion import diffusion_of as make_diffusion
from atdiff_jax.parallel import make_mesh
from atdiff_jax.train_step import TrainParts, create_train_state, make_train_step


def micro_config(**adv):
  config = conftest.tiny_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  config.adv.update(adv)
  return config


TOY = conftest.ToyDenoiser()


def _batch(mesh, config, seed=0):
  rng = np.random.default_rng(seed)
  b, s = config.training.batch_size, config.data.image_size
  sharding = NamedSharding(mesh, P('data'))
  return {'image': jax.device_put(rng.uniform(-1, 1, (b, s, s, 1)).astype(np.float32), sharding),
          'label': jax.device_put(np.zeros((b,), np.int32), sharding)}


def _warm_params(state, seed=0):
  """Moves params off ADM's zero-initialised output so the input gradient is non-zero."""
  params = jax.tree.map(
      lambda p: p + 0.02 * jax.random.normal(jax.random.key(seed + p.size), p.shape,
                                              p.dtype), state.params)
  return state.replace(params=params)


def _step(config, devices=None, tx=None, warm=True, seed=0, model=TOY):
  """One call of the real train step; `model=None` uses the config's U-Net."""
  mesh = make_mesh(devices)
  parts = TrainParts.build(config, model, tx)
  state = create_train_state(config, mesh, parts)
  state = _warm_params(state) if warm else state
  step = make_train_step(config, mesh, parts)
  state, metrics = step(state, _batch(mesh, config, seed))
  return jax.device_get(state), jax.device_get(metrics)



def test_free_with_one_pass_is_the_standard_step():
  standard, m_std = _step(micro_config(method='none'))
  free, m_free = _step(micro_config(method='free', steps=1, radius=0.3))
  conftest.assert_trees_equal(standard, free)
  assert m_std['loss'] == m_free['loss']


@pytest.mark.parametrize('method', ['free', 'pgd', 'fgsm'])
def test_zero_radius_gives_the_standard_loss(method):
  _, m_std = _step(micro_config(method='none'))
  _, m = _step(micro_config(method=method, steps=2, radius=0.0, init='uniform'))
  assert m['delta_over_radius'] == 0.0
  np.testing.assert_allclose(m['clean_loss'], m_std['loss'], rtol=1e-6)
  if method != 'free':  # the one update is taken on delta = 0, as the standard step
    np.testing.assert_allclose(m['loss'], m_std['loss'], rtol=1e-6)


@pytest.mark.parametrize('method,norm', [('free', 'l2'), ('free', 'linf'), ('pgd', 'l2'),
                                         ('pgd', 'linf'), ('fgsm', 'linf')])
def test_adversarial_pass_raises_the_loss_and_stays_in_the_ball(method, norm):
  radius = 0.3 if norm == 'l2' else 0.05
  config = micro_config(method=method, norm=norm, steps=3, radius=radius, step_size=radius,
                        radius_scale='absolute', init='zero')
  # SGD with lr 0: params frozen, so losses differ only by delta.
  _, m = _step(config, tx=optax.sgd(0.0))
  assert 0.5 < m['delta_over_radius'] <= 1.0 + 1e-5
  assert m['loss'] > m['clean_loss']
  assert m['grad_delta_norm'] > 0


def test_free_makes_k_updates_and_k_ema_updates():
  k, rate = 3, 0.5
  config = micro_config(method='free', steps=k)
  config.training.ema_rates = (rate,)
  # An optimizer that adds exactly 1 to every param shows each update separately.
  plus_one = optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (jax.tree.map(jnp.ones_like, updates), state))
  mesh = make_mesh()
  start = jax.device_get(create_train_state(config, mesh, TrainParts.build(config, TOY, plus_one)))
  state, _ = _step(config, tx=plus_one, warm=False)
  assert int(state.step) == 1 and int(state.opt_step) == k == updates_per_minibatch(config)
  expected_ema = lambda p0: rate**k * p0 + sum(
      (1 - rate) * rate**(k - i) * (p0 + i) for i in range(1, k + 1))
  for p0, p, e in zip(*(jax.tree.leaves(t) for t in (start.params, state.params,
                                                      state.ema_params[0]))):
    np.testing.assert_allclose(p, p0 + k, rtol=1e-6)
    np.testing.assert_allclose(e, expected_ema(p0), rtol=1e-5, atol=1e-6)


def test_timestep_sampler_sees_every_adversarial_pass():
  config = micro_config(method='free', steps=3)
  config.training.timestep_sampler = 'loss_second_moment'
  state, _ = _step(config)
  assert int(np.sum(state.objective_state.counts)) == 3 * config.training.batch_size


def test_t_range_limits_which_examples_are_perturbed():
  config = micro_config(method='pgd', steps=1, radius=0.3, step_size=0.3,
                        radius_scale='absolute')
  _, everywhere = _step(config)
  config.adv.t_range = (0, 49)
  _, lower_half = _step(config)
  assert everywhere['perturbed_fraction'] == 1.0
  assert 0.0 < lower_half['perturbed_fraction'] < 1.0
  # Every perturbed example took one full step to its boundary; the others none.
  np.testing.assert_allclose(lower_half['delta_over_radius'], 1.0, rtol=1e-5)


@pytest.mark.parametrize('method', ['free', 'pgd'])
def test_eight_devices_match_one(method):
  config = micro_config(method=method, steps=2, norm='l2', radius=0.3,
                        radius_scale='absolute', init='uniform')
  tx = optax.sgd(0.05)
  # The toy denoiser: the U-Net's 8-vs-1 device test is in test_train_step.py.
  state8, m8 = _step(config, jax.devices(), tx=tx)
  state1, m1 = _step(config, jax.devices()[:1], tx=tx)
  np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  np.testing.assert_allclose(m8['delta_over_radius'], m1['delta_over_radius'], rtol=1e-4)
  conftest.assert_trees_equal(state8.params, state1.params, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('schedule', ['constant', 'sigma'])
def test_sigma_radius_schedule_scales_each_ball_by_sigma_t(schedule):
  # Only t = 2 is perturbed, and one PGD step of the radius's length reaches the boundary:
  # every perturbed delta has norm radius (constant) or radius * sigma_2 (sigma).
  config = micro_config(method='pgd', steps=1, radius=0.3, step_size=0.3,
                        radius_scale='absolute', t_range=(2, 2), radius_schedule=schedule)
  config.diffusion.num_timesteps = 4
  _, m = _step(config)
  assert 0.0 < m['perturbed_fraction'] < 1.0
  sigma_2 = float(make_diffusion(config).sigma(np.array([2]), ndim=1)[0])
  assert 0.1 < sigma_2 < 0.99
  expected = 0.3 * (sigma_2 if schedule == 'sigma' else 1.0)
  np.testing.assert_allclose(m['delta_norm'], expected, rtol=1e-5)
  np.testing.assert_allclose(m['delta_over_radius'], 1.0, rtol=1e-5)


@pytest.mark.parametrize('method', ['free', 'pgd'])
def test_rolled_loop_runs_the_same_passes_as_unrolled(method):
  # t >= 20: at the smallest t the target's delta / sigma_t (sigma ~ 0.01) magnifies the two
  # programs' rounding differences in delta a hundredfold.
  config = micro_config(method=method, steps=3, radius=0.3, step_size=0.2,
                        radius_scale='absolute', init='uniform', t_range=(20, -1))
  tx = optax.sgd(0.05)  # Adam would magnify rounding differences of near-zero gradients
  config.adv.replay_loop = 'unrolled'
  unrolled, m_unrolled = _step(config, tx=tx)
  config.adv.replay_loop = 'rolled'
  rolled, m_rolled = _step(config, tx=tx)
  assert int(rolled.opt_step) == int(unrolled.opt_step) == updates_per_minibatch(config)
  for key in ('loss', 'clean_loss', 'delta_over_radius', 'delta_norm', 'grad_delta_norm'):
    np.testing.assert_allclose(m_rolled[key], m_unrolled[key], rtol=1e-5, err_msg=key)
  assert m_rolled['nonfinite'] == m_unrolled['nonfinite'] == 0
  conftest.assert_trees_equal(rolled, unrolled, rtol=1e-5, atol=1e-6)


def test_auto_loop_unrolls_on_cpu_only(caplog):
  assert replay.resolve_loop('auto', 'cpu') == 'unrolled'
  assert replay.resolve_loop('auto', 'gpu') == replay.resolve_loop('auto', 'tpu') == 'rolled'
  assert replay.resolve_loop('rolled', 'cpu') == 'rolled'
  with pytest.raises(ValueError, match='replay loop'):
    replay.resolve_loop('scan')
  # K = 10000 unrolled would compile for hours: auto rolls it, and says so.
  assert replay.resolve_loop('auto', 'cpu', 16) == 'unrolled'
  with caplog.at_level('WARNING'):
    assert replay.resolve_loop('auto', 'cpu', 10_000) == 'rolled'
  assert '10000 passes per minibatch: a rolled loop' in caplog.text
