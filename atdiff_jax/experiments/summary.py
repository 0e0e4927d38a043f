"""Seeds -> mean and spread per arm, the comparison with standard training, and the reports.

Input: one result per (arm, seed), as `at_vs_standard` writes it:
  {'arm', 'seed', 'metric', 'scores': {'<sampler> NFE <n>': value}, 'mismatch': {...}}.
Every score is lower-is-better (FID-like metrics, the probe's eps-errors).

An arm *beats* standard training at a cell when its mean is lower by more than twice the
standard error of the difference of means, sqrt(s_arm^2 / n_arm + s_std^2 / n_std) with
sample standard deviations over seeds, and is *worse* when higher by as much; otherwise
the two are not told apart. With 3 seeds that is roughly a two-sided t-test at the 10%
level: a screen, not a proof; the per-seed values are in the JSON.

A training seed fixes the data order and the per-example draws, so an arm and standard
training with the same seed share them (free AT's minibatches are the first 1/K of
standard's). The paired difference per seed, arm - standard, is reported too: it removes
the part of the seed spread both arms share.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from atdiff_jax import writing

BETTER, WORSE, TIE, UNKNOWN = 'better', 'worse', 'no difference', 'n/a (one seed)'
MISMATCH_FIELDS = ('err_sampler', 'err_q')


def cell_key(sampler: str, nfe: int) -> str:
  return f'{sampler} NFE {nfe}'


def _stats(values: Sequence[float]) -> dict[str, Any]:
  values = [float(v) for v in values]
  std = float(np.std(values, ddof=1)) if len(values) > 1 else float('nan')
  return {'mean': float(np.mean(values)), 'std': std, 'n': len(values), 'values': values}


def compare(arm: dict[str, Any], base: dict[str, Any]) -> tuple[str, float]:
  """(verdict, arm mean - standard mean) of two cells' stats; lower is better."""
  diff = arm['mean'] - base['mean']
  if arm['n'] < 2 or base['n'] < 2:
    return UNKNOWN, diff
  se = math.sqrt(arm['std'] ** 2 / arm['n'] + base['std'] ** 2 / base['n'])
  if diff < -2.0 * se:
    return BETTER, diff
  if diff > 2.0 * se:
    return WORSE, diff
  return TIE, diff


def compare_to_point(arm: dict[str, Any], value: float) -> tuple[str, float]:
  """(verdict, arm mean - value) against one checkpoint's value (the base, which has no
  seed spread): beyond twice the arm's own standard error."""
  diff = arm['mean'] - value
  if arm['n'] < 2:
    return UNKNOWN, diff
  se = arm['std'] / math.sqrt(arm['n'])
  if diff < -2.0 * se:
    return BETTER, diff
  if diff > 2.0 * se:
    return WORSE, diff
  return TIE, diff


def summarize(results: Sequence[dict[str, Any]], arm_order: Sequence[str],
              reference: str = 'standard', base: str = 'base') -> dict[str, Any]:
  """Per arm and column: stats over seeds, the verdict against the `reference` arm and the
  paired differences to it (`paired`: stats of arm - reference over the shared seeds); with
  results of the `base` arm (the checkpoint every arm started from, scored once), also the
  verdict against it (`vs_base`, `diff_base`): the paper-style comparison."""
  columns: list[str] = []
  per_arm: dict[str, dict[str, dict[int, float]]] = {}
  for r in results:
    values = dict(r['scores']) | {f'mismatch {k}': v for k, v in r.get('mismatch', {}).items()
                                  if k in MISMATCH_FIELDS}
    for column, value in values.items():
      if column not in columns:
        columns.append(column)
      per_arm.setdefault(r['arm'], {}).setdefault(column, {})[r['seed']] = float(value)
  arms = [a for a in arm_order if a in per_arm]
  if reference not in per_arm:
    raise ValueError(f'no results of the {reference} arm: nothing to compare with')
  base_values = {column: next(iter(by_seed.values()))
                 for column, by_seed in per_arm.get(base, {}).items()}
  table = {}
  for arm in arms:
    table[arm] = {}
    for column, by_seed in per_arm[arm].items():
      stats = table[arm][column] = _stats(list(by_seed.values())) | {'seeds': list(by_seed)}
      if arm != base and column in base_values:
        stats['vs_base'], stats['diff_base'] = compare_to_point(stats, base_values[column])
      base_by_seed = per_arm[reference].get(column)
      if arm in (reference, base) or base_by_seed is None:
        continue
      stats['verdict'], stats['diff'] = compare(stats, _stats(list(base_by_seed.values())))
      shared = [seed for seed in by_seed if seed in base_by_seed]
      if shared:
        stats['paired'] = _stats([by_seed[seed] - base_by_seed[seed] for seed in shared])
  return {'metric': results[0]['metric'], 'columns': columns, 'arms': table,
          'reference': reference, 'base': base if base in per_arm else None}


def _where(cells: dict[str, Any], columns: Sequence[str], field: str) -> dict[str, str]:
  said = {BETTER: [], WORSE: []}
  for column in columns:
    verdict = cells.get(column, {}).get(field)
    if verdict in said:
      said[verdict].append(column)
  return {k: ', '.join(v) or 'nowhere' for k, v in said.items()}


def verdict_lines(summary: dict[str, Any]) -> list[str]:
  """One plain sentence per arm: where it beats the reference (and the base), where it
  loses."""
  reference, base = summary.get('reference', 'standard'), summary.get('base')
  lines = []
  for arm, cells in summary['arms'].items():
    if arm in (reference, base):
      continue
    fair = _where(cells, summary['columns'], 'verdict')
    lines.append(f'- **{arm}** beats {reference} at: {fair[BETTER]}; worse at: '
                 f'{fair[WORSE]}.')
  if base:
    for arm, cells in summary['arms'].items():
      if arm == base:
        continue
      paper = _where(cells, summary['columns'], 'vs_base')
      lines.append(f'- **{arm}** beats {base} (paper-style) at: {paper[BETTER]}; worse at: '
                   f'{paper[WORSE]}.')
  return lines


def _format(stats: dict[str, Any]) -> str:
  text = f'{stats["mean"]:.4g}'
  if not math.isnan(stats['std']):
    text += f' ± {stats["std"]:.2g}'
  verdict = stats.get('verdict')
  if verdict == BETTER:
    return f'**{text}**'
  if verdict == WORSE:
    return f'_{text}_'
  return text


def to_markdown(summary: dict[str, Any], settings: dict[str, Any],
                title: str = 'AT vs standard training') -> str:
  columns = summary['columns']
  reference, base = summary.get('reference', 'standard'), summary.get('base')
  header = ['arm'] + columns
  body = [[arm] + [_format(cells[c]) if c in cells else '' for c in columns]
          for arm, cells in summary['arms'].items()]
  lines = [f'# {title}', '']
  lines += [f'- {k}: {v}' for k, v in settings.items()]
  lines += ['', f'Mean ± sample standard deviation over seeds; {summary["metric"]} of the '
            'samples and the mismatch probe\'s eps-errors, lower is better. **Bold**: lower '
            f'than {reference} (the fair baseline: the same number of updates) by more than '
            'twice the standard error of the difference; _italic_: higher by as much.', '']
  lines += writing.markdown_table(header, body)
  if base:
    lines += ['', f'## Against the {base} checkpoint (paper-style)', '',
              f'Arm mean - {base} value; **bold**: lower by more than twice the arm\'s '
              'standard error, _italic_: higher by as much.', '']
    lines += writing.markdown_table(header, [
        [arm] + [_format_base(cells.get(c)) for c in columns]
        for arm, cells in summary['arms'].items() if arm != base])
  lines += ['', '## Verdicts', ''] + verdict_lines(summary)
  paired = [[arm] + [_format_paired(cells[c].get('paired')) if c in cells else ''
                     for c in columns]
            for arm, cells in summary['arms'].items() if arm not in (reference, base)]
  lines += ['', '## Paired differences', '',
            f'Arm - {reference} with the same training seed (shared data order and draws), '
            'mean ± sample standard deviation over seeds; negative is better.', '']
  lines += writing.markdown_table(header, paired)
  return '\n'.join(lines) + '\n'


def _format_base(stats: dict[str, Any] | None) -> str:
  if stats is None or 'diff_base' not in stats:
    return ''
  text = f'{stats["diff_base"]:+.3g}'
  return {BETTER: f'**{text}**', WORSE: f'_{text}_'}.get(stats['vs_base'], text)


def _format_paired(stats: dict[str, Any] | None) -> str:
  if stats is None:
    return ''
  text = f'{stats["mean"]:+.3g}'
  return text if math.isnan(stats['std']) else f'{text} ± {stats["std"]:.2g}'


def plot(summary: dict[str, Any], path: str) -> bool:
  """Metric vs NFE, one panel per sampler, one line per arm with ±1 std error bars."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cells: dict[str, list[tuple[int, str]]] = {}
  for column in summary['columns']:
    sampler, nfe_word, nfe = column.rpartition(' NFE ')
    if nfe_word and nfe.isdigit():
      cells.setdefault(sampler, []).append((int(nfe), column))
  if not cells:
    return False
  figure, axes = plt.subplots(1, len(cells), figsize=(4.5 * len(cells), 3.8), squeeze=False)
  for ax, (sampler, points) in zip(axes[0], cells.items()):
    points.sort()
    for arm, stats in summary['arms'].items():
      present = [(nfe, stats[c]) for nfe, c in points if c in stats]
      if not present:
        continue
      nfes = [p[0] for p in present]
      means = [p[1]['mean'] for p in present]
      errors = [0.0 if math.isnan(p[1]['std']) else p[1]['std'] for p in present]
      reference = arm == summary.get('reference', 'standard')
      ax.errorbar(nfes, means, yerr=errors, marker='o', capsize=3, label=arm,
                  linewidth=2.0 if reference else 1.2, color='black' if reference else None,
                  linestyle='--' if arm == summary.get('base') else '-')
    ax.set_xscale('log')
    ax.minorticks_off()
    ax.set_xticks([p[0] for p in points], [str(p[0]) for p in points])
    ax.set_xlabel('NFE')
    ax.set_ylabel(summary['metric'])
    ax.set_title(sampler)
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=7)
  figure.tight_layout()
  writing.save_figure(figure, path)
  return True
