"""The evaluation sweep: samplers x NFEs x eps scales for one checkpoint, restartable.

Every cell draws `config.eval.num_samples` images with the same seed (common random
numbers: cells differ by their sampler settings, not by their noise) and scores them with
every metric that applies (see `evaluation.metrics`):
- `fd_digits` when the run's data are the embedded digits;
- `fid`, `sfid`, `precision` and `recall` (and `is` when the weights have the classifier)
  when `config.eval.inception_weights` is set, against `config.eval.ref_stats` or statistics
  of `config.data` computed once and cached next to the weights file (with the reference
  features for precision / recall in `<stats stem>_manifold.npz`). A cache written before
  sfid / precision / recall existed is recomputed once; a `config.eval.ref_stats` file
  without their data skips them, with a warning;
- `fd_pixels` for other data of at most 32x32 pixels when there are no Inception weights.
After each cell the results are rewritten (`evaluation.report`); a restart skips the cells
already in results.json with every metric asked for.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from atdiff_jax import config as config_lib
from atdiff_jax import data
from atdiff_jax.evaluation import metrics as metrics_lib
from atdiff_jax.evaluation import report
from atdiff_jax.evaluation import settings as eval_settings
from atdiff_jax.evaluation import run as run_lib
from atdiff_jax.evaluation.generate import sample_batches
from atdiff_jax.metrics.fid import ReferenceStats

EVAL_DIR = 'eval'
Metric = tuple[metrics_lib.FeatureExtractor, ReferenceStats]


@dataclasses.dataclass(frozen=True)
class Cell:
  sampler: str
  nfe: int
  eps_scale: float


def sweep_cells(eval_config: ml_collections.ConfigDict) -> list[Cell]:
  """Every (sampler, eps_scale, nfe) of the config, in the order given."""
  return [Cell(s, int(n), float(e)) for s, e, n in itertools.product(
      eval_config.samplers, eval_config.eps_scales, eval_config.nfes)]


def dataset_tag(data_config: ml_collections.ConfigDict) -> str:
  """A file-name-safe name of the data a reference is computed from, e.g. cifar10-train-32."""
  parts = [data_config.name]
  if data_config.get('path'):
    parts.append(os.path.splitext(os.path.basename(os.path.normpath(data_config.path)))[0])
  if data_config.name not in ('digits', 'npz', 'folder'):
    parts.append(data_config.get('split') or 'train')
  parts.append(str(data_config.image_size))
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', '-'.join(parts))


def inception_stats_path(weights_path: str, data_config: ml_collections.ConfigDict) -> str:
  """<weights dir>/<weights name>_<dataset>_stats.npz."""
  stem = os.path.splitext(os.path.basename(weights_path))[0]
  return os.path.join(os.path.dirname(os.path.abspath(weights_path)),
                      f'{stem}_{dataset_tag(data_config)}_stats.npz')


# Metrics set up in this process: every run of an experiment on the same data and weights
# shares one feature extractor (one compile) and one reference.
_METRICS: dict[tuple, list[Metric]] = {}


def setup_metrics(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  out_dir: str) -> list[Metric]:
  """The (feature extractor, reference stats) pairs that apply to this run's data; built
  once a process for the same data, weights and reference."""
  ev = config.eval
  pixel_cache = out_dir if not ev.inception_weights and config.data.name != 'digits' else ''
  key = (json.dumps(config.data.to_dict(), sort_keys=True, default=str),
         ev.inception_weights, ev.ref_stats, int(ev.batch_size), mesh, pixel_cache)
  if key not in _METRICS:
    _METRICS[key] = _build_metrics(config, mesh, out_dir)
  return _METRICS[key]


def forget_setup() -> None:
  """Forgets the metrics and compiled programs set up in this process."""
  _METRICS.clear()
  run_lib.clear_compiled_programs()


def _build_metrics(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   out_dir: str) -> list[Metric]:
  ev, data_config = config.eval, config.data
  shape = (data_config.image_size, data_config.image_size, data_config.channels)
  batch_size = int(ev.batch_size)
  source = None

  def get_source():
    nonlocal source
    source = data.create_source(data_config) if source is None else source
    return source

  metrics: list[Metric] = []
  if data_config.name == 'digits':
    extractor = metrics_lib.digits_features()
    metrics.append((extractor, metrics_lib.reference_stats(get_source(), extractor,
                                                           batch_size)))
  if ev.inception_weights:
    extractor = metrics_lib.inception_features(ev.inception_weights, mesh)
    if ev.ref_stats:
      reference = metrics_lib.load_reference(ev.ref_stats)
      metrics_lib.warn_missing(extractor, reference, ev.ref_stats)
    else:
      path = inception_stats_path(ev.inception_weights, data_config)
      if not os.path.isfile(path):
        print(f'eval: computing FID reference statistics of {dataset_tag(data_config)} '
              f'-> {path}', flush=True)
      reference = metrics_lib.cached_reference_stats(
          path, get_source(), extractor, batch_size, dataset=dataset_tag(data_config),
          weights=os.path.basename(ev.inception_weights))
    metrics.append((extractor, reference))
  elif data_config.name != 'digits' and np.prod(shape) <= metrics_lib.MAX_PIXEL_DIM:
    extractor = metrics_lib.pixel_features(shape)
    path = os.path.join(out_dir, f'fd_pixels_{dataset_tag(data_config)}_stats.npz')
    metrics.append((extractor, metrics_lib.cached_reference_stats(
        path, get_source(), extractor, batch_size, dataset=dataset_tag(data_config))))
  if not metrics:
    raise config_lib.ConfigError(
        f'config.eval.inception_weights is empty and no offline metric fits '
        f'{data_config.name} images of {shape}: set it to a converted weights file '
        '(python -m atdiff_jax.tools.convert_inception)')
  return metrics


def _metric_names(metrics: list[Metric]) -> list[str]:
  return [name for extractor, reference in metrics
          for name in metrics_lib.metric_names(extractor, reference)]


def score_samples(run: run_lib.Run, metrics: list[Metric], num_samples: int, *,
                  sampler: str, nfe: int, eps_scale: float, batch_size: int, seed: int,
                  **opts: Any) -> dict[str, Any]:
  """Draws `num_samples` images and scores them: {metric: value, 'seconds', 'images_per_s'}.

  `opts` go to the sampler. images_per_s (sampling and features) leaves out the first
  batch, which compiles.
  """
  accumulators = [metrics_lib.MetricAccumulator(extractor) for extractor, _ in metrics]
  start = time.perf_counter()
  first_done, first_count, count = None, 0, 0
  for _, images, _ in sample_batches(run, num_samples, sampler=sampler, nfe=nfe,
                                     eps_scale=eps_scale, batch_size=batch_size, seed=seed,
                                     **opts):
    for accumulator in accumulators:
      accumulator.update(images)
    count += len(images)
    if first_done is None:
      first_done, first_count = time.perf_counter(), count
  end = time.perf_counter()
  rate = ((count - first_count) / (end - first_done) if count > first_count
          else count / (end - start))
  result: dict[str, Any] = {}
  for accumulator, (_, reference) in zip(accumulators, metrics):
    result.update(accumulator.result(reference))
  return result | {'seconds': round(end - start, 3), 'images_per_s': round(rate, 2)}


def evaluate_cell(run: run_lib.Run, cell: Cell, metrics: list[Metric]) -> dict[str, Any]:
  """Samples one cell of `run.config.eval` and scores it (see `score_samples`)."""
  ev = run.config.eval
  return score_samples(run, metrics, int(ev.num_samples), sampler=cell.sampler, nfe=cell.nfe,
                       eps_scale=cell.eps_scale, batch_size=int(ev.batch_size),
                       seed=int(ev.seed), **eval_settings.options_of(ev, cell.sampler))


def evaluate(run: run_lib.Run, out_dir: str | None = None, verbose: bool = True
             ) -> list[report.Row]:
  """Runs the sweep of `run.config.eval` and writes the reports to `out_dir` (RUN/eval).

  Returns this sweep's rows (cells done earlier included).
  """
  eval_settings.validate_eval(run.config, 'eval', run.mesh.size)
  ev = run.config.eval
  out_dir = os.path.join(run.workdir, EVAL_DIR) if out_dir is None else out_dir
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(out_dir, exist_ok=True)
  metrics = setup_metrics(run.config, run.mesh, out_dir)
  wanted = _metric_names(metrics)
  rows = {report.row_key(r): r for r in report.load_rows(out_dir)}
  cells = sweep_cells(ev)
  sweep_rows = []
  for i, cell in enumerate(cells):
    base = {'step': run.step, 'weights': run.weights_name, 'sampler': cell.sampler,
            'nfe': cell.nfe, 'eps_scale': cell.eps_scale, 'num_samples': int(ev.num_samples),
            'seed': int(ev.seed), 'sampler_options': eval_settings.options_of(ev, cell.sampler)}
    key = report.row_key(base)
    label = f'[{i + 1}/{len(cells)}] {cell.sampler} NFE {cell.nfe} eps_scale {cell.eps_scale:g}'
    done = rows.get(key)
    if done is not None and all(name in done for name in wanted):
      if verbose and is_main:
        print(f'eval: {label}: already in results.json, skipped', flush=True)
      sweep_rows.append(done)
      continue
    row = base | evaluate_cell(run, cell, metrics)
    rows[key] = row
    sweep_rows.append(row)
    if is_main:
      report.write_reports(list(rows.values()), out_dir, _same_sweep(rows.values(), base),
                           {'workdir': run.workdir})
      if verbose:
        scores = ' | '.join(f'{name} {row[name]:.4g}' for name in wanted if name in row)
        print(f'eval: {label}: {scores} | {row["images_per_s"]:.1f} img/s | '
              f'{row["seconds"]:.1f} s', flush=True)
  if is_main:
    report.write_reports(list(rows.values()), out_dir, _same_sweep(rows.values(), sweep_rows[0]),
                         {'workdir': run.workdir})
  return sweep_rows


def _same_sweep(rows, like: report.Row) -> list[report.Row]:
  fields = ('step', 'weights', 'num_samples', 'seed')
  return [r for r in rows if all(r[f] == like[f] for f in fields)]


def eval_mode(workdir: str, override: ml_collections.ConfigDict | None = None
              ) -> list[report.Row]:
  """`--mode=eval`: the sweep of `config.eval` on one checkpoint, results in RUN/eval/."""
  run = run_lib.open_run(workdir, override, 'eval')
  if jax.process_index() == 0:
    ev = run.config.eval
    print(f'eval: step {run.step} ({run.weights_name}), {len(sweep_cells(ev))} cells of '
          f'{ev.num_samples} samples -> {os.path.join(run.workdir, EVAL_DIR)}', flush=True)
  rows = evaluate(run)
  if jax.process_index() == 0:
    print(f'eval: done; see {os.path.join(run.workdir, EVAL_DIR, report.RESULTS_MD)}',
          flush=True)
  return rows
