"""The DPM objective: ADM's hybrid loss on a (possibly perturbed) noisy input.

`DPMObjective` is what the train step runs (see objectives/base.py).

`make_loss_fn` returns a pure `loss_fn(params, batch, delta, rng) -> (loss, aux)`:
- the noisy input is built from the batch's fixed draw (x0, t, eps), with DDPM-IP's
  input perturbation eps + gamma * xi when gamma > 0 (the target stays eps);
- delta (or None) shifts that input; the eps target follows `target`:
    original:      eps
    delta:         eps + delta / sigma_t          (gradient flows through delta)
    delta_detach:  eps + stop_grad(delta) / sigma_t   (the paper's CIFAR-10 choice)
  i.e. the noise that explains the shifted input with x0 unchanged. The VB term's
  posterior is taken at the input the model saw (detached for delta_detach), and at the
  clean x_t for original.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from atdiff_jax.config import image_shape, perturbed_t_range
from atdiff_jax.diffusion import (GaussianDiffusion, diffusion_of, hybrid_loss,
                                  make_timestep_sampler)
from atdiff_jax.objectives.base import Objective
from atdiff_jax.models import make_apply_fn
from atdiff_jax.parallel import AXIS

ApplyFn = Callable[..., jax.Array]


def eps_target_and_vb_input(target: str, noise: jax.Array, x_t: jax.Array,
                            delta: jax.Array | None, sigma: jax.Array):
  """The eps-prediction target and the x_t at which the VB posterior is taken."""
  if delta is None or target == 'original':
    return noise, x_t
  if target == 'delta_detach':
    delta = jax.lax.stop_gradient(delta)
  elif target != 'delta':
    raise ValueError(f'unknown adversarial target {target!r}')
  return noise + delta / sigma, x_t + delta


def make_loss_fn(apply_fn: ApplyFn, diffusion: GaussianDiffusion, *, learn_sigma: bool,
                 rescale_vb: bool, target: str = 'delta_detach', ip_gamma: float = 0.0,
                 train: bool = True):
  """`apply_fn(params, x, t, y, train, rng)` is the model; see the module docstring."""

  def loss_fn(params: Any, batch: dict, delta: jax.Array | None, rng: jax.Array):
    x0, t, noise = batch['x0'], batch['t'], batch['noise']
    input_noise = noise + ip_gamma * batch['xi'] if ip_gamma else noise
    x_t = diffusion.q_sample(x0, t, input_noise)
    eps_target, x_vb = eps_target_and_vb_input(target, noise, x_t, delta,
                                               diffusion.sigma(t))
    model_input = x_t if delta is None else x_t + delta
    output = apply_fn(params, model_input, t, batch.get('label'), train, rng)
    terms = hybrid_loss(diffusion, output, x0, x_vb, t, eps_target,
                        learn_sigma=learn_sigma, rescale_vb=rescale_vb)
    loss = jnp.mean(terms['loss'] * batch['weights'])
    aux = {'losses': terms['loss'], 'mse': jnp.mean(terms['mse']),
           'vb': jnp.mean(terms['vb'])}
    return loss, aux

  return loss_fn


class DPMObjective(Objective):
  """ADM's objective: t from the timestep sampler, hybrid loss on x_t (+ delta).

  The objective state is the timestep sampler's (the loss history; () when uniform), and it
  is updated after every optimizer update with the losses of that pass, gathered over the
  whole global batch in global order (as the reference).
  """

  num_draw_keys = 3  # t, eps, IP's xi

  def __init__(self, config: ml_collections.ConfigDict, model):
    self.diffusion = diffusion_of(config)
    self.timestep_sampler = make_timestep_sampler(config.training.timestep_sampler,
                                         config.diffusion.num_timesteps)
    self.shape = image_shape(config)
    self.ip_gamma = float(config.input_perturbation.gamma)
    self.class_cond = bool(config.model.num_classes)
    self.perturbed_t_range = perturbed_t_range(config)
    self._loss_fn = make_loss_fn(
        make_apply_fn(model), self.diffusion, learn_sigma=config.model.learn_sigma,
        rescale_vb=config.diffusion.rescale_vb, target=config.adv.target,
        ip_gamma=self.ip_gamma)

  def init_state(self, params):
    del params
    return self.timestep_sampler.init()

  def draw(self, objective_state, frozen, images, labels, keys, opt_step):
    del frozen, opt_step
    t_keys, noise_keys, xi_keys = keys[:, 0], keys[:, 1], keys[:, 2]
    t, weights = jax.vmap(lambda k: self.timestep_sampler.sample(objective_state, k, 1))(t_keys)
    normal = jax.vmap(lambda k: jax.random.normal(k, self.shape, images.dtype))
    batch = {'x0': images, 't': t[:, 0], 'weights': weights[:, 0], 'noise': normal(noise_keys)}
    if self.ip_gamma:
      batch['xi'] = normal(xi_keys)
    if self.class_cond:
      batch['label'] = labels
    return batch

  def loss_fn(self, params, batch, delta, rng):
    return self._loss_fn(params, batch, delta, rng)

  def input_sigma(self, batch):
    return self.diffusion.sigma(batch['t'], ndim=1)

  def after_update(self, objective_state, params, batch, aux):
    del params
    if not self.timestep_sampler.is_adaptive:
      return objective_state
    all_t = lax.all_gather(batch['t'], AXIS, tiled=True)
    all_losses = lax.all_gather(lax.stop_gradient(aux['losses']), AXIS, tiled=True)
    return self.timestep_sampler.update(objective_state, all_t, all_losses)
