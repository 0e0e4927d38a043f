"""How one minibatch becomes optimizer updates: standard, free AT, PGD-AT and FGSM-AT.

These run inside the per-device body of the compiled train step and know nothing about
the objective: they take a pure `loss_fn(params, batch, delta, rng) -> (loss, aux)` whose
`aux['losses']` holds the per-example (unweighted) losses, and a per-example `delta_scale`
that multiplies the ball's radius and step size (0: the example's input stays as it is). Parameter gradients are averaged over the mesh
axis 'data' with `lax.pmean`; delta and its gradients never leave the device.

The K passes (or ascent steps) are either unrolled when the step is traced (straight-line
code: XLA fuses across passes, but compiles K copies of the forward/backward) or rolled
into one `lax.fori_loop` (one copy: about K times less to compile). On XLA:CPU the rolled
loop ran the U-Net's forward/backward about 20 times slower (8.1 s against 0.44 s per
quickstart step); GPU and TPU run while loops natively. `config.adv.replay_loop` picks
one ('auto': unrolled on CPU, rolled elsewhere and for more than
config.MAX_UNROLLED_PASSES passes, see `resolve_loop`). Both compute the same passes; their
float rounding may differ.

`update(state, grads, aux) -> (state, skipped)` makes one optimizer update (or skips it,
`skipped` a bool); the replays count the skipped ones.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from atdiff_jax import adversarial
from atdiff_jax.config import ADV_REPLAY_LOOPS, MAX_UNROLLED_PASSES
from atdiff_jax.parallel import AXIS
from atdiff_jax.train_state import TrainState


log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any, jax.Array | None, jax.Array], tuple[jax.Array, dict]]
UpdateFn = Callable[[TrainState, Any, dict], tuple[TrainState, jax.Array]]


class ReplayOutput(NamedTuple):
  state: TrainState
  clean_loss: jax.Array       # the loss of the first pass (delta at its start)
  adv_loss: jax.Array         # the loss of the pass that trained last
  delta: jax.Array | None     # the perturbation of the last training pass
  grad_delta_norm: jax.Array  # mean per-example |d loss_i / d delta_i| of the last ascent
  skipped: jax.Array          # updates skipped (non-finite), int32


def resolve_loop(loop: str, backend: str | None = None, passes: int = 1) -> str:
  """'unrolled' or 'rolled' for `loop` of `passes` passes ('auto' decides by the backend,
  CPU unrolled, but rolls more than MAX_UNROLLED_PASSES passes, and says so)."""
  if loop not in ADV_REPLAY_LOOPS:
    raise ValueError(f'replay loop must be one of {", ".join(ADV_REPLAY_LOOPS)}, got {loop!r}')
  if loop != 'auto':
    return loop
  backend = jax.default_backend() if backend is None else backend
  if backend == 'cpu' and passes > MAX_UNROLLED_PASSES:
    log.warning('%d passes per minibatch: a rolled loop (adv.replay_loop=auto unrolls at most '
                '%d; unrolled, the step would compile one copy per pass).', passes,
                MAX_UNROLLED_PASSES)
    return 'rolled'
  return 'unrolled' if backend == 'cpu' else 'rolled'


def _pass_rng(rng: jax.Array, k) -> jax.Array:
  return jax.random.fold_in(rng, k)


def standard(loss_fn: LossFn, update: UpdateFn, state: TrainState, batch,
             rng: jax.Array) -> ReplayOutput:
  """Plain training: one forward/backward, one update (free AT's pass, without delta)."""
  return free(loss_fn, update, state, batch, rng, num_passes=1)


def _count(skipped) -> jax.Array:
  return jnp.asarray(skipped).astype(jnp.int32)


def _example_grad_norm(grad_delta: jax.Array) -> jax.Array:
  # loss_fn averages over the local batch; undo that to report per-example gradients.
  return jnp.mean(adversarial.l2_norms(grad_delta)) * grad_delta.shape[0]


def free(loss_fn: LossFn, update: UpdateFn, state: TrainState, batch, rng: jax.Array,
         num_passes: int, delta0: jax.Array | None = None, delta_scale: jax.Array | None = None,
         ball: adversarial.BallSpec | None = None, loop: str = 'unrolled') -> ReplayOutput:
  """Free adversarial training: the minibatch is replayed `num_passes` times.

  Each pass is one forward/backward that yields the gradients of params and delta at
  once; params take an optimizer step, then delta ascends with the same pass's gradient.
  Without `delta0` no perturbation is made (and no delta gradient computed).
  """
  perturb = delta0 is not None
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 2) if perturb else 0, has_aux=True)

  def one_pass(k, state, delta):
    """(state, loss, skipped, grad_delta or None) of pass k at `delta`."""
    (loss, aux), grads = grad_fn(state.params, batch, delta, _pass_rng(rng, k))
    grad_delta = None
    if perturb:
      grads, grad_delta = grads
    state, skipped = update(state, lax.pmean(grads, AXIS), aux)
    return state, loss, skipped, grad_delta

  if loop == 'rolled' and num_passes > 1:
    return _free_rolled(one_pass, state, delta0, delta_scale, ball, num_passes)
  delta, losses, skipped, grad_delta_norm = delta0, [], jnp.zeros((), jnp.int32), jnp.zeros(())
  for k in range(num_passes):
    state, loss, skip, grad_delta = one_pass(k, state, delta)
    losses.append(loss)
    skipped += _count(skip)
    if perturb and k < num_passes - 1:  # the last pass's ascent would go unused
      delta = adversarial.ascent_step(delta, grad_delta, ball, delta_scale)
  if perturb:
    grad_delta_norm = _example_grad_norm(grad_delta)
  return ReplayOutput(state, losses[0], losses[-1], delta, grad_delta_norm, skipped)


def _free_rolled(one_pass, state, delta0, delta_scale, ball, num_passes) -> ReplayOutput:
  """`free` as one fori_loop over the passes (the same passes, one compiled copy)."""
  perturb = delta0 is not None

  def body(k, carry):
    state, delta, _, first, _, skipped, _ = carry
    state, loss, skip, grad_delta = one_pass(k, state, delta)
    loss = loss.astype(jnp.float32)
    first = jnp.where(k == 0, loss, first)
    if not perturb:
      return state, delta, delta, first, loss, skipped + _count(skip), jnp.zeros(())
    # The carry holds the delta this pass trained on (reported) and the next pass's.
    ascended = adversarial.ascent_step(delta, grad_delta, ball, delta_scale)
    return (state, ascended, delta, first, loss, skipped + _count(skip),
            _example_grad_norm(grad_delta).astype(jnp.float32))

  zero = jnp.zeros(())
  delta0 = jnp.zeros(()) if delta0 is None else delta0
  state, _, delta, first, last, skipped, grad_delta_norm = lax.fori_loop(
      0, num_passes, body, (state, delta0, delta0, zero, zero, jnp.zeros((), jnp.int32), zero))
  return ReplayOutput(state, first, last, delta if perturb else None, grad_delta_norm, skipped)


def pgd(loss_fn: LossFn, update: UpdateFn, state: TrainState, batch, rng: jax.Array,
        delta0: jax.Array, delta_scale: jax.Array, ball: adversarial.BallSpec,
        num_ascent: int, loop: str = 'unrolled') -> ReplayOutput:
  """PGD-AT: `num_ascent` ascent steps on delta with params frozen, then one update.

  FGSM-AT is this with one ascent step (and, usually, a random start).
  """
  delta_grad_fn = jax.value_and_grad(loss_fn, argnums=2, has_aux=True)

  def ascend(k, delta):
    (loss, _), grad_delta = delta_grad_fn(state.params, batch, delta, _pass_rng(rng, k))
    return loss, adversarial.ascent_step(delta, grad_delta, ball, delta_scale), grad_delta

  if loop == 'rolled' and num_ascent > 1:
    def body(k, carry):
      delta, first, _ = carry
      loss, delta, grad_delta = ascend(k, delta)
      return (delta, jnp.where(k == 0, loss.astype(jnp.float32), first),
              _example_grad_norm(grad_delta).astype(jnp.float32))

    delta, first_loss, grad_delta_norm = lax.fori_loop(
        0, num_ascent, body, (delta0, jnp.zeros(()), jnp.zeros(())))
  else:
    delta = delta0
    for k in range(num_ascent):
      loss, delta, grad_delta = ascend(k, delta)
      first_loss = loss if k == 0 else first_loss
    grad_delta_norm = _example_grad_norm(grad_delta)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, batch, delta, _pass_rng(rng, num_ascent))
  state, skipped = update(state, lax.pmean(grads, AXIS), aux)
  return ReplayOutput(state, first_loss, loss, delta, grad_delta_norm, _count(skipped))
