"""Evaluation results on disk: results.json, results.csv, results.md and fid_vs_nfe.png.

A result row is a flat dict: the cell (step, weights, sampler, nfe, eps_scale,
num_samples, seed, sampler_options), its metrics (`METRICS`) and its timing.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from typing import Any, Iterable, Sequence

from atdiff_jax.writing import atomic_write, markdown_table, save_figure

log = logging.getLogger(__name__)

KEY_FIELDS = ('step', 'weights', 'sampler', 'nfe', 'eps_scale', 'num_samples', 'seed',
              'sampler_options')
METRICS = ('fid', 'sfid', 'is', 'is_std', 'precision', 'recall', 'fd_digits', 'fd_pixels')
PLOT_METRICS = ('fid', 'fd_digits', 'fd_pixels')  # first one present is plotted
TIMING = ('seconds', 'images_per_s')
RESULTS_JSON, RESULTS_CSV, RESULTS_MD, PLOT_PNG = (
    'results.json', 'results.csv', 'results.md', 'fid_vs_nfe.png')

Row = dict[str, Any]


def row_key(row: Row) -> str:
  """The identity of a cell: rows with the same key are the same measurement."""
  return json.dumps({k: row.get(k) for k in KEY_FIELDS}, sort_keys=True)


def load_rows(out_dir: str) -> list[Row]:
  """The rows of `out_dir/results.json` (empty when there is none yet)."""
  path = os.path.join(out_dir, RESULTS_JSON)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return list(json.load(f)['rows'])


def _metric_columns(rows: Iterable[Row]) -> list[str]:
  present = {k for row in rows for k in row}
  return [m for m in METRICS if m in present]


def _sorted(rows: Sequence[Row]) -> list[Row]:
  return sorted(rows, key=lambda r: (r['step'], r['weights'], r['num_samples'], r['seed'],
                                     r['sampler'], r['eps_scale'], -r['nfe']))


def to_csv(rows: Sequence[Row]) -> str:
  columns = list(KEY_FIELDS[:-1]) + _metric_columns(rows) + list(TIMING) + ['sampler_options']
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, columns, extrasaction='ignore', lineterminator='\n')
  writer.writeheader()
  for row in _sorted(rows):
    writer.writerow({**row, 'sampler_options': json.dumps(row.get('sampler_options', {}),
                                                          sort_keys=True)})
  return buffer.getvalue()


def format_value(value: Any) -> str:
  if value is None:
    return '-'
  if isinstance(value, float):
    return f'{value:.3f}' if abs(value) < 1e4 else f'{value:.4g}'
  return str(value)


def _groups(rows: Sequence[Row]) -> dict[tuple, list[Row]]:
  """Rows by (step, weights, num_samples, seed): one comparable sweep each."""
  groups: dict[tuple, list[Row]] = {}
  for row in _sorted(rows):
    groups.setdefault((row['step'], row['weights'], row['num_samples'], row['seed']),
                      []).append(row)
  return groups


def plot_metric(rows: Sequence[Row]) -> str | None:
  return next((m for m in PLOT_METRICS if any(m in r for r in rows)), None)


def to_markdown(rows: Sequence[Row], title: str = 'Evaluation') -> str:
  """Per sweep: the main metric by NFE (one row per sampler and lambda), then every cell."""
  lines = [f'# {title}', '']
  for (step, weights, num_samples, seed), group in _groups(rows).items():
    metric = plot_metric(group)
    lines += [f'## Step {step}, {weights}, {num_samples} samples, seed {seed}', '']
    if metric:
      nfes = sorted({r['nfe'] for r in group}, reverse=True)
      lines += [f'{metric} by NFE (lower is better):', '']
      body = []
      for sampler, eps_scale in dict.fromkeys((r['sampler'], r['eps_scale']) for r in group):
        values = {r['nfe']: r.get(metric) for r in group
                  if (r['sampler'], r['eps_scale']) == (sampler, eps_scale)}
        body.append([sampler, eps_scale] + [values.get(n) for n in nfes])
      lines += markdown_table(['sampler', 'eps_scale'] + [f'NFE {n}' for n in nfes], body,
                               format_value) + ['']
    metrics = _metric_columns(group)
    lines += ['All cells:', '']
    header = ['sampler', 'nfe', 'eps_scale'] + metrics + list(TIMING)
    lines += markdown_table(header, [[r.get(k) for k in header] for r in group],
                             format_value) + ['']
  return '\n'.join(lines)


def plot_vs_nfe(rows: Sequence[Row], path: str, title: str = '') -> bool:
  """One line per (sampler, lambda) of the main metric against NFE; False without matplotlib."""
  metric = plot_metric(rows)
  if metric is None:
    return False
  try:
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  except ImportError:
    log.warning('matplotlib is not installed: no %s (pip install matplotlib)', path)
    return False
  figure = Figure(figsize=(6.4, 4.2), dpi=120)
  axes = figure.add_subplot()
  nfes = sorted({r['nfe'] for r in rows})
  for sampler, eps_scale in dict.fromkeys((r['sampler'], r['eps_scale']) for r in rows):
    points = sorted((r['nfe'], r[metric]) for r in rows
                    if (r['sampler'], r['eps_scale']) == (sampler, eps_scale) and metric in r)
    if points:
      axes.plot(*zip(*points), marker='o', label=f'{sampler}, λ={eps_scale:g}')
  axes.set_xscale('log')
  axes.set_xticks(nfes, [str(n) for n in nfes])
  axes.minorticks_off()
  axes.set_xlabel('NFE (network evaluations)')
  axes.set_ylabel(metric)
  axes.set_title(title or f'{metric} vs NFE')
  axes.grid(True, alpha=0.3)
  axes.legend()
  save_figure(figure, path)
  return True


def write_reports(rows: Sequence[Row], out_dir: str, plot_rows: Sequence[Row] | None = None,
                  meta: dict[str, Any] | None = None) -> None:
  """Writes all four files; the plot shows `plot_rows` (default: the latest sweep)."""
  os.makedirs(out_dir, exist_ok=True)
  rows = _sorted(rows)
  atomic_write(os.path.join(out_dir, RESULTS_JSON),
               json.dumps({**(meta or {}), 'rows': rows}, indent=2))
  atomic_write(os.path.join(out_dir, RESULTS_CSV), to_csv(rows))
  atomic_write(os.path.join(out_dir, RESULTS_MD), to_markdown(rows))
  if plot_rows is None:
    plot_rows = list(_groups(rows).values())[-1] if rows else []
  if plot_rows:
    first = plot_rows[0]
    plot_vs_nfe(plot_rows, os.path.join(out_dir, PLOT_PNG),
                f'{plot_metric(plot_rows)} vs NFE: step {first["step"]}, {first["weights"]}, '
                f'{first["num_samples"]} samples')
