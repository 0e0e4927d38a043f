"""Consistency distillation (CD) and consistency training (CT, improved CT, ECT) on the VP
axis of this project's DPMs, as an `Objective` (objectives/base.py).

One minibatch example is a pair of times s < t on the original timestep scale, a noise z
and x_t = alpha_t x0 + sigma_t z. The student f_theta (diffusion/consistency_function.py) sees
x_t (+ delta under AT); its target is stop_grad f_target(x_s, s), with
- CD: x_s = one ODE step of the frozen teacher from (x_t, t) to s (DDIM, or Heun with two
  teacher calls), computed once per minibatch in `draw`, not once per AT pass;
- CT: x_s = alpha_s x0 + sigma_s z, the same noise at both ends.
The target network is an EMA of the student with rate mu (`consistency.target_ema`); with
mu = 0 it is the student itself, stop-gradient, recomputed in every pass (exact under free
AT). With mu > 0 the target params are the objective's state, updated after every
optimizer update; every pass of one minibatch reads the target as it was at its start.
Student and target use the same dropout key.

Pairs (`consistency.pairs`):
- 'grid': N points (Karras on sigma~ with rho, or uniform in t), skip k: t = t_{n+k},
  s = t_n with n uniform (LCM's skip interval; CM's CD has k = 1);
- 'improved_ct': improved CT's Karras grid of N(k) = min(s0 2^floor(k / K'), s1) + 1 points
  (k = optimizer updates so far, K' = floor(K / (log2(s1 / s0) + 1)), K the run's updates),
  intervals drawn with lognormal(P_mean, P_std) mass;
- 'ect': ECT's continuous pairs: sigma~_t ~ lognormal(P_mean, P_std) on (sigma~_min,
  sigma~_max], sigma~_s = sigma~_t (1 - 2^-(stage+1) (1 + 8 sigmoid(-sigma~_t))), at least
  sigma~_min; the stage (one per `ect_stage_updates` updates) halves the gap.
Distance on the per-sample vector: 'l2' (mean square) or 'pseudo_huber'
sqrt(|a - b|^2 + c^2) - c, c = 0.00054 sqrt(d) (on the norm, not per element). Weighting:
'uniform' or 'inverse_gap' 1 / (sigma~_t - sigma~_s).

Under AT the perturbation shifts the student's input x_t. The target is computed at the
clean input (`target_at='clean'`, the analogue of DPM AT's delta_detach: the shifted input
must map to the clean input's x0), or at the shifted one ('perturbed': CT explains the
shift by the noise, x_s + (sigma_s / sigma_t) delta; CD runs the teacher step again from
x_t + delta, in every pass).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax
from jax.sharding import Mesh

from atdiff_jax import checkpoint, parallel
from atdiff_jax.config import image_shape, perturbed_t_range, updates_per_minibatch
from atdiff_jax.diffusion import betas_of
from atdiff_jax.diffusion.consistency_function import Parametrisation
from atdiff_jax.diffusion.vp_time import VPTime, broadcast_to
from atdiff_jax.objectives.base import Objective
from atdiff_jax.models import abstract_params, make_apply_fn

Array = jax.Array
EpsFn = Callable[[Array, Array], Array]            # eps(x, t) of the teacher
# teacher_step(frozen, x_t, t, s, y) -> x_s: one ODE step of the frozen teacher.
TeacherStep = Callable[[Any, Array, Array, Array, Array | None], Array]

PSEUDO_HUBER_C = 0.00054  # times sqrt(d), improved CT's choice


# ------------------------------------------------------------------ pure pieces


def ddim_step(eps_fn: EpsFn, vp: VPTime, x: Array, t: Array, s: Array) -> Array:
  """DDIM from t to s: Euler in (sigma~, x~ = x / alpha)."""
  a_t, a_s = broadcast_to(vp.alpha(t), x.ndim), broadcast_to(vp.alpha(s), x.ndim)
  gap = broadcast_to(vp.ve_sigma(s) - vp.ve_sigma(t), x.ndim)
  return a_s * (x / a_t + gap * eps_fn(x, t))


def heun_step(eps_fn: EpsFn, vp: VPTime, x: Array, t: Array, s: Array) -> Array:
  """Heun (EDM's second-order step) from t to s: two teacher calls."""
  a_t, a_s = broadcast_to(vp.alpha(t), x.ndim), broadcast_to(vp.alpha(s), x.ndim)
  gap = broadcast_to(vp.ve_sigma(s) - vp.ve_sigma(t), x.ndim)
  x_tilde = x / a_t
  d1 = eps_fn(x, t)
  d2 = eps_fn(a_s * (x_tilde + gap * d1), s)
  return a_s * (x_tilde + gap * 0.5 * (d1 + d2))


TEACHER_SOLVERS = {'ddim': ddim_step, 'heun': heun_step}


def distance(a: Array, b: Array, kind: str) -> Array:
  """Per-sample distance (B,) between two batches."""
  diff = (a - b).reshape(a.shape[0], -1).astype(jnp.float32)
  if kind == 'l2':
    return jnp.mean(jnp.square(diff), axis=1)
  if kind == 'pseudo_huber':
    c = PSEUDO_HUBER_C * math.sqrt(diff.shape[1])
    return jnp.sqrt(jnp.sum(jnp.square(diff), axis=1) + c * c) - c
  raise ValueError(f'unknown distance {kind!r}')


def karras_sigmas(num_points, sigma_min: float, sigma_max: float, rho: float,
                  size: int | None = None) -> Array:
  """Karras et al.'s grid, ascending: sigma_0 = sigma_min ... sigma_{N-1} = sigma_max.

  `num_points` may be traced (improved CT's curriculum); `size` >= it fixes the length, the
  entries past N - 1 being meaningless.
  """
  i = jnp.arange(num_points if size is None else size, dtype=jnp.float32)
  frac = i / (jnp.asarray(num_points, jnp.float32) - 1.0)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (lo + frac * (hi - lo)) ** rho


def improved_ct_num_points(updates, total_updates: int, n_start: int, n_max: int) -> Array:
  """N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2(s1 / s0) + 1))."""
  stage_length = max(1, math.floor(total_updates / (math.log2(n_max / n_start) + 1)))
  doublings = jnp.asarray(updates, jnp.int32) // stage_length
  n = n_start * jnp.exp2(jnp.minimum(doublings, 31).astype(jnp.float32))
  return (jnp.minimum(n, n_max) + 1).astype(jnp.int32)


def lognormal_interval_logits(sigmas: Array, p_mean: float, p_std: float) -> Array:
  """log P(sigma in [sigma_i, sigma_{i+1})) under lognormal(p_mean, p_std), (len - 1,)."""
  z = (jnp.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std)
  return jnp.log(jnp.maximum(jax.scipy.special.erf(z[1:]) - jax.scipy.special.erf(z[:-1]),
                             0.0))


def ect_smaller_sigma(sigma_t: Array, stage, sigma_min: float) -> Array:
  """ECT's r(t): the gap to t shrinks by half per stage; r never below sigma_min."""
  factor = jnp.exp2(-(jnp.asarray(stage, jnp.float32) + 1.0))
  r = sigma_t * (1.0 - factor * (1.0 + 8.0 * jax.nn.sigmoid(-sigma_t)))
  return jnp.maximum(r, sigma_min)


def truncated_lognormal(key: Array, p_mean: float, p_std: float, low: float,
                        high: float) -> Array:
  """A scalar draw of lognormal(p_mean, p_std) restricted to (low, high], by inversion."""
  cdf = lambda v: jax.scipy.stats.norm.cdf((math.log(v) - p_mean) / p_std)
  u = jax.random.uniform(key, (), jnp.float32, cdf(low), cdf(high))
  return jnp.clip(jnp.exp(p_mean + p_std * jax.scipy.special.ndtri(u)), low, high)


# ------------------------------------------------------------------ configuration


def time_range(config: ml_collections.ConfigDict) -> tuple[float, float, float, float]:
  """(t_min, t_max, sigma~_min, sigma~_max) of the consistency model, on the host."""
  vp = VPTime.create(betas_of(config))
  t_min = float(config.consistency.t_min)
  sigma_max = float(config.consistency.sigma_max)
  return (t_min, float(vp.time_of_ve_sigma(sigma_max)), float(vp.ve_sigma(t_min)), sigma_max)


def teacher_problems(config: ml_collections.ConfigDict) -> None:
  """Checks `config.teacher` for CD (a DPM run of this project that fits the student)
  before anything is loaded or compiled; raises ConfigError / CheckpointError."""
  checkpoint.check_source_run(  # config.teacher is non-empty: config.validate_consistency
      config, config.teacher, 'teacher',
      'the student starts as the teacher and learns its noise process, so they must match',
      objective='dpm')


# ------------------------------------------------------------------ the objective


class ConsistencyObjective(Objective):
  """CD (`config.objective='cd'`) or CT ('ct') with the settings of `config.consistency`.

  `teacher_step` replaces the teacher's ODE step (tests use the exact flow of Gaussian
  data); by default it is `consistency.teacher_solver` on the student's architecture with
  the frozen teacher params.
  """
  init_params_from = 'ema'
  # The pair and the noise; a third key, unused, keeps the layout (and the numbers) of the
  # runs made when every objective split three.
  num_draw_keys = 3

  def __init__(self, config: ml_collections.ConfigDict, model,
               teacher_step: TeacherStep | None = None):
    self.config = config
    self.distil = config.objective == 'cd'
    with jax.ensure_compile_time_eval():  # host constants, even if built inside a trace
      self._setup(config, model, teacher_step)

  def _setup(self, config, model, teacher_step):
    c = config.consistency
    self.vp = VPTime.create(betas_of(config))
    self.parametrisation = Parametrisation.from_config(c)
    self.apply = make_apply_fn(model)
    self.model = model
    self.shape = image_shape(config)
    self.class_cond = bool(config.model.num_classes)
    self.t_min, self.t_max, self.sigma_min, self.sigma_max = time_range(config)
    self.perturbed_t_range = perturbed_t_range(config)
    self.mu = float(c.target_ema)
    self.total_updates = int(config.training.num_steps) * updates_per_minibatch(config)
    self.c = c
    if c.pairs == 'grid':
      if c.grid == 'karras':
        sigmas = karras_sigmas(int(c.num_points), self.sigma_min, self.sigma_max, float(c.rho))
        times = self.vp.time_of_ve_sigma(sigmas).at[0].set(self.t_min)
      else:
        times = jnp.linspace(self.t_min, self.t_max, int(c.num_points), dtype=jnp.float32)
      self.grid = np.asarray(times)
    self.teacher_step = teacher_step if teacher_step is not None else self._teacher_step

  # ---- the consistency function and the teacher

  def f(self, params, x: Array, t: Array, y, train: bool, rng) -> Array:
    """f_params(x, t) in float32."""
    out = self.apply(params, x, t, y, train, rng)
    return self.parametrisation(self.vp, x, t, out[..., :self.shape[-1]])

  def _teacher_step(self, frozen, x, t, s, y):
    def eps_fn(x, t):
      out = self.apply(frozen['teacher'], x, t, y, False, None)
      return out[..., :self.shape[-1]].astype(jnp.float32)
    return TEACHER_SOLVERS[self.c.teacher_solver](eps_fn, self.vp, x, t, s)

  # ---- state and frozen extras

  def init_state(self, params):
    return {'target': jax.tree.map(jnp.copy, params)} if self.mu > 0 else ()

  @property
  def default_init_from(self) -> str:
    return self.config.get('teacher', '') if self.distil else ''

  def frozen_shapes(self):
    return {'teacher': abstract_params(self.config, self.model)} if self.distil else ()

  def load_frozen(self, mesh: Mesh):
    """The teacher's EMA params (its first EMA tree, latest checkpoint), read-only. The
    teacher run was checked before the objective was built (objectives.check_frozen_sources)."""
    if not self.distil:
      return ()
    abstract = abstract_params(self.config, self.model, parallel.replicated(mesh))
    return {'teacher': checkpoint.read_ema_params(self.config.teacher, abstract)}

  def init_frozen(self, params):
    return {'teacher': params} if self.distil else ()

  # ---- one minibatch

  def _pair(self, key: Array, opt_step: Array) -> tuple[Array, Array, Array]:
    """(t, s, sigma~_t - sigma~_s) of one example."""
    c = self.c
    if c.pairs == 'grid':
      n = jax.random.randint(key, (), 0, len(self.grid) - int(c.skip))
      grid = jnp.asarray(self.grid)
      t, s = grid[n + int(c.skip)], grid[n]
      return t, s, self.vp.ve_sigma(t) - self.vp.ve_sigma(s)
    if c.pairs == 'improved_ct':
      num_points = improved_ct_num_points(opt_step, self.total_updates, int(c.n_start),
                                          int(c.n_max))
      sigmas = karras_sigmas(num_points, self.sigma_min, self.sigma_max, float(c.rho),
                             size=int(c.n_max) + 1)
      logits = lognormal_interval_logits(sigmas, float(c.p_mean), float(c.p_std))
      logits = jnp.where(jnp.arange(logits.shape[0]) < num_points - 1, logits, -jnp.inf)
      n = jax.random.categorical(key, logits)
      sigma_t, sigma_s = sigmas[n + 1], sigmas[n]
      s = jnp.where(n == 0, self.t_min, self.vp.time_of_ve_sigma(sigma_s))
      return self.vp.time_of_ve_sigma(sigma_t), s, sigma_t - sigma_s
    sigma_t = truncated_lognormal(key, float(c.p_mean), float(c.p_std), self.sigma_min,
                                  self.sigma_max)
    stage = jnp.asarray(opt_step, jnp.int32) // int(c.ect_stage_updates)
    sigma_s = ect_smaller_sigma(sigma_t, stage, self.sigma_min)
    s = jnp.where(sigma_s <= self.sigma_min, self.t_min, self.vp.time_of_ve_sigma(sigma_s))
    return self.vp.time_of_ve_sigma(sigma_t), s, jnp.maximum(sigma_t - sigma_s, 1e-12)

  def draw(self, objective_state, frozen, images, labels, keys, opt_step):
    pair_keys, noise_keys = keys[:, 0], keys[:, 1]
    t, s, gap = jax.vmap(lambda k: self._pair(k, opt_step))(pair_keys)
    noise = jax.vmap(lambda k: jax.random.normal(k, self.shape, images.dtype))(noise_keys)
    alpha, sigma = (broadcast_to(v, images.ndim) for v in (self.vp.alpha(t), self.vp.sigma(t)))
    x_t = alpha * images + sigma * noise
    y = labels if self.class_cond else None
    if self.distil:
      x_s = lax.stop_gradient(self.teacher_step(frozen, x_t, t, s, y))
    else:
      x_s = (broadcast_to(self.vp.alpha(s), images.ndim) * images
             + broadcast_to(self.vp.sigma(s), images.ndim) * noise)
    weights = 1.0 / gap if self.c.weighting == 'inverse_gap' else jnp.ones_like(gap)
    batch = {'x0': images, 'noise': noise, 't': t, 's': s, 'x_t': x_t, 'x_s': x_s,
             'weights': weights}
    if self.class_cond:
      batch['label'] = labels
    if self.mu > 0:
      batch['target_params'] = objective_state['target']
    if self.distil and self.c.target_at == 'perturbed':
      batch['frozen'] = frozen
    return batch

  def _target_input(self, batch, delta):
    if delta is None or self.c.target_at == 'clean':
      return batch['x_s']
    delta = lax.stop_gradient(delta)
    if self.distil:
      return self.teacher_step(batch['frozen'], batch['x_t'] + delta, batch['t'], batch['s'],
                               batch.get('label'))
    ratio = self.vp.sigma(batch['s']) / self.vp.sigma(batch['t'])
    return batch['x_s'] + broadcast_to(ratio, delta.ndim) * delta

  def loss_fn(self, params, batch, delta, rng):
    y = batch.get('label')
    x_in = batch['x_t'] if delta is None else batch['x_t'] + delta
    student = self.f(params, x_in, batch['t'], y, True, rng)
    target_params = batch.get('target_params', params)
    target = lax.stop_gradient(self.f(lax.stop_gradient(target_params),
                                      self._target_input(batch, delta), batch['s'], y, True,
                                      rng))
    losses = distance(student, target, self.c.distance)
    return jnp.mean(losses * batch['weights']), {'losses': losses}

  def input_sigma(self, batch):
    return self.vp.sigma(batch['t'])

  def after_update(self, objective_state, params, batch, aux):
    if self.mu == 0:
      return objective_state
    mu = self.mu
    return {'target': jax.tree.map(lambda e, p: mu * e + (1.0 - mu) * lax.stop_gradient(p),
                                   objective_state['target'], params)}
