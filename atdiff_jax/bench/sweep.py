"""Evaluating several checkpoints of one network: programs per run against once a process.

An experiment scores many runs (arms x seeds) of the same network with the same sweep. Each
run used to build and compile its sampler programs afresh (with the persistent XLA cache
on, as the experiment has it, a compile became a cache lookup after the first run); now a
process compiles each (network, sampler, NFE, batch) once and passes params as arguments.
This part scores each of `num_runs` checkpoints (fresh random params each) both ways, back
to back (so that both see the same load on the machine): first with its programs built
afresh, as before, then with the programs it has just built, as every later run now
does. The first run's fresh scoring compiles for real (empty persistent cache).
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import jax
import ml_collections

from atdiff_jax import config as config_lib
from atdiff_jax.bench.sample import random_params
from atdiff_jax.evaluation import settings as eval_settings
from atdiff_jax.evaluation import run as run_lib
from atdiff_jax.evaluation import sweep
from atdiff_jax.models import create_model
from atdiff_jax.parallel import make_mesh


def bench_sweep(config: ml_collections.ConfigDict, num_runs: int = 3, num_samples: int = 256,
                log=None) -> dict[str, Any]:
  """{'cells', 'num_samples', 'num_runs', 'per_run_s': [...], 'once_s': [...]}: seconds to
  score each run's sweep (`config.eval` samplers x NFEs) with programs built per run, then
  with programs built once for all runs."""
  config_lib.validate_model(config)
  mesh = make_mesh()
  model = create_model(config)
  cells = sweep.sweep_cells(config.eval)
  runs = []
  for i in range(num_runs):
    seeded = config.copy_and_resolve_references()
    seeded.seed = config.seed + i
    runs.append(run_lib.Run(config=config, params=random_params(seeded, model, mesh),
                            model=model, mesh=mesh, step=0, workdir=f'bench-run-{i}'))
  batch = int(config.eval.batch_size)

  def score(run) -> float:
    start = time.perf_counter()
    metrics = sweep.setup_metrics(config, mesh, tempfile.gettempdir())
    for cell in cells:
      sweep.score_samples(run, metrics, num_samples, sampler=cell.sampler, nfe=cell.nfe,
                          eps_scale=cell.eps_scale, batch_size=batch, seed=0,
                          **eval_settings.options_of(config.eval, cell.sampler))
    return time.perf_counter() - start

  old_cache = jax.config.jax_compilation_cache_dir
  with tempfile.TemporaryDirectory() as cache:
    jax.config.update('jax_compilation_cache_dir', os.path.join(cache, 'xla'))
    try:
      per_run, once = [], []
      for run in runs:
        sweep.forget_setup()  # before: every run builds its programs (the XLA cache helps)
        per_run.append(score(run))
        once.append(score(run))  # now: every run after the first reuses them
        if log:
          log(f'sweep: run {len(once)}: programs built afresh {per_run[-1]:.1f} s, '
              f'reused {once[-1]:.1f} s')
    finally:
      jax.config.update('jax_compilation_cache_dir', old_cache)
      sweep.forget_setup()
  return {'cells': [f'{c.sampler} NFE {c.nfe}' for c in cells], 'num_samples': num_samples,
          'num_runs': num_runs, 'per_run_s': per_run, 'once_s': once}
