"""The compiled, data-parallel train step, for any objective and any AT scheme.

Written pmap-style: `per_device` sees its shard of the global batch, lets the objective
(objectives/) draw its per-example randomness in-graph from (seed, step, example index), runs
the chosen replay (standard, free AT, PGD-AT, FGSM-AT: replay.py), and averages parameter
gradients with `lax.pmean` over 'data'. It is mapped over the mesh with `jax.shard_map`
under `jax.jit`; the state is donated, and the objective's frozen extras (a teacher's
params) are an argument of every call, replicated, never constants of the program.

An update whose loss or gradient is not finite is skipped inside the program (no host
sync): params, optimizer state, EMA and objective state stay as they were;
`metrics['nonfinite']` counts the skipped updates of the call for the host loop. The
state's guard (train_state.Guard) records, in-graph, the first minibatch that must stop
the run: training.stop_after_nonfinite such minibatches in a row, or an update larger than
training.max_update_ratio times the params (finite, yet diverging).

Per-example keys make the draw (and the delta start) independent of how the batch is split
across devices; only dropout masks depend on the device layout.

What the step trains (network, optimizer, objective) is built once from the config
(`TrainParts.build`) and passed to every function here.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from atdiff_jax import adversarial, parallel, replay
from atdiff_jax.config import image_shape, replay_passes
from atdiff_jax.objectives import Objective, get_objective
from atdiff_jax.models import create_model, init_params
from atdiff_jax.parallel import AXIS
from atdiff_jax.train_state import STOP_NONFINITE, TrainState, apply_update, make_optimizer


@dataclasses.dataclass(frozen=True)
class TrainParts:
  """What a run trains, built once from its config: the network, the optimizer and the
  objective."""
  model: Any
  tx: optax.GradientTransformation
  objective: Objective

  @classmethod
  def build(cls, config: ml_collections.ConfigDict, model=None, tx=None,
            objective: Objective | None = None) -> 'TrainParts':
    """The config's parts; `model`, `tx` or `objective` replace the config's (tests use a
    stand-in network or optimizer)."""
    model = create_model(config) if model is None else model
    tx = make_optimizer(config.training) if tx is None else tx
    objective = get_objective(config, model) if objective is None else objective
    return cls(model, tx, objective)


def make_init_fn(config: ml_collections.ConfigDict, parts: TrainParts):
  """`init(rng) -> TrainState`; jit it with replicated out_shardings to build the state."""

  def init(rng: jax.Array) -> TrainState:
    params = init_params(parts.model, config, rng)
    return TrainState.create(params, parts.tx, len(config.training.ema_rates),
                             parts.objective.init_state(params))

  return init


def abstract_state(config: ml_collections.ConfigDict, parts: TrainParts):
  """The TrainState's shapes and dtypes. The key is made inside the trace: one made outside
  would compile a seeding program, before a bad checkpoint or config could be reported."""
  init = make_init_fn(config, parts)
  return jax.eval_shape(lambda: init(jax.random.key(0)))


def create_train_state(config: ml_collections.ConfigDict, mesh: Mesh, parts: TrainParts):
  """A freshly initialised state, replicated over the mesh."""
  return jax.jit(make_init_fn(config, parts), out_shardings=parallel.replicated(mesh))(
      jax.random.key(config.seed))


def make_train_step(config: ml_collections.ConfigDict, mesh: Mesh, parts: TrainParts):
  """`step(state, batch, frozen=()) -> (state, metrics)`, jitted; batch = {'image', 'label'},
  one minibatch or several stacked (`map_minibatches`).

  `frozen` is the objective's frozen extras (`objective.load_frozen(mesh)`).
  """
  tx, objective = parts.tx, parts.objective
  num_keys = objective.num_draw_keys
  shape = image_shape(config)
  adv = config.adv
  ball = adversarial.BallSpec.from_config(adv, shape)
  sigma_radius = adv.get('radius_schedule', 'constant') == 'sigma'
  loop = replay.resolve_loop(adv.get('replay_loop', 'auto'), mesh.devices.flat[0].platform,
                             replay_passes(config))
  ema_rates = tuple(config.training.ema_rates)
  max_update_ratio = float(config.training.max_update_ratio)
  nonfinite_limit = int(config.training.stop_after_nonfinite)

  def per_device(state: TrainState, images: jax.Array, labels: jax.Array, frozen):
    local_batch = images.shape[0]
    device = lax.axis_index(AXIS)
    example_root, device_root = jax.random.split(
        jax.random.fold_in(jax.random.key(config.seed), state.step))
    # Per global example index: the objective's keys, then one for delta's start.
    ids = device * local_batch + jnp.arange(local_batch)
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(example_root, i),
                                               num_keys + 1))(ids)
    draw_keys, delta_keys = keys[:, :num_keys], keys[:, num_keys]
    pass_rng = jax.random.fold_in(device_root, device)  # dropout

    batch = objective.draw(state.objective_state, frozen, images, labels, draw_keys,
                           state.opt_step)

    def apply(state: TrainState, grads, aux: dict) -> TrainState:
      state = apply_update(state, grads, tx, ema_rates, max_update_ratio)
      return state.replace(objective_state=objective.after_update(
          state.objective_state, state.params, batch, aux))

    def update(state: TrainState, grads, aux: dict) -> tuple[TrainState, jax.Array]:
      # grads are pmean'd and the loss flag psum'd: every device takes the same branch.
      bad_loss = lax.psum(jnp.any(~jnp.isfinite(aux['losses'])).astype(jnp.int32), AXIS)
      ok = (bad_loss == 0) & all_finite(grads)
      # A cond, not a select of the whole state: the skip costs nothing when all is finite
      # and the update keeps updating its buffers in place.
      return lax.cond(ok, apply, lambda state, *_: state, state, grads, aux), ~ok

    loss_fn = objective.loss_fn
    # Per example: the multiple of the ball's radius (0 where the input stays clean).
    scale = objective.perturb_mask(batch).astype(images.dtype)
    if sigma_radius:
      scale = scale * objective.input_sigma(batch).astype(images.dtype)
    scale = scale[:, None, None, None]
    delta0 = jax.vmap(
        lambda k: adversarial.init_delta(k, (1,) + shape, ball, adv.init)[0])(delta_keys)
    delta0 = delta0 * scale
    if adv.method == 'none':
      out = replay.standard(loss_fn, update, state, batch, pass_rng)
    elif adv.method == 'free':
      out = replay.free(loss_fn, update, state, batch, pass_rng, adv.steps, delta0, scale,
                        ball, loop)
    else:
      num_ascent = 1 if adv.method == 'fgsm' else adv.steps
      out = replay.pgd(loss_fn, update, state, batch, pass_rng, delta0, scale, ball,
                       num_ascent, loop)

    metrics = {'loss': out.adv_loss, 'clean_loss': out.clean_loss,
               'nonfinite': out.skipped}
    if out.delta is not None:
      # Averages over the perturbed examples of the whole global batch.
      radii = scale[:, 0, 0, 0] * ball.radius
      perturbed = (radii > 0).astype(images.dtype)
      num_perturbed = lax.psum(jnp.sum(perturbed), AXIS)
      delta_norms = adversarial.norms(out.delta, ball.norm)
      mean_perturbed = lambda x: lax.psum(jnp.sum(x * perturbed), AXIS) / jnp.maximum(
          num_perturbed, 1.0)
      metrics['delta_over_radius'] = mean_perturbed(delta_norms / jnp.maximum(radii, 1e-12))
      metrics['delta_norm'] = mean_perturbed(delta_norms)
      metrics['perturbed_fraction'] = num_perturbed / (local_batch * lax.psum(1, AXIS))
      metrics['grad_delta_norm'] = lax.pmean(out.grad_delta_norm, AXIS)
    metrics['loss'] = lax.pmean(metrics['loss'], AXIS)
    metrics['clean_loss'] = lax.pmean(metrics['clean_loss'], AXIS)
    guard = out.state.guard
    streak = jnp.where(out.skipped > 0, guard.nonfinite_streak + 1, 0).astype(jnp.int32)
    guard = guard.replace(nonfinite_streak=streak)
    if nonfinite_limit:
      guard = guard.stop(state.step + 1, STOP_NONFINITE, streak >= nonfinite_limit)
    return out.state.replace(step=out.state.step + 1, guard=guard), metrics

  return map_minibatches(per_device, mesh)


def map_minibatches(per_device, mesh: Mesh):
  """The jitted, state-donating step of a per-device minibatch function
  `per_device(state, images, labels, frozen) -> (state, metrics)`.

  `step(state, batch, frozen)` takes one minibatch (images (B, H, W, C)) or several stacked
  on a leading axis (M, B, H, W, C), as the data stream yields them with
  training.minibatches_per_call: those run one after another in a `lax.scan` inside the
  same program, and every metric gains the leading axis M. One call per M minibatches
  divides the host's dispatch work (some 2,000 state arrays in and out of each call for an
  ADM) by M; the minibatches are the same, so the training is the same.
  """
  single = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P()),
                         out_specs=(P(), P()), check_vma=False)

  def per_device_scan(state, images, labels, frozen):
    return lax.scan(lambda state, xs: per_device(state, *xs, frozen), state, (images, labels))

  stacked = jax.shard_map(per_device_scan, mesh=mesh,
                          in_specs=(P(), P(None, AXIS), P(None, AXIS), P()),
                          out_specs=(P(), P()), check_vma=False)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state: TrainState, batch: dict, frozen=()):
    mapped = stacked if batch['image'].ndim == 5 else single
    return mapped(state, batch['image'], batch['label'], frozen)

  return step


def all_finite(tree) -> jax.Array:
  """Whether every floating-point value of `tree` is finite (a scalar bool)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def num_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
