"""The mismatch probe: how far a sampler's x_t drifts from the x_t the model was trained on.

At each step i of a sampler, the model sees an x_t that the sampler built from the model's
own earlier outputs. Training only ever showed it x_t ~ q(x_t | x0) = N(alpha x0, sigma^2 I).
For each step this probe measures, over a batch whose trajectories end at samples x0:
- err_sampler: the model's eps-error on the sampler's x_t, against the noise that x_t
  carries relative to where its trajectory ends, (x_t - alpha x0) / sigma;
- err_q: its eps-error on a fresh x_t ~ q(x_t | x0) of the same x0 and time (the training
  loss on those images);
- gap = err_sampler - err_q: zero in expectation when the sampler's (x_t, x0) pairs follow
  the forward process, as for exact ancestral sampling with an exact model;
- eps_ms_sampler / eps_ms_q: the mean square of the predicted eps under both. This
  compares the two marginals of x_t alone, so it agrees for any exact sampler of an exact
  model; exposure bias shows as a too-large eps norm, which epsilon scaling corrects.
For deterministic samplers (DDIM, DPM-Solver), and at the last, noise-free step of
ancestral sampling, x0 is a function of x_t, so even an exact model has err_sampler < err_q: read their gap against other checkpoints or NFEs, and the
eps norms on their own. At the last steps sigma is small and the implied noise magnifies
any change the sampler makes to x0 after the step (clipping, say).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from atdiff_jax import config as config_lib
from atdiff_jax import parallel, samplers
from atdiff_jax.samplers import from_config
from atdiff_jax.evaluation import run as run_lib
from atdiff_jax.evaluation.generate import batch_labels
from atdiff_jax.samplers import common

def check_applies(config) -> None:
  """ConfigError unless the probe's reading holds for the run: it takes the sampler's last
  output for x0, which a consistency run with consistency.t_min > 0 does not give (its f
  ends at the t_min marginal, a noisy image), so every implied eps would be off."""
  if config_lib.is_consistency(config) and float(config.consistency.t_min) > 0:
    config_lib.fail('consistency.t_min', config.consistency.t_min,
                    'the mismatch probe reads the last sample as x0, which holds only for a '
                    'consistency run with t_min = 0')


# Per-step quantities, each a mean over examples of a per-example pixel mean.
FIELDS = ('err_sampler', 'err_q', 'eps_ms_sampler', 'eps_ms_q')


def _per_example_mean(x: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(x).reshape(x.shape[0], -1), axis=1)


def make_mismatch_fn(model_fn: Callable[..., jax.Array], sampler: str, betas, nfe: int,
                     shape, mesh: Mesh | None = None, eps_scale: float = 1.0,
                     **opts: Any) -> Callable[..., dict[str, jax.Array]]:
  """A jitted `probe(rng, y, *model_args) -> sums over the batch, per step`.

  FIELDS, `t` and `sigma` come back with shape (nfe,).
  `model_fn(x, t, y, *model_args)` is as for `samplers.make_sample_fn`. Sums (not means)
  let a caller add up batches.
  """
  sample = samplers.get_sampler(sampler)
  shape = common.check_shape(shape)
  sharding = None if mesh is None else parallel.batch_sharding(mesh)

  def probe(rng, y, *model_args):
    bound = lambda x, t, labels: model_fn(x, t, labels, *model_args)
    sample_rng, noise_rng = jax.random.split(rng)
    x0, trajectory = sample(bound, sample_rng, shape, betas, nfe, y=y, eps_scale=eps_scale,
                            sharding=sharding, return_trajectory=True, **opts)

    def one_step(_, inputs):
      i, t, alpha, sigma, x, eps = inputs
      implied = (x - alpha * x0) / sigma
      z = common.normal(jax.random.fold_in(noise_rng, i), shape, sharding)
      x_q = alpha * x0 + sigma * z
      eps_q, _ = common.call_model(bound, x_q, t, y, eps_scale)
      values = {'err_sampler': eps - implied, 'err_q': eps_q - z, 'eps_ms_sampler': eps,
                'eps_ms_q': eps_q}
      return None, {k: jnp.sum(_per_example_mean(v)) for k, v in values.items()}

    steps = jnp.arange(nfe, dtype=jnp.int32)
    _, sums = jax.lax.scan(one_step, None, (steps, trajectory.t, trajectory.alpha,
                                             trajectory.sigma, trajectory.x, trajectory.eps))
    return sums | {'t': trajectory.t, 'sigma': trajectory.sigma}

  return jax.jit(probe)


@dataclasses.dataclass(frozen=True)
class MismatchResult:
  """Per-step means of one sampler setting (arrays of length nfe, in sampling order)."""
  sampler: str
  nfe: int
  eps_scale: float
  num_samples: int
  t: np.ndarray
  sigma: np.ndarray
  values: dict[str, np.ndarray]  # FIELDS

  @property
  def gap(self) -> np.ndarray:
    return self.values['err_sampler'] - self.values['err_q']

  def rows(self) -> list[dict[str, float]]:
    """One dict per step: step, t, sigma, errors, gap, ratio and the eps mean squares."""
    rows = []
    for i in range(self.nfe):
      v = {k: float(a[i]) for k, a in self.values.items()}
      rows.append({'step': i, 't': float(self.t[i]), 'sigma': float(self.sigma[i]),
                   'err_sampler': v['err_sampler'], 'err_q': v['err_q'],
                   'gap': v['err_sampler'] - v['err_q'],
                   'ratio': v['err_sampler'] / max(v['err_q'], 1e-12),
                   'eps_ms_sampler': v['eps_ms_sampler'], 'eps_ms_q': v['eps_ms_q']})
    return rows


def run_mismatch(probe_fn: Callable[..., dict[str, jax.Array]], params: Any, sampler: str,
                 nfe: int, eps_scale: float, batch_size: int, num_samples: int, seed: int = 0,
                 num_classes: int = 0, progress: Callable[[int, int], None] | None = None
                 ) -> MismatchResult:
  """Adds up `probe_fn` over ceil(num_samples / batch_size) batches (whole batches)."""
  num_batches = max(1, math.ceil(num_samples / batch_size))
  totals, t, sigma = None, None, None
  for b in range(num_batches):
    labels = batch_labels(b, batch_size, num_classes)  # as generate labels that batch
    out = jax.device_get(probe_fn(jax.random.fold_in(jax.random.key(seed), b), labels, params))
    t, sigma = out.pop('t'), out.pop('sigma')
    totals = out if totals is None else {k: totals[k] + out[k] for k in totals}
    if progress is not None:
      progress(b + 1, num_batches)
  count = num_batches * batch_size
  values = {k: np.asarray(totals[k], np.float64) / count for k in FIELDS}
  return MismatchResult(sampler=sampler, nfe=int(nfe), eps_scale=float(eps_scale),
                        num_samples=count, t=np.asarray(t), sigma=np.asarray(sigma),
                        values=values)


def measure_mismatch(run: run_lib.Run, sampler: str = 'dpm_solver++', nfe: int = 10,
             num_samples: int = 512, eps_scale: float = 1.0, batch_size: int | None = None,
             seed: int = 0, progress: Callable[[int, int], None] | None = None,
             **opts: Any) -> MismatchResult:
  """The mismatch probe of one sampler setting on a trained run (see the module doc)."""
  config = run.config
  check_applies(config)
  # As run.sample_fn does: a consistency run samples from its own sigma_max down to its t_min.
  opts = from_config.sampler_defaults(config, sampler) | opts
  batch_size = run.default_batch_size if batch_size is None else int(batch_size)
  shape = (batch_size, *config_lib.image_shape(config))
  probe_fn = run_lib.compiled_program(
      run, 'mismatch', (sampler, int(nfe), float(eps_scale), shape, run_lib.options_key(opts)),
      lambda: make_mismatch_fn(run.model_fn(), sampler, run.betas, int(nfe), shape, run.mesh,
                               float(eps_scale), **opts))
  return run_mismatch(probe_fn, run.params, sampler, nfe, eps_scale, batch_size, num_samples,
                      seed, int(config.model.num_classes), progress)
