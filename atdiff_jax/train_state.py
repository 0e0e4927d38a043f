"""Everything that changes during training, in one pytree: checkpoint and resume are one call."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


# Why a run must stop (Guard.stop_reason).
STOP_NONFINITE = 1  # training.stop_after_nonfinite minibatches in a row had an update skipped
STOP_DIVERGED = 2   # an update larger than training.max_update_ratio times the params


@flax.struct.dataclass
class Guard:
  """The step's own watch over the run, carried in-graph so that the host reads it only
  where it logs, saves or samples, yet learns the exact minibatch that went wrong."""
  nonfinite_streak: jax.Array  # minibatches in a row with an update skipped as non-finite
  stop_at: jax.Array           # 0, or the first minibatch (1-based) that stops the run
  stop_reason: jax.Array       # STOP_NONFINITE | STOP_DIVERGED; 0 while stop_at is 0
  update_ratio: jax.Array      # STOP_DIVERGED: |update| / |params| of that minibatch

  @classmethod
  def create(cls) -> 'Guard':
    zero = jnp.zeros((), jnp.int32)
    return cls(zero, zero, zero, jnp.zeros((), jnp.float32))

  def stop(self, minibatch: jax.Array, reason: int, when: jax.Array,
           update_ratio: jax.Array | float = 0.0) -> 'Guard':
    """This guard with the run stopped at `minibatch` for `reason` where `when` holds,
    unless an earlier minibatch stopped it already."""
    first = when & (self.stop_at == 0)
    return self.replace(
        stop_at=jnp.where(first, minibatch, self.stop_at).astype(jnp.int32),
        stop_reason=jnp.where(first, reason, self.stop_reason).astype(jnp.int32),
        update_ratio=jnp.where(first, update_ratio, self.update_ratio).astype(jnp.float32))


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # minibatches consumed: the position in the data stream
  opt_step: jax.Array      # optimizer updates (free AT makes K of them per minibatch)
  params: Any
  opt_state: Any
  ema_params: tuple        # one params tree per rate in config.training.ema_rates
  # The objective's own state (objectives/base.py): the DPM's timestep-sampler loss history
  # (() when uniform), a consistency model's target params. Checkpoints written before it
  # had this name call it sampler_state (checkpoint.py reads both).
  objective_state: Any
  # Checkpoints written before the guard existed restore it as zeros (checkpoint.py).
  guard: Guard

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, num_ema: int,
             objective_state) -> 'TrainState':
    return cls(
        step=jnp.zeros((), jnp.int32),
        opt_step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=tuple(jax.tree.map(jnp.copy, params) for _ in range(num_ema)),
        objective_state=objective_state,
        guard=Guard.create(),
    )


def apply_update(state: TrainState, grads, tx: optax.GradientTransformation,
                 ema_rates: tuple[float, ...],
                 max_update_ratio: float = 0.0) -> TrainState:
  """One optimizer update followed by one EMA update for each rate. With
  `max_update_ratio`, an update whose global norm exceeds that multiple of the params'
  stops the run at this minibatch (in state.guard): finite, yet diverging."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  guard = state.guard
  if max_update_ratio:
    ratio = optax.tree.norm(updates) / optax.tree.norm(state.params)
    # Negated, so that a NaN ratio (inf / inf) counts as diverged too.
    guard = guard.stop(state.step + 1, STOP_DIVERGED, ~(ratio <= max_update_ratio), ratio)
  params = optax.apply_updates(state.params, updates)
  ema_params = tuple(
      jax.tree.map(lambda e, p, r=rate: e * r + p * (1.0 - r), ema, params)
      for rate, ema in zip(ema_rates, state.ema_params))
  return state.replace(params=params, opt_state=opt_state, ema_params=ema_params,
                       opt_step=state.opt_step + 1, guard=guard)


def make_optimizer(training) -> optax.GradientTransformation:
  """AdamW with an optional linear warm-up (counted in optimizer updates) and global clip."""
  lr = training.lr
  if training.warmup_steps:
    lr = optax.linear_schedule(0.0, training.lr, training.warmup_steps)
  tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=training.weight_decay)
  if training.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(training.grad_clip), tx)
  return tx
