"""How one minibatch becomes optimizer updates: standard, free AT, PGD-AT and FGSM-AT.

These run inside the per-device body of the compiled train step and know nothing about
the objective: they take a pure `loss_fn(params, batch, delta, rng) -> (loss, aux)` whose
`aux['losses']` holds the per-example (unweighted) losses, and a `delta_mask` that is 1 for
the examples whose input may be perturbed. Parameter gradients are averaged over the mesh
axis 'data' with `lax.pmean`; delta and its gradients never leave the device.

The K passes (or ascent steps) are unrolled when the step is traced, so they are straight-
line code inside the one compiled program. K is small, and XLA fuses across passes; a rolled
loop (`lax.scan` / `fori_loop`) ran the U-Net's forward/backward about 20 times slower on
XLA:CPU (8.1 s against 0.44 s per quickstart step) and changed float rounding.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from atdiff_jax import adversarial
from atdiff_jax.parallel import AXIS
from atdiff_jax.train_state import TrainState


LossFn = Callable[[Any, Any, jax.Array | None, jax.Array], tuple[jax.Array, dict]]
UpdateFn = Callable[[TrainState, Any, dict], TrainState]


class ReplayOutput(NamedTuple):
  state: TrainState
  clean_loss: jax.Array       # the loss of the first pass (delta at its start)
  adv_loss: jax.Array         # the loss of the pass that trained last
  delta: jax.Array | None     # the perturbation of the last training pass
  grad_delta_norm: jax.Array  # mean per-example |d loss_i / d delta_i| of the last ascent


def _pass_rng(rng: jax.Array, k) -> jax.Array:
  return jax.random.fold_in(rng, k)


def standard(loss_fn: LossFn, update: UpdateFn, state: TrainState, batch,
             rng: jax.Array) -> ReplayOutput:
  """Plain training: one forward/backward, one update (free AT's pass, without delta)."""
  return free(loss_fn, update, state, batch, rng, num_passes=1)


def _example_grad_norm(grad_delta: jax.Array) -> jax.Array:
  # loss_fn averages over the local batch; undo that to report per-example gradients.
  return jnp.mean(adversarial.l2_norms(grad_delta)) * grad_delta.shape[0]


def free(loss_fn: LossFn, update: UpdateFn, state: TrainState, batch, rng: jax.Array,
         num_passes: int, delta0: jax.Array | None = None, delta_mask: jax.Array | None = None,
         ball: adversarial.BallSpec | None = None) -> ReplayOutput:
  """Free adversarial training: the minibatch is replayed `num_passes` times.

  Each pass is one forward/backward that yields the gradients of params and delta at
  once; params take an optimizer step, then delta ascends with the same pass's gradient.
  Without `delta0` no perturbation is made (and no delta gradient computed).
  """
  perturb = delta0 is not None
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 2) if perturb else 0, has_aux=True)
  delta, losses, grad_delta_norm = delta0, [], jnp.zeros(())
  for k in range(num_passes):
    (loss, aux), grads = grad_fn(state.params, batch, delta, _pass_rng(rng, k))
    losses.append(loss)
    if perturb:
      grads, grad_delta = grads
    state = update(state, lax.pmean(grads, AXIS), aux)
    if perturb and k < num_passes - 1:  # the last pass's ascent would go unused
      delta = adversarial.ascent_step(delta, grad_delta, ball) * delta_mask
  if perturb:
    grad_delta_norm = _example_grad_norm(grad_delta)
  return ReplayOutput(state, losses[0], losses[-1], delta, grad_delta_norm)


def pgd(loss_fn: LossFn, update: UpdateFn, state: TrainState, batch, rng: jax.Array,
        delta0: jax.Array, delta_mask: jax.Array, ball: adversarial.BallSpec,
        num_ascent: int) -> ReplayOutput:
  """PGD-AT: `num_ascent` ascent steps on delta with params frozen, then one update.

  FGSM-AT is this with one ascent step (and, usually, a random start).
  """
  delta_grad_fn = jax.value_and_grad(loss_fn, argnums=2, has_aux=True)
  delta, losses = delta0, []
  for k in range(num_ascent):
    (loss, _), grad_delta = delta_grad_fn(state.params, batch, delta, _pass_rng(rng, k))
    losses.append(loss)
    delta = adversarial.ascent_step(delta, grad_delta, ball) * delta_mask
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, batch, delta, _pass_rng(rng, num_ascent))
  state = update(state, lax.pmean(grads, AXIS), aux)
  return ReplayOutput(state, losses[0], loss, delta, _example_grad_norm(grad_delta))
