"""Training throughput of one process on all the CPU cores against worker processes side by
side, each pinned to its share (`atdiff_jax.workers`: how the experiment runs its grid).

The `none` train step is timed first in this process, then in every worker at once. Each
worker compiles on its own cores, so the workers' timed rounds overlap all but their
edges; the median round of each counts (not the best, which would favour a round run while
the others were still compiling). The throughput side by side is the workers' images/s
added up.
"""
from __future__ import annotations

import os
import statistics
from typing import Any

import ml_collections

from atdiff_jax import workers as workers_lib
from atdiff_jax.bench.train import Variant, bench_train


def bench_side_by_side(config: ml_collections.ConfigDict, workers: int, steps: int = 5,
                       warmup: int = 1, repeats: int = 3, log=None) -> dict[str, Any]:
  """Result: {'workers', 'batch_size', 'steps', 'repeats', 'one_process': {cores,
  round_s_per_call, images_per_s (median round)}, 'side_by_side': [per worker: the same],
  'total_images_per_s', 'ratio' (total over one process)}."""
  if log:
    log(f'side_by_side: one process on {len(workers_lib.available_cores())} cores')
  one = _timing(config, steps, warmup, repeats)
  if log:
    log(f'side_by_side: {workers} workers, one share of the cores each')
  rows = {}
  workers_lib.run_jobs(_worker_timing, [(config, steps, warmup, repeats)] * workers,
                       [f'worker {w}' for w in range(workers)], workers, lambda i: None,
                       rows.__setitem__, one_each=True)
  side = [rows[w] for w in range(workers)]
  total = sum(r['images_per_s'] for r in side)
  return {'workers': workers, 'batch_size': int(config.training.batch_size), 'steps': steps,
          'repeats': repeats, 'one_process': one, 'side_by_side': side,
          'total_images_per_s': total, 'ratio': total / one['images_per_s']}


def _timing(config, steps: int, warmup: int, repeats: int) -> dict[str, Any]:
  rounds = bench_train(config, [Variant('none')], steps, warmup, repeats)['variants'][0][
      'round_s_per_call']
  return {'cores': sorted(os.sched_getaffinity(0)), 'round_s_per_call': rounds,
          'images_per_s': config.training.batch_size / statistics.median(rounds)}


def _worker_timing(job: tuple) -> dict[str, Any]:
  """In a worker (module level: it pickles)."""
  return _timing(*job)
