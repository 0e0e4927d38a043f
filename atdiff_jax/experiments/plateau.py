"""A base run trained until its sample quality stops improving, with the curve to show it.

The base trains in chunks of `check_every` minibatches. After each chunk its EMA weights draw
`num_samples` images with one sampler setting (DDIM at NFE 20 by default) and a selection
seed that no evaluation uses, and the metric (fd_digits, FID, ...) is recorded. Training stops
at the first check where the best value has not improved by more than `min_gain` (relative)
for `patience` checks in a row, or at `max_minibatches`. The run's last checkpoint is the
base: fine-tuning starts from where training stopped, not from the best check.

WORKDIR/plateau.json holds every check and the stop (a restart reuses the checks there and
resumes training from the checkpoint); plateau.png draws the curve.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections

from atdiff_jax import train, writing
from atdiff_jax.evaluation import report, sweep
from atdiff_jax.evaluation import settings as eval_settings
from atdiff_jax.evaluation import run as run_lib
from atdiff_jax.config import updates_per_minibatch

CURVE_JSON = 'plateau.json'
CURVE_PNG = 'plateau.png'


class Stopped(Exception):
  """A run was stopped (Ctrl-C, SIGTERM) before its last minibatch: it is resumed by the
  same command, never scored half-done."""


@dataclasses.dataclass(frozen=True)
class PlateauRule:
  """When a base run counts as converged (see the module doc)."""
  check_every: int = 500
  max_minibatches: int = 6000
  patience: int = 2
  min_gain: float = 0.03
  sampler: str = 'ddim'
  nfe: int = 20
  num_samples: int = 512
  seed: int = 2000  # selection seed: not an evaluation seed, not a training seed

  def check(self) -> None:
    for name in ('check_every', 'max_minibatches', 'patience', 'num_samples', 'nfe'):
      if getattr(self, name) < 1:
        raise ValueError(f'plateau rule: {name} must be >= 1, got {getattr(self, name)}')
    if self.max_minibatches < self.check_every:
      raise ValueError(f'plateau rule: max_minibatches ({self.max_minibatches}) is below one '
                       f'check ({self.check_every})')
    if not 0 <= self.min_gain < 1:
      raise ValueError(f'plateau rule: min_gain must be in [0, 1), got {self.min_gain}')


def stop_index(values: list[float], rule: PlateauRule) -> int | None:
  """The index of the check at which the rule stops, or None to go on.

  Stops once `patience` checks in a row gave no value below (1 - min_gain) times the best
  value before them.
  """
  best, since = None, 0
  for i, value in enumerate(values):
    if best is None or value < best * (1.0 - rule.min_gain):
      best, since = value if best is None else min(best, value), 0
    else:
      best, since = min(best, value), since + 1
      if since >= rule.patience:
        return i
  return None


def train_to_plateau(config: ml_collections.ConfigDict, workdir: str,
                     rule: PlateauRule) -> dict[str, Any]:
  """Trains `config` into `workdir` until the rule stops it; returns the curve record
  ({'checks': [{'minibatch', 'updates', metric}], 'stopped_at', 'reason', ...})."""
  rule.check()
  path = os.path.join(workdir, CURVE_JSON)
  record = _load(path, rule)
  if record.get('stopped_at') is not None:
    return record
  config = config.copy_and_resolve_references()
  config.unlock()
  training = config.training
  training.checkpoint_every = rule.check_every
  training.keep_checkpoints = max(int(training.keep_checkpoints), 1)
  training.log_every = min(int(training.log_every), rule.check_every)
  training.sample_every = 0
  per_minibatch = updates_per_minibatch(config)
  checks = record['checks']
  while True:
    target = (len(checks) + 1) * rule.check_every
    training.num_steps = target
    state = train.train(config, workdir)
    if int(state.step) < target:
      raise Stopped(f'the base stopped at minibatch {int(state.step)}; run the same command '
                    'to resume')
    value, metric = _score(config, workdir, target, rule)
    checks.append({'minibatch': target, 'updates': target * per_minibatch, metric: value})
    record['metric'] = metric
    values = [c[metric] for c in checks]
    stop = stop_index(values, rule)
    if stop is not None or target + rule.check_every > rule.max_minibatches:
      record['stopped_at'] = target
      record['reason'] = (f'no gain above {rule.min_gain:.0%} in {rule.patience} checks'
                          if stop is not None else f'the cap of {rule.max_minibatches} '
                          'minibatches (not converged by the rule)')
    _save(path, record)
    print(f'experiment: base at minibatch {target}: {metric} {value:.4g} '
          f'({rule.sampler} NFE {rule.nfe})' + (f'; stopped: {record["reason"]}'
                                               if record.get('stopped_at') else ''),
          flush=True)
    if record.get('stopped_at') is not None:
      plot(record, os.path.join(workdir, CURVE_PNG))
      return record


def _score(config, workdir: str, step: int, rule: PlateauRule) -> tuple[float, str]:
  """The rule's metric of checkpoint `step`'s EMA weights."""
  eval_config = config.copy_and_resolve_references()
  run = run_lib.load_run(workdir, step, use_ema=True, ema_index=0, config=eval_config)
  metrics = sweep.setup_metrics(eval_config, run.mesh, workdir)
  scores = sweep.score_samples(run, metrics, rule.num_samples, sampler=rule.sampler,
                               nfe=rule.nfe, eps_scale=1.0,
                               batch_size=int(eval_config.eval.batch_size), seed=rule.seed,
                               **eval_settings.options_of(eval_config.eval, rule.sampler))
  metric = next(m for m in report.PLOT_METRICS if m in scores)
  return float(scores[metric]), metric


def _load(path: str, rule: PlateauRule) -> dict[str, Any]:
  rule_fields = dataclasses.asdict(rule)
  if os.path.isfile(path):
    with open(path) as f:
      record = json.load(f)
    if record.get('rule') != rule_fields:
      raise ValueError(f'{path} was made with another plateau rule ({record.get("rule")}); '
                       'use another workdir or delete it')
    return record
  return {'rule': rule_fields, 'checks': [], 'stopped_at': None}


def _save(path: str, record: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    writing.atomic_write(path, json.dumps(record, indent=2))


def plot(record: dict[str, Any], path: str) -> None:
  """The metric against minibatches, the stop marked."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  metric, rule = record['metric'], record['rule']
  steps = [c['minibatch'] for c in record['checks']]
  values = [c[metric] for c in record['checks']]
  figure, ax = plt.subplots(figsize=(5.5, 3.6))
  ax.plot(steps, values, marker='o')
  ax.axvline(record['stopped_at'], color='gray', linestyle='--', label='stop: the base')
  ax.set_xlabel('minibatch')
  ax.set_ylabel(metric)
  ax.set_title(f'base: {metric}, {rule["sampler"]} NFE {rule["nfe"]}, '
               f'{rule["num_samples"]} samples')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  figure.tight_layout()
  writing.save_figure(figure, path)
