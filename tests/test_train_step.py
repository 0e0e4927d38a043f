"""The compiled data-parallel step: device-count invariance and the standard update."""
import jax
import numpy as np
import optax

import conftest
from jax.sharding import NamedSharding, PartitionSpec as P

from atdiff_jax.parallel import make_mesh
from atdiff_jax.train_step import TrainParts, create_train_state, make_train_step


def _batch(mesh, config, seed=0):
  rng = np.random.default_rng(seed)
  b, s, c = config.training.batch_size, config.data.image_size, config.data.channels
  images = rng.uniform(-1, 1, (b, s, s, c)).astype(np.float32)
  labels = rng.integers(0, 10, (b,)).astype(np.int32)
  sharding = NamedSharding(mesh, P('data'))
  return {'image': jax.device_put(images, sharding), 'label': jax.device_put(labels, sharding)}


def _run(config, devices, num_steps=2):
  mesh = make_mesh(devices)
  # SGD keeps the comparison about data parallelism: Adam's first step is sign(g) and
  # would amplify float-rounding differences in near-zero gradients.
  tx = optax.sgd(0.05)
  parts = TrainParts.build(config, tx=tx)
  state = create_train_state(config, mesh, parts)
  step = make_train_step(config, mesh, parts)
  losses = []
  for i in range(num_steps):
    state, metrics = step(state, _batch(mesh, config, seed=i))
    losses.append(float(metrics['loss']))
  return jax.device_get(state), losses


def test_eight_devices_match_one(config):
  """Standard training with the loss-history sampler and labels (AT: test_replay.py)."""
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()  # the U-Net, compiled twice
  config.training.timestep_sampler = 'loss_second_moment'
  config.model.num_classes = 10
  state8, losses8 = _run(config, jax.devices())
  state1, losses1 = _run(config, jax.devices()[:1])
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state8.objective_state), jax.tree.leaves(state1.objective_state)):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  assert int(state8.step) == 2 and int(state8.opt_step) == 2


def test_step_updates_params_ema_and_counters(config):
  config.training.ema_rates = (0.5, 0.0)
  mesh = make_mesh()
  model = conftest.ToyDenoiser()
  parts = TrainParts.build(config, model)
  state = create_train_state(config, mesh, parts)
  before = jax.device_get(state.params)
  step = make_train_step(config, mesh, parts)
  state, metrics = step(state, _batch(mesh, config))
  after = jax.device_get(state.params)
  assert np.isfinite(float(metrics['loss']))
  assert int(state.step) == 1 and int(state.opt_step) == 1
  assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                      jax.tree.leaves(after)))
  # EMA with rate r: r * old + (1 - r) * new; rate 0 tracks params exactly.
  for e_half, e_zero, p_old, p_new in zip(*(jax.tree.leaves(t) for t in (
      state.ema_params[0], state.ema_params[1], before, after))):
    np.testing.assert_allclose(e_half, 0.5 * p_old + 0.5 * p_new, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(e_zero, p_new)


def test_stacked_minibatches_run_as_consecutive_calls(config):
  """One call over 3 stacked minibatches (training.minibatches_per_call) equals 3 calls: the
  same per-minibatch losses, draws (the step counter advances inside the scan) and state,
  with free AT, over 8 devices."""
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  config.training.timestep_sampler = 'loss_second_moment'
  config.adv.method, config.adv.steps = 'free', 2
  mesh = make_mesh()
  parts = TrainParts.build(config, tx=optax.sgd(0.05))  # see _run: no sign(g) amplification
  step = make_train_step(config, mesh, parts)
  batches = [_batch(mesh, config, seed=i) for i in range(3)]
  state = create_train_state(config, mesh, parts)
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  one_by_one = jax.device_get(state)

  stacked = {k: jax.device_put(np.stack([np.asarray(b[k]) for b in batches]),
                               NamedSharding(mesh, P(None, 'data'))) for k in batches[0]}
  state, metrics = step(create_train_state(config, mesh, parts), stacked)
  assert metrics['loss'].shape == (3,)
  np.testing.assert_allclose(metrics['loss'], losses, rtol=1e-5)
  assert int(state.step) == 3 and int(state.opt_step) == 6
  for a, b in zip(jax.tree.leaves(one_by_one), jax.tree.leaves(jax.device_get(state))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
