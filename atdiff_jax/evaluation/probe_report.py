"""The probes' results on disk: tables as .json, .csv and .md, and their plots (PNG)."""
from __future__ import annotations

import csv
import io
import json
from typing import Any, Sequence

import numpy as np

from atdiff_jax.evaluation import mismatch as mismatch_lib
from atdiff_jax import writing
from atdiff_jax.evaluation import report

Row = dict[str, Any]


def write_table(rows: Sequence[Row], path_stem: str, title: str, meta: dict[str, Any]) -> None:
  """`rows` as <stem>.json (with `meta`), .csv and .md."""
  columns = list(dict.fromkeys(k for row in rows for k in row))
  writing.atomic_write(f'{path_stem}.json', json.dumps({**meta, 'rows': list(rows)}, indent=2))
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=columns)
  writer.writeheader()
  writer.writerows(rows)
  writing.atomic_write(f'{path_stem}.csv', out.getvalue())
  settings = ', '.join(f'{k} {v}' for k, v in meta.items() if not isinstance(v, dict))
  lines = [f'# {title}', '', settings, '']
  lines += writing.markdown_table(columns, [[row.get(c) for c in columns] for row in rows],
                                 report.format_value)
  writing.atomic_write(f'{path_stem}.md', '\n'.join(lines) + '\n')


def _figure(num_axes: int):
  try:
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  figure = Figure(figsize=(5.2 * num_axes, 4.0), dpi=110)
  return figure, [figure.add_subplot(1, num_axes, i + 1) for i in range(num_axes)]


def plot_mismatch(result: mismatch_lib.MismatchResult, path: str) -> bool:
  """Left: eps-error on the sampler's x_t and on q's, per step. Right: eps mean squares."""
  made = _figure(2)
  if made is None:
    return False
  figure, (left, right) = made
  steps = np.arange(result.nfe)
  v = result.values
  left.plot(steps, v['err_sampler'], marker='o', label="sampler's x_t")
  left.plot(steps, v['err_q'], marker='s', label='x_t ~ q(x_t | x0)')
  left.set_yscale('log')
  left.set_ylabel('eps mean squared error')
  left.set_title('eps-error per sampler step')
  right.plot(steps, v['eps_ms_sampler'], marker='o', label="sampler's x_t")
  right.plot(steps, v['eps_ms_q'], marker='s', label='x_t ~ q(x_t | x0)')
  right.set_ylabel('mean square of predicted eps')
  right.set_title('eps norm (exposure bias: sampler above q)')
  for axes in (left, right):
    axes.set_xlabel('sampler step (t from high to low)')
    axes.set_xticks(steps, [f'{t:.0f}' if i % max(1, result.nfe // 10) == 0 else ''
                            for i, t in enumerate(result.t)])
    axes.grid(True, alpha=0.3)
    axes.legend()
  figure.suptitle(f'{result.sampler}, NFE {result.nfe}, λ={result.eps_scale:g}, '
                  f'{result.num_samples} samples (tick labels: t)')
  writing.save_figure(figure, path)
  return True


def plot_denoising(rows: Sequence[Row], path: str) -> bool:
  """eps-error against t: clean, and per radius under attack."""
  made = _figure(1)
  if made is None:
    return False
  figure, (axes,) = made
  first_radius = rows[0]['radius']
  clean = [(r['t'], r['clean']) for r in rows if r['radius'] == first_radius]
  axes.plot(*zip(*clean), marker='s', color='black', label='clean')
  for radius in dict.fromkeys(r['radius'] for r in rows):
    points = [(r['t'], r['adversarial']) for r in rows if r['radius'] == radius]
    axes.plot(*zip(*points), marker='o', label=f'attacked, {rows[0]["norm"]} radius {radius:g}')
  axes.set_yscale('log')
  axes.set_xlabel('t')
  axes.set_ylabel('eps mean squared error')
  axes.set_title(f'denoising error under attack ({rows[0]["num_images"]} images)')
  axes.grid(True, alpha=0.3)
  axes.legend()
  writing.save_figure(figure, path)
  return True
