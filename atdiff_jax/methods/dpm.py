"""The DPM objective: ADM's hybrid loss on a (possibly perturbed) noisy input.

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

from atdiff_jax.diffusion import GaussianDiffusion, hybrid_loss

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
