"""Everything that changes during training, in one pytree: checkpoint and resume are one call."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


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
    )


def apply_update(state: TrainState, grads, tx: optax.GradientTransformation,
                 ema_rates: tuple[float, ...]) -> TrainState:
  """One optimizer update followed by one EMA update for each rate."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = tuple(
      jax.tree.map(lambda e, p, r=rate: e * r + p * (1.0 - r), ema, params)
      for rate, ema in zip(ema_rates, state.ema_params))
  return state.replace(params=params, opt_state=opt_state, ema_params=ema_params,
                       opt_step=state.opt_step + 1)


def make_optimizer(training) -> optax.GradientTransformation:
  """AdamW with an optional linear warm-up (counted in optimizer updates) and global clip."""
  lr = training.lr
  if training.warmup_steps:
    lr = optax.linear_schedule(0.0, training.lr, training.warmup_steps)
  tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=training.weight_decay)
  if training.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(training.grad_clip), tx)
  return tx
