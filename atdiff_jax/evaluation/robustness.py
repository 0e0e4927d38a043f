"""The robustness probe: the model under worst-case perturbations of its input x_t.

Two measurements, both with projected steepest ascent (`attack_steps` steps from a random
point of the ball, step size 2.5 radius / steps) in an L2 or L-inf ball:
- denoising error per t: x_t ~ q(x_t | x0) from real images, and the eps-error of the
  model at x_t + delta against eps + delta / sigma_t (the noise that explains the shifted
  input, so x0 is unchanged: the training objective of AT), clean and worst case;
- samples under attack: the sampler's state x_t is replaced by x_t + delta at one or all
  steps, where delta pushes the model's x0 prediction as far as it can from the clean one
  (the same objective with the model's clean eps as the label, since a sample has no true
  noise); the samples are then scored like an eval cell (FID, fd_digits, ...).
Radii are as `config.adv.radius` with radius_scale 'per_dim': an L2 radius eta means
eta * sqrt(H*W*C), so numbers compare across image sizes and with the training ball.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from atdiff_jax import adversarial, parallel
from atdiff_jax.samplers import common

STEP_SIZE_FACTOR = 2.5  # PGD's usual step size, 2.5 radius / steps (Madry et al.)


def attack_ball(norm: str, radius: float, steps: int, image_shape: Sequence[int]
                ) -> adversarial.BallSpec:
  """The ball of radius `radius` (per_dim units) and its PGD step size."""
  if norm not in ('l2', 'linf'):
    raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
  if radius < 0 or steps < 1:
    raise ValueError(f'need radius >= 0 and steps >= 1, got {radius}, {steps}')
  scale = math.sqrt(math.prod(image_shape)) if norm == 'l2' else 1.0
  radius = float(radius) * scale
  return adversarial.BallSpec(norm=norm, radius=radius,
                              step_size=STEP_SIZE_FACTOR * radius / steps)


def _eps(model_fn, x, t, y) -> jax.Array:
  eps, _ = common.split_model_output(model_fn(x, t, y), x.shape[-1])
  return eps


def _per_example_mse(a: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(a).reshape(a.shape[0], -1), axis=1)


def worst_delta(loss_fn: Callable[[jax.Array], jax.Array], key: jax.Array, shape,
                ball: adversarial.BallSpec, steps: int) -> jax.Array:
  """PGD on `loss_fn(delta) -> (B,) per-example losses`, from a random point of the ball.

  (At delta = 0 the objectives here are at their minimum with zero gradient, so a zero
  start would never move.)
  """
  delta = adversarial.init_delta(key, shape, ball, 'uniform')
  grad_fn = jax.grad(lambda d: jnp.sum(loss_fn(d)))  # examples do not interact
  for _ in range(steps):  # few steps: unrolled, one fused program
    delta = adversarial.ascent_step(delta, grad_fn(delta), ball)
  return delta


def make_sampling_attack(ball: adversarial.BallSpec, steps: int,
                         at_steps: Sequence[int] | None = None) -> common.PerturbFn:
  """A sampler `perturb_fn` that moves x_t to the worst point of the ball around it.

  The adversary maximises |eps(x + delta) - eps(x) - delta / sigma|^2, i.e. how far the x0
  prediction moves. `at_steps`: the (non-negative) step indices to attack; None: every step.
  """

  def attack(model_fn, x, y, ctx):
    clean = jax.lax.stop_gradient(_eps(model_fn, x, ctx.t, y))
    loss = lambda d: _per_example_mse(_eps(model_fn, x + d, ctx.t, y) - clean - d / ctx.sigma)
    return x + worst_delta(loss, ctx.key, x.shape, ball, steps)

  if at_steps is None:
    return attack
  targets = jnp.asarray(sorted(set(int(s) for s in at_steps)), jnp.int32)

  def attack_some(model_fn, x, y, ctx):
    hit = jnp.any(ctx.step == targets)
    return jax.lax.cond(hit, lambda v: attack(model_fn, v, y, ctx), lambda v: v, x)

  return attack_some


def resolve_steps(at: str | int, nfe: int) -> tuple[int, ...] | None:
  """'all' -> None (every step); an int i -> (i,), counted from the end when negative."""
  if at == 'all':
    return None
  if isinstance(at, bool) or not isinstance(at, (int, np.integer)) or not -nfe <= at < nfe:
    raise ValueError(f"attack step must be 'all' or an integer in [-{nfe}, {nfe - 1}], "
                     f'got {at!r}')
  return (int(at) % nfe,)


def make_denoising_fn(model_fn: Callable[..., jax.Array], betas, timesteps: Sequence[int],
                      ball: adversarial.BallSpec, steps: int, mesh: Mesh | None = None
                      ) -> Callable[..., dict[str, jax.Array]]:
  """A jitted `f(rng, x0, y, *model_args) -> {'clean', 'adversarial'}`: (len(timesteps),)
  sums over the batch of per-example eps-MSEs at x_t ~ q(x_t | x0), clean and attacked."""
  abar = np.cumprod(1.0 - common.as_betas(betas))
  ts = np.asarray(timesteps, np.int64)
  if ts.ndim != 1 or ts.size == 0 or ts.min() < 0 or ts.max() >= abar.shape[0]:
    raise ValueError(f'timesteps must lie in [0, {abar.shape[0] - 1}], got {timesteps}')
  per_t = {'t': jnp.asarray(ts, jnp.float32),
           'alpha': jnp.asarray(np.sqrt(abar[ts]), jnp.float32),
           'sigma': jnp.asarray(np.sqrt(1.0 - abar[ts]), jnp.float32),
           'index': jnp.arange(ts.size, dtype=jnp.int32)}
  sharding = None if mesh is None else parallel.batch_sharding(mesh)

  def evaluate(rng, x0, y, *model_args):
    bound = lambda x, t, labels: model_fn(x, t, labels, *model_args)
    x0 = common.constrain(x0, sharding)

    def one_t(_, c):
      noise_key, attack_key = jax.random.split(jax.random.fold_in(rng, c['index']))
      z = common.normal(noise_key, x0.shape, sharding)
      x_t = c['alpha'] * x0 + c['sigma'] * z
      t = jnp.full((x0.shape[0],), c['t'])
      loss = lambda d: _per_example_mse(_eps(bound, x_t + d, t, y) - z - d / c['sigma'])
      delta = worst_delta(loss, attack_key, x0.shape, ball, steps)
      return None, {'clean': jnp.sum(loss(jnp.zeros_like(x_t))),
                    'adversarial': jnp.sum(loss(delta))}

    _, sums = jax.lax.scan(one_t, None, per_t)
    return sums

  return jax.jit(evaluate)
