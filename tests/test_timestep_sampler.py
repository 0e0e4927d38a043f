"""Tests for the uniform and loss-second-moment timestep samplers."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atdiff_jax.diffusion import (
    TIMESTEP_SAMPLERS,
    LossSecondMomentState,
    init_loss_second_moment,
    is_warm,
    loss_second_moment_probs,
    make_timestep_sampler,
    sample_loss_second_moment,
    sample_uniform,
    update_loss_second_moment,
)

_sample = jax.jit(sample_loss_second_moment, static_argnames=('batch_size', 'uniform_prob'))
_update = jax.jit(update_loss_second_moment)


def _reference_update(history, counts, ts, losses):
  """ADM's update loop, in plain Python."""
  history, counts = history.copy(), counts.copy()
  history_len = history.shape[1]
  for t, loss in zip(ts, losses):
    if counts[t] == history_len:
      history[t, :-1] = history[t, 1:]
      history[t, -1] = loss
    else:
      history[t, counts[t]] = loss
      counts[t] += 1
  return history, counts


def _warm_state(rms_per_t, history_len=10):
  """A full history whose per-timestep RMS equals rms_per_t."""
  history = np.repeat(np.asarray(rms_per_t, np.float32)[:, None], history_len, axis=1)
  history[:, ::2] *= -1  # signs must not matter: it is a second moment
  return LossSecondMomentState(history=jnp.asarray(history),
                               counts=jnp.full((len(rms_per_t),), history_len, jnp.int32))


def test_sample_uniform():
  t, w = jax.jit(sample_uniform, static_argnums=(1, 2))(jax.random.key(0), 4000, 5)
  assert t.dtype == jnp.int32 and t.shape == (4000,)
  assert w.dtype == jnp.float32 and np.all(np.asarray(w) == 1.0)
  counts = np.bincount(np.asarray(t), minlength=5)
  assert counts.shape == (5,) and np.all(np.abs(counts - 800) < 130)


def test_uniform_until_every_history_is_full():
  state = init_loss_second_moment(4, history_per_term=2)
  assert state.history.shape == (4, 2) and state.history.dtype == jnp.float32
  assert state.counts.dtype == jnp.int32
  # Huge losses at t = 0..2 (full), t = 3 still one short: must stay uniform.
  state = _update(state, jnp.array([0, 0, 1, 1, 2, 2, 3]), jnp.array([100., 100, 50, 50, 9, 9, 1]))
  assert not bool(is_warm(state))
  np.testing.assert_allclose(loss_second_moment_probs(state), np.full(4, 0.25))
  t, w = _sample(state, jax.random.key(1), 4000)
  assert np.all(np.asarray(w) == 1.0)
  counts = np.bincount(np.asarray(t), minlength=4)
  assert np.all(np.abs(counts - 1000) < 150)
  # One more loss at t = 3 warms it up, and the sampling follows the losses.
  state = _update(state, jnp.array([3]), jnp.array([1.0]))
  assert bool(is_warm(state))
  t, w = _sample(state, jax.random.key(2), 4000)
  counts = np.bincount(np.asarray(t), minlength=4)
  assert counts[0] > counts[1] > counts[2] > counts[3]


def test_update_semantics_with_duplicates_and_wrap_around():
  state = init_loss_second_moment(3, history_per_term=3)
  state = _update(state, jnp.array([0, 0, 1]), jnp.array([1., 2, 3]))
  np.testing.assert_array_equal(state.history, [[1, 2, 0], [3, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(state.counts, [2, 1, 0])
  # Fills t = 0, then wraps twice: the later duplicate is pushed after the earlier one.
  state = _update(state, jnp.array([0, 0, 0]), jnp.array([4., 5, 6]))
  np.testing.assert_array_equal(state.history[0], [4, 5, 6])
  np.testing.assert_array_equal(state.counts, [3, 1, 0])


def test_update_matches_reference_loop():
  num_timesteps, history_len = 5, 3
  rng = np.random.default_rng(0)
  state = init_loss_second_moment(num_timesteps, history_len)
  history = np.zeros((num_timesteps, history_len), np.float32)
  counts = np.zeros(num_timesteps, np.int64)
  for _ in range(4):
    ts = rng.integers(0, num_timesteps, 16)  # many duplicates per batch
    losses = rng.uniform(0, 2, 16).astype(np.float32)
    state = _update(state, jnp.asarray(ts, jnp.int32), jnp.asarray(losses))
    history, counts = _reference_update(history, counts, ts, losses)
    np.testing.assert_array_equal(state.history, history)
    np.testing.assert_array_equal(state.counts, counts)
  assert counts.max() == history_len  # some rows did wrap around


def test_warm_probabilities_and_unbiased_weights():
  rms = np.array([1.0, 2.0, 4.0, 8.0, 0.0])
  state = _warm_state(rms)
  uniform_prob = 0.01
  p = np.asarray(loss_second_moment_probs(state, uniform_prob), np.float64)
  expected = rms / rms.sum() * (1 - uniform_prob) + uniform_prob / len(rms)
  np.testing.assert_allclose(p, expected, rtol=1e-6)
  t, w = _sample(state, jax.random.key(3), 20000, uniform_prob)
  t, w = np.asarray(t), np.asarray(w, np.float64)
  # Weights are 1 / (T p_t), so the weighted mean is exactly unbiased in expectation.
  np.testing.assert_allclose(w, 1.0 / (len(rms) * expected[t]), rtol=1e-5)
  f = np.array([3.0, -1.0, 0.5, 2.0, 7.0])
  assert np.sum(expected * (1.0 / (len(rms) * expected)) * f) == pytest.approx(f.mean())
  # Empirically: frequencies follow p, and the weighted estimate is close to the mean.
  freq = np.bincount(t, minlength=len(rms)) / len(t)
  np.testing.assert_allclose(freq, expected, atol=0.015)
  # Tolerance: 4 standard errors of the estimator (large: t = 4 is rare and heavy).
  exact_w = 1.0 / (len(rms) * expected)
  std_err = np.sqrt((np.sum(expected * (exact_w * f) ** 2) - f.mean() ** 2) / len(t))
  assert np.mean(w * f[t]) == pytest.approx(f.mean(), abs=4 * std_err)
  # Without the weights the estimate is biased towards the frequent timesteps.
  assert abs(np.mean(f[t]) - f.mean()) > 4 * std_err


@pytest.mark.parametrize('name', TIMESTEP_SAMPLERS)
def test_front_end_is_jittable(name):
  sampler = make_timestep_sampler(name, 6, history_per_term=2)
  state = sampler.init()

  @functools.partial(jax.jit, static_argnums=2)
  def step(state, rng, batch_size):
    t, w = sampler.sample(state, rng, batch_size)
    return sampler.update(state, t, 1.0 + t.astype(jnp.float32)), t, w

  rng = jax.random.key(4)
  for _ in range(8):
    rng, key = jax.random.split(rng)
    state, t, w = step(state, key, 8)
    assert t.shape == (8,) and t.dtype == jnp.int32 and w.dtype == jnp.float32
    assert np.all((np.asarray(t) >= 0) & (np.asarray(t) < 6))
  if name == 'uniform':
    assert state == () and not sampler.is_adaptive
  else:
    assert sampler.is_adaptive and bool(is_warm(state))
    # Losses are 1 + t, so later timesteps now get larger weight in p (smaller w).
    p = np.asarray(loss_second_moment_probs(state, sampler.uniform_prob))
    assert np.all(np.diff(p) > 0)


def test_make_timestep_sampler_rejects_unknown_names():
  with pytest.raises(ValueError, match='uniform, loss_second_moment'):
    make_timestep_sampler('importance', 10)
  with pytest.raises(ValueError, match='uniform_prob'):
    make_timestep_sampler('loss_second_moment', 10, uniform_prob=2.0)
