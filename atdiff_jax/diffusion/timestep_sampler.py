"""Timestep samplers: uniform, and ADM's loss-second-moment importance sampler.

Samplers are functional: the adaptive one carries a small state pytree that the
training state holds, so sampling and updating run inside the compiled step.
Each returns importance weights w with E[w * f(t)] = mean_t f(t).
"""
import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

TIMESTEP_SAMPLERS = ('uniform', 'loss_second_moment')


def sample_uniform(rng: Array, batch_size: int, num_timesteps: int) -> tuple[Array, Array]:
  """t ~ U{0, ..., T-1} as int32 (B,), with unit float32 weights."""
  t = jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
  return t, jnp.ones((batch_size,), jnp.float32)


@flax.struct.dataclass
class LossSecondMomentState:
  """Recent losses per timestep: history (T, H) float32, and how many are filled (T,)."""
  history: Array
  counts: Array


def init_loss_second_moment(num_timesteps: int,
                            history_per_term: int = 10) -> LossSecondMomentState:
  """An empty history; the sampler is uniform until every timestep has H losses."""
  return LossSecondMomentState(
      history=jnp.zeros((num_timesteps, history_per_term), jnp.float32),
      counts=jnp.zeros((num_timesteps,), jnp.int32))


def is_warm(state: LossSecondMomentState) -> Array:
  """True once every timestep's history is full."""
  return jnp.all(state.counts >= state.history.shape[1])


def loss_second_moment_probs(state: LossSecondMomentState,
                             uniform_prob: float = 0.001) -> Array:
  """Sampling probabilities p (T,): uniform until warm, then p_t ∝ sqrt(E[loss_t^2]).

  Once warm, uniform_prob of the mass is spread evenly so no timestep starves.
  """
  num_timesteps = state.history.shape[0]
  uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps, jnp.float32)
  rms = jnp.sqrt(jnp.mean(jnp.square(state.history), axis=-1))
  total = jnp.sum(rms)
  # Guard the division: a cold or all-zero history falls back to uniform.
  warm_p = rms / jnp.where(total > 0, total, 1.0)
  warm_p = warm_p * (1.0 - uniform_prob) + uniform_prob / num_timesteps
  return jnp.where(is_warm(state) & (total > 0), warm_p, uniform)


def sample_loss_second_moment(state: LossSecondMomentState, rng: Array, batch_size: int,
                              uniform_prob: float = 0.001) -> tuple[Array, Array]:
  """Draws t (int32 (B,)) with importance weights 1 / (T p_t) (float32 (B,))."""
  num_timesteps = state.history.shape[0]
  p = loss_second_moment_probs(state, uniform_prob)
  t = jax.random.choice(rng, num_timesteps, (batch_size,), replace=True, p=p).astype(jnp.int32)
  weights = 1.0 / (num_timesteps * p[t])
  # Exactly 1 in the uniform phase (not 1 +- rounding).
  weights = jnp.where(is_warm(state), weights, 1.0).astype(jnp.float32)
  return t, weights


def update_loss_second_moment(state: LossSecondMomentState, t: Array,
                              losses: Array) -> LossSecondMomentState:
  """Pushes each (t_i, loss_i) into t_i's history, in batch order.

  A full history drops its oldest loss (shift left, write at the end); otherwise the
  loss goes to the next free slot. Pass the global batch (all devices) of per-example
  losses before importance weighting.
  """
  history_len = state.history.shape[1]
  t = jnp.asarray(t, jnp.int32).reshape(-1)
  losses = jax.lax.stop_gradient(jnp.asarray(losses, jnp.float32)).reshape(-1)

  def push(carry, item):
    history, counts = carry
    ti, loss = item
    count = counts[ti]
    row = history[ti]
    full = count >= history_len
    shifted = jnp.concatenate([row[1:], loss[None]])
    written = row.at[jnp.minimum(count, history_len - 1)].set(loss)
    history = history.at[ti].set(jnp.where(full, shifted, written))
    counts = counts.at[ti].set(jnp.where(full, count, count + 1))
    return (history, counts), None

  (history, counts), _ = jax.lax.scan(push, (state.history, state.counts), (t, losses))
  return LossSecondMomentState(history=history, counts=counts)


@dataclasses.dataclass(frozen=True)
class TimestepSampler:
  """One interface for all samplers, so the training step treats them alike.

  state = sampler.init(); t, w = sampler.sample(state, rng, B);
  state = sampler.update(state, t, losses). The uniform sampler's state is an empty
  tuple and its update is the identity.
  """
  name: str
  num_timesteps: int
  uniform_prob: float = 0.001
  history_per_term: int = 10

  @property
  def is_adaptive(self) -> bool:
    """Whether update() does anything (callers can skip gathering losses otherwise)."""
    return self.name == 'loss_second_moment'

  def init(self) -> Any:
    if self.is_adaptive:
      return init_loss_second_moment(self.num_timesteps, self.history_per_term)
    return ()

  def sample(self, state: Any, rng: Array, batch_size: int) -> tuple[Array, Array]:
    if self.is_adaptive:
      return sample_loss_second_moment(state, rng, batch_size, self.uniform_prob)
    return sample_uniform(rng, batch_size, self.num_timesteps)

  def update(self, state: Any, t: Array, losses: Array) -> Any:
    if self.is_adaptive:
      return update_loss_second_moment(state, t, losses)
    return state


def make_timestep_sampler(name: str, num_timesteps: int, *, uniform_prob: float = 0.001,
                          history_per_term: int = 10) -> TimestepSampler:
  """Builds a sampler by name: 'uniform' or 'loss_second_moment'."""
  if name not in TIMESTEP_SAMPLERS:
    raise ValueError(f'Unknown timestep sampler {name!r}; allowed values: '
                     f'{", ".join(TIMESTEP_SAMPLERS)}.')
  if num_timesteps < 1:
    raise ValueError(f'num_timesteps must be positive, got {num_timesteps}.')
  if not 0.0 <= uniform_prob <= 1.0:
    raise ValueError(f'uniform_prob must lie in [0, 1], got {uniform_prob}.')
  if history_per_term < 1:
    raise ValueError(f'history_per_term must be positive, got {history_per_term}.')
  return TimestepSampler(name=name, num_timesteps=num_timesteps, uniform_prob=uniform_prob,
                         history_per_term=history_per_term)
