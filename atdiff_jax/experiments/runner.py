"""The AT-vs-standard experiment as a library: fine-tune every arm per seed, evaluate, report.

`python -m atdiff_jax.experiments.at_vs_standard` is its command line (see there).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import jax

from atdiff_jax import checkpoint, config as config_lib, evaluation, train
from atdiff_jax.evaluation import report, run as run_lib
from atdiff_jax.experiments import arms as arms_lib
from atdiff_jax.experiments import summary as summary_lib
from atdiff_jax.samplers import options as sampler_options

RESULT_FILE = 'result.json'


def eval_block(config, samplers: Sequence[str], nfes: Sequence[int], num_samples: int,
               seed: int, batch_size: int, probe: tuple[str, int] | None) -> None:
  """Sets `config.eval` to the experiment's sweep (the same for every arm); its one-setting
  fields (sampler, nfe) to the probe's."""
  ev = config.eval
  if probe is not None:
    ev.sampler, ev.nfe = probe
  ev.samplers, ev.nfes, ev.eps_scales = tuple(samplers), tuple(nfes), (1.0,)
  ev.num_samples, ev.seed, ev.batch_size = num_samples, seed, batch_size
  ev.step, ev.use_ema, ev.ema_index = -1, True, 0


def run_arm(config, workdir: str, arm: arms_lib.Arm, seed: int,
            probe: tuple[str, int] | None) -> dict[str, Any]:
  """Fine-tunes, evaluates and probes one (arm, seed); returns (and writes) its result."""
  start = time.perf_counter()
  train.train(config, workdir)
  trained = time.perf_counter()
  run = evaluation.open_run(workdir, config, 'eval')
  rows = evaluation.evaluate(run, verbose=False)
  metric = next(m for m in report.PLOT_METRICS if m in rows[0])
  result = {'arm': arm.name, 'about': arm.about, 'seed': seed, 'metric': metric,
            'updates': int(run.step) * arms_lib.updates_per_minibatch(config),
            'scores': {summary_lib.cell_key(row['sampler'], row['nfe']): row[metric]
                       for row in rows},
            'mismatch': {}}
  if probe is not None:
    sampler, nfe = probe
    ev = run.config.eval
    mismatch = evaluation.measure_mismatch(
        run, sampler, nfe, int(ev.num_samples), 1.0, int(ev.batch_size), int(ev.seed),
        **run_lib.sampler_options(ev, sampler))
    # Means over the sampler's steps: the model's eps-error on its own x_t and on q(x_t|x0).
    result['mismatch'] = {k: float(mismatch.values[k].mean())
                          for k in summary_lib.MISMATCH_FIELDS}
    result['mismatch_setting'] = summary_lib.cell_key(sampler, nfe)
  result['train_s'] = round(trained - start, 1)
  result['eval_s'] = round(time.perf_counter() - trained, 1)
  report.atomic_write(os.path.join(workdir, RESULT_FILE), json.dumps(result, indent=2))
  return result


def run_experiment(base_config, workdir: str, *, base: str = '',
                   arm_names: Sequence[str] = arms_lib.DEFAULT_ARMS,
                   seeds: Sequence[int] = (0, 1, 2), updates: int = 300, lr: float = 1e-4,
                   samplers: Sequence[str] = ('ancestral', 'ddim', 'dpm_solver++'),
                   nfes: Sequence[int] = (5, 10, 20), num_samples: int = 512,
                   eval_seed: int = 1000, eval_batch: int = 256,
                   probe: tuple[str, int] | None = ('ddim', 10)) -> dict[str, Any]:
  """The whole experiment (see the module doc); returns the summary."""
  arms = arms_lib.resolve_arms(arm_names)
  if not seeds or len(set(seeds)) != len(seeds):
    raise config_lib.ConfigError(f'seeds {list(seeds)}: give one or more distinct seeds')
  base_dir = base or os.path.join(workdir, 'base')
  # Every config is built and checked before anything trains or compiles.
  base_config = base_config.copy_and_resolve_references()
  eval_block(base_config, samplers, nfes, num_samples, eval_seed, eval_batch, probe)
  plan = []
  for arm in arms:
    for seed in seeds:
      try:
        config = arms_lib.arm_config(base_config, arm, seed, updates, lr, base_dir)
      except ValueError as e:
        raise config_lib.ConfigError(f'--updates={updates}: {e}') from None
      config_lib.validate_training(config, jax.device_count(), jax.process_count())
      run_lib.validate_eval(config, 'eval', jax.device_count())
      sampler_options.check_config_options(config.eval)
      plan.append((arm, seed, config, os.path.join(workdir, 'arms', arm.name, f'seed{seed}')))
  if probe is not None:
    run_lib.validate_eval(base_config, 'sample', jax.device_count())
  if base:
    checkpoint.find_checkpoint(base)  # a missing base stops here
  else:
    print(f'experiment: base run -> {base_dir}', flush=True)
    train.train(base_config, base_dir)

  results, start, done_now = [], time.perf_counter(), 0
  for i, (arm, seed, config, arm_dir) in enumerate(plan):
    label = f'[{i + 1}/{len(plan)}] {arm.name} seed {seed}'
    path = os.path.join(arm_dir, RESULT_FILE)
    if os.path.isfile(path):
      with open(path) as f:
        results.append(json.load(f))
      print(f'experiment: {label}: done earlier, skipped', flush=True)
      continue
    print(f'experiment: {label}: {arm.about}, {config.training.num_steps} minibatches',
          flush=True)
    result = run_arm(config, arm_dir, arm, seed, probe)
    results.append(result)
    done_now += 1
    per_run = (time.perf_counter() - start) / done_now
    scores = ' | '.join(f'{k} {v:.4g}' for k, v in result['scores'].items())
    print(f'experiment: {label}: train {result["train_s"]:.0f} s, eval {result["eval_s"]:.0f} '
          f's | {result["metric"]}: {scores} | ETA '
          f'{per_run * (len(plan) - i - 1) / 60:.0f} min', flush=True)

  summary = summary_lib.summarize(results, [a.name for a in arms])
  settings = {'base': base_dir, 'arms': ', '.join(a.name for a in arms),
              'seeds': ', '.join(map(str, seeds)),
              'optimizer updates per arm': updates, 'fine-tuning lr': lr,
              'samples per cell': num_samples, 'eval seed': eval_seed,
              'mismatch probe': f'{probe[0]} NFE {probe[1]}' if probe else 'none'}
  if jax.process_index() == 0:
    report.atomic_write(os.path.join(workdir, 'results.json'), json.dumps(
        {'settings': settings, 'summary': summary, 'runs': results}, indent=2))
    markdown = summary_lib.to_markdown(summary, settings)
    report.atomic_write(os.path.join(workdir, 'results.md'), markdown)
    summary_lib.plot(summary, os.path.join(workdir, f'{summary["metric"]}_vs_nfe.png'))
    print(markdown, flush=True)
  return summary


