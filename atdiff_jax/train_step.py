"""The compiled, data-parallel train step.

Written pmap-style: `per_device` sees its shard of the global batch, draws all randomness
in-graph from (seed, step, example index), runs the chosen replay (standard, free AT,
PGD-AT, FGSM-AT), and averages parameter gradients with `lax.pmean` over 'data'. It is
mapped over the mesh with `jax.shard_map` under `jax.jit`, and the state is donated.

Per-example keys make the draw (t, eps, xi, delta start) independent of how the batch is
split across devices; only dropout masks depend on the device layout.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from atdiff_jax import adversarial, replay
from atdiff_jax.diffusion import GaussianDiffusion, get_beta_schedule, make_timestep_sampler
from atdiff_jax.methods import dpm
from atdiff_jax.models import create_model, make_apply_fn
from atdiff_jax.train_state import TrainState, apply_update, make_optimizer

AXIS = replay.AXIS


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all (global) devices with the data-parallel axis 'data'."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def make_diffusion(config: ml_collections.ConfigDict) -> GaussianDiffusion:
  d = config.diffusion
  return GaussianDiffusion.create(get_beta_schedule(d.schedule, d.num_timesteps))


def sample_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  return (config.data.image_size, config.data.image_size, config.data.channels)


def make_init_fn(config: ml_collections.ConfigDict, model, tx):
  """`init(rng) -> TrainState`; jit it with replicated out_shardings to build the state."""
  sampler = make_timestep_sampler(config.training.timestep_sampler,
                                  config.diffusion.num_timesteps)
  h, w, c = sample_shape(config)

  def init(rng: jax.Array) -> TrainState:
    y = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None
    variables = model.init({'params': rng}, jnp.zeros((1, h, w, c)), jnp.zeros((1,)), y,
                           train=False)
    return TrainState.create(variables['params'], tx, len(config.training.ema_rates),
                             sampler.init())

  return init


def create_train_state(config: ml_collections.ConfigDict, mesh: Mesh, model=None, tx=None):
  """A freshly initialised state, replicated over the mesh."""
  model = create_model(config) if model is None else model
  tx = make_optimizer(config.training) if tx is None else tx
  init = make_init_fn(config, model, tx)
  replicated = NamedSharding(mesh, P())
  return jax.jit(init, out_shardings=replicated)(jax.random.key(config.seed))


def _per_example_keys(root: jax.Array, first_index: jax.Array, count: int, num: int):
  """`num` independent key vectors of length `count`, one key per global example index."""
  ids = first_index + jnp.arange(count)
  keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(root, i), num))(ids)
  return [keys[:, j] for j in range(num)]


def make_train_step(config: ml_collections.ConfigDict, mesh: Mesh, model=None, tx=None):
  """`step(state, batch) -> (state, metrics)`, jitted; batch = {'image', 'label'}."""
  model = create_model(config) if model is None else model
  tx = make_optimizer(config.training) if tx is None else tx
  diffusion = make_diffusion(config)
  sampler = make_timestep_sampler(config.training.timestep_sampler,
                                  config.diffusion.num_timesteps)
  shape = sample_shape(config)
  adv = config.adv
  ball = adversarial.BallSpec.from_config(adv, shape)
  t_min, t_max = adv.t_range
  t_max = config.diffusion.num_timesteps - 1 if t_max == -1 else t_max
  ema_rates = tuple(config.training.ema_rates)
  ip_gamma = float(config.input_perturbation.gamma)
  class_cond = bool(config.model.num_classes)
  uniform_sampler = config.training.timestep_sampler == 'uniform'
  loss_fn = dpm.make_loss_fn(
      make_apply_fn(model), diffusion, learn_sigma=config.model.learn_sigma,
      rescale_vb=config.diffusion.rescale_vb, target=adv.target, ip_gamma=ip_gamma)

  def per_device(state: TrainState, images: jax.Array, labels: jax.Array):
    local_batch = images.shape[0]
    device = lax.axis_index(AXIS)
    example_root, device_root = jax.random.split(
        jax.random.fold_in(jax.random.key(config.seed), state.step))
    t_keys, noise_keys, xi_keys, delta_keys = _per_example_keys(
        example_root, device * local_batch, local_batch, 4)
    pass_rng = jax.random.fold_in(device_root, device)  # dropout

    t, weights = jax.vmap(lambda k: sampler.sample(state.sampler_state, k, 1))(t_keys)
    t, weights = t[:, 0], weights[:, 0]
    normal = jax.vmap(lambda k: jax.random.normal(k, shape, images.dtype))
    batch = {'x0': images, 't': t, 'weights': weights, 'noise': normal(noise_keys)}
    if ip_gamma:
      batch['xi'] = normal(xi_keys)
    if class_cond:
      batch['label'] = labels

    def update(state: TrainState, grads: Any, aux: dict) -> TrainState:
      state = apply_update(state, grads, tx, ema_rates)
      if uniform_sampler:
        return state
      # Every device sees the whole batch's losses, in global order, as the reference.
      all_t = lax.all_gather(t, AXIS, tiled=True)
      all_losses = lax.all_gather(lax.stop_gradient(aux['losses']), AXIS, tiled=True)
      return state.replace(
          sampler_state=sampler.update(state.sampler_state, all_t, all_losses))

    mask = ((t >= t_min) & (t <= t_max)).astype(images.dtype)[:, None, None, None]
    delta0 = jax.vmap(
        lambda k: adversarial.init_delta(k, (1,) + shape, ball, adv.init)[0])(delta_keys)
    delta0 = delta0 * mask
    if adv.method == 'none':
      out = replay.standard(loss_fn, update, state, batch, pass_rng)
    elif adv.method == 'free':
      out = replay.free(loss_fn, update, state, batch, pass_rng, adv.steps, delta0, mask,
                        ball)
    else:
      num_ascent = 1 if adv.method == 'fgsm' else adv.steps
      out = replay.pgd(loss_fn, update, state, batch, pass_rng, delta0, mask, ball,
                       num_ascent)

    metrics = {'loss': out.adv_loss, 'clean_loss': out.clean_loss}
    if out.delta is not None:
      # Averages over the perturbed examples of the whole global batch.
      perturbed = mask[:, 0, 0, 0]
      num_perturbed = lax.psum(jnp.sum(perturbed), AXIS)
      ratio = adversarial.norms(out.delta, ball.norm) / max(ball.radius, 1e-12)
      metrics['delta_over_radius'] = lax.psum(jnp.sum(ratio * perturbed), AXIS) / jnp.maximum(
          num_perturbed, 1.0)
      metrics['perturbed_fraction'] = num_perturbed / (local_batch * lax.psum(1, AXIS))
      metrics['grad_delta_norm'] = lax.pmean(out.grad_delta_norm, AXIS)
    metrics['loss'] = lax.pmean(metrics['loss'], AXIS)
    metrics['clean_loss'] = lax.pmean(metrics['clean_loss'], AXIS)
    return out.state.replace(step=out.state.step + 1), metrics

  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                         out_specs=(P(), P()), check_vma=False)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state: TrainState, batch: dict):
    return mapped(state, batch['image'], batch['label'])

  return step


def updates_per_minibatch(config: ml_collections.ConfigDict) -> int:
  """Optimizer updates made by one call of the step."""
  return config.adv.steps if config.adv.method == 'free' else 1


def num_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
