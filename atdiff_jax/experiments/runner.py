"""The AT-vs-standard experiment as a library: fine-tune every arm per seed, evaluate, report.

`python -m atdiff_jax.experiments.at_vs_standard` is its command line (see there).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, NamedTuple, Sequence

import jax

from atdiff_jax import checkpoint, config as config_lib, evaluation, train, writing
from atdiff_jax.evaluation import report, sweep
from atdiff_jax.experiments import arms as arms_lib
from atdiff_jax.experiments import plateau
from atdiff_jax.experiments import summary as summary_lib
from atdiff_jax import workers as workers_lib
from atdiff_jax.evaluation import settings as eval_settings

RESULT_FILE = 'result.json'
Stopped = plateau.Stopped


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


def evaluate_checkpoint(config, workdir: str, out_dir: str,
                        probe: tuple[str, int] | None) -> dict[str, Any]:
  """The sweep of `config.eval` (into `out_dir`) and the mismatch probe of `workdir`'s latest
  checkpoint: {'metric', 'scores', 'mismatch'[, 'mismatch_setting']}."""
  run = evaluation.open_run(workdir, config, 'eval')
  rows = evaluation.evaluate(run, out_dir, verbose=False)
  metric = next(m for m in report.PLOT_METRICS if m in rows[0])
  result = {'metric': metric, 'step': int(run.step),
            'scores': {summary_lib.cell_key(row['sampler'], row['nfe']): row[metric]
                       for row in rows},
            'mismatch': {}}
  if probe is not None:
    sampler, nfe = probe
    ev = run.config.eval
    mismatch = evaluation.measure_mismatch(
        run, sampler, nfe, int(ev.num_samples), 1.0, int(ev.batch_size), int(ev.seed),
        **eval_settings.options_of(ev, sampler))
    # Means over the sampler's steps: the model's eps-error on its own x_t and on q(x_t|x0).
    result['mismatch'] = {k: float(mismatch.values[k].mean())
                          for k in summary_lib.MISMATCH_FIELDS}
    result['mismatch_setting'] = summary_lib.cell_key(sampler, nfe)
  return result


def run_arm(config, workdir: str, arm: arms_lib.Arm, seed: int | None,
            probe: tuple[str, int] | None, checkpoint_dir: str | None = None
            ) -> dict[str, Any]:
  """Fine-tunes (unless `checkpoint_dir` gives the checkpoint to score as it is), evaluates
  and probes one (arm, seed); returns (and writes) its result."""
  start = time.perf_counter()
  if checkpoint_dir is None:
    state = train.train(config, workdir)
    if int(state.step) < int(config.training.num_steps):  # stopped (Ctrl-C, SIGTERM)
      raise Stopped(f'{arm.name} seed {seed} stopped at minibatch {int(state.step)}; run the '
                    'same command to resume')
  trained = time.perf_counter()
  scored = evaluate_checkpoint(config, checkpoint_dir or workdir,
                               os.path.join(workdir, sweep.EVAL_DIR), probe)
  result = {'arm': arm.name, 'about': arm.about, 'seed': seed, 'metric': scored['metric'],
            'updates': (0 if checkpoint_dir else
                        scored['step'] * config_lib.updates_per_minibatch(config)),
            'scores': scored['scores'], 'mismatch': scored['mismatch']}
  if 'mismatch_setting' in scored:
    result['mismatch_setting'] = scored['mismatch_setting']
  result['train_s'] = round(trained - start, 1)
  result['eval_s'] = round(time.perf_counter() - trained, 1)
  os.makedirs(workdir, exist_ok=True)
  writing.atomic_write(os.path.join(workdir, RESULT_FILE), json.dumps(result, indent=2))
  return result


def fine_tune_updates(base_updates: int, ratio: float, arms: Sequence[arms_lib.Arm],
                      base_config) -> int:
  """At least `ratio` times the base's optimizer updates, rounded up to whole minibatches
  of every arm (free AT's K updates per minibatch)."""
  step = 1
  for arm in arms:
    config = base_config.copy_and_resolve_references()
    config.unlock()
    arm.apply(config)
    step = math.lcm(step, config_lib.updates_per_minibatch(config))
  return max(step, math.ceil(ratio * base_updates / step) * step)


def _plan(base_config, workdir, arms, seeds_by_arm, updates, lr, base_dir, source_field):
  """(arm, seed, config or None for the base itself, folder) of every run, each config
  checked: a bad one stops the experiment before anything trains.

  Seed by seed: every arm's first seed, then every arm's second, ..., so that an experiment
  cut short still compares all arms on the seeds it finished.
  """
  plan = []
  order = sorted(((i, arm, seed) for arm in arms
                  for i, seed in enumerate(seeds_by_arm[arm.name])), key=lambda x: x[0])
  for _, arm, seed in order:
    folder = os.path.join(workdir, 'arms', arm.name, f'seed{seed}')
    if arm.name == arms_lib.BASE.name:
      plan.append((arm, None, None, os.path.join(workdir, 'arms', arm.name)))
      continue
    try:
      config = arms_lib.arm_config(base_config, arm, seed, updates, lr, base_dir,
                                   source_field)
    except ValueError as e:
      raise config_lib.ConfigError(f'--updates={updates}: {e}') from None
    config_lib.validate_training(config, jax.device_count(), jax.process_count())
    eval_settings.validate_eval(config, 'eval', jax.device_count())
    plan.append((arm, seed, config, folder))
  return plan


def run_experiment(base_config, workdir: str, *, base: str = '',
                   arm_names: Sequence[str] = arms_lib.SHORT_ARMS,
                   seeds: Sequence[int] = (0, 1, 2),
                   seeds_by_arm: dict[str, Sequence[int]] | None = None,
                   updates: int = 300, updates_ratio: float | None = None,
                   lr: float = 1e-4,
                   samplers: Sequence[str] = ('ancestral', 'ddim', 'dpm_solver++'),
                   nfes: Sequence[int] = (5, 10, 20), num_samples: int = 512,
                   eval_seed: int = 1000, eval_batch: int = 256,
                   probe: tuple[str, int] | None = ('ddim', 10),
                   base_rule: plateau.PlateauRule | None = None,
                   known_arms: dict[str, arms_lib.Arm] | None = None,
                   reference: str = 'standard', source_field: str = 'init_from',
                   title: str = 'AT vs standard training', workers: int = 1) -> dict[str, Any]:
  """The whole experiment (see the module doc); returns the summary.

  `seeds_by_arm` gives an arm other seeds than `seeds`. `updates_ratio` sets the fine-tuning
  updates to that multiple of the base's (else `updates`). `base_rule` trains the base until
  its metric stops improving (else for `base_config`'s num_steps). `source_field` is the
  field that points the arms at the base: init_from (fine-tuning) or teacher (distillation).
  `workers` > 1 runs that many (arm, seed) runs side by side (`workers.run_jobs`; 0: one per
  core); the base trains first, alone.
  """
  arms = arms_lib.resolve_arms(arm_names, known_arms, reference)
  seeds_by_arm = {arm.name: tuple((seeds_by_arm or {}).get(arm.name, seeds)) for arm in arms}
  for name, arm_seeds in seeds_by_arm.items():
    if not arm_seeds or len(set(arm_seeds)) != len(arm_seeds):
      raise config_lib.ConfigError(f'seeds {list(arm_seeds)} of arm {name}: give one or more '
                                   'distinct seeds')
  seeds_by_arm[arms_lib.BASE.name] = (None,)  # one checkpoint, no training seed
  if base_rule is not None:
    base_rule.check()
  workers = workers_lib.resolve_workers(workers, jax.default_backend(), jax.process_count(),
                                        jax.local_device_count())
  base_dir = base or os.path.join(workdir, 'base')
  # Every config is built and checked before anything trains or compiles.
  base_config = base_config.copy_and_resolve_references()
  eval_block(base_config, samplers, nfes, num_samples, eval_seed, eval_batch, probe)
  trial_updates = (fine_tune_updates(1, 1.0, arms, base_config) if updates_ratio is not None
                   else updates)
  _plan(base_config, workdir, arms, seeds_by_arm, trial_updates, lr, base_dir, source_field)
  if probe is not None:
    eval_settings.validate_eval(base_config, 'sample', jax.device_count())
  base_record = None
  if base:
    checkpoint.usable_checkpoint(base)  # a missing or damaged base stops here
  else:
    print(f'experiment: base run -> {base_dir}', flush=True)
    if base_rule is not None:
      base_record = plateau.train_to_plateau(base_config, base_dir, base_rule)
    else:
      train.train(base_config, base_dir)
  base_updates = _checkpoint_updates(base_dir)
  if updates_ratio is not None:
    updates = fine_tune_updates(base_updates, updates_ratio, arms, base_config)
  plan = _plan(base_config, workdir, arms, seeds_by_arm, updates, lr, base_dir, source_field)

  results = _run_plan(plan, base_config, base_dir, probe, workers)
  summary = summary_lib.summarize(results, [a.name for a in arms], reference)
  settings = {'base': base_dir, 'base optimizer updates': base_updates,
              'arms': ', '.join(a.name for a in arms),
              'seeds': '; '.join(f'{a.name}: {", ".join(map(str, seeds_by_arm[a.name]))}'
                                 for a in arms if a.name != arms_lib.BASE.name),
              'optimizer updates per arm': updates, 'fine-tuning lr': lr,
              'samples per cell': num_samples, 'eval seed': eval_seed,
              'mismatch probe': f'{probe[0]} NFE {probe[1]}' if probe else 'none'}
  if base_record is not None:
    settings['base stop'] = (f'minibatch {base_record["stopped_at"]}: '
                             f'{base_record["reason"]} (see base/{plateau.CURVE_PNG})')
  if jax.process_index() == 0:
    writing.atomic_write(os.path.join(workdir, 'results.json'), json.dumps(
        {'settings': settings, 'summary': summary, 'runs': results,
         'base_curve': base_record}, indent=2))
    markdown = summary_lib.to_markdown(summary, settings, title)
    writing.atomic_write(os.path.join(workdir, 'results.md'), markdown)
    summary_lib.plot(summary, os.path.join(workdir, f'{summary["metric"]}_vs_nfe.png'))
    print(markdown, flush=True)
  return summary


def _run_plan(plan, base_config, base_dir: str, probe, workers: int) -> list[dict[str, Any]]:
  """Every planned run's result, in plan order: read where it is done, else run (by
  `workers` side by side where there are several runs left)."""
  results, labels, jobs, todo = {}, {}, [], []
  for i, (arm, seed, config, arm_dir) in enumerate(plan):
    labels[i] = f'{arm.name}' + ('' if seed is None else f' seed {seed}')
    path = os.path.join(arm_dir, RESULT_FILE)
    if os.path.isfile(path):
      with open(path) as f:
        results[i] = json.load(f)
      print(f'experiment: [{i + 1}/{len(plan)}] {labels[i]}: done earlier, skipped', flush=True)
      continue
    if config is None:  # the base itself, scored with the arms' eval settings
      jobs.append(Job(base_config, arm_dir, arm, None, probe, base_dir))
    else:
      jobs.append(Job(config, arm_dir, arm, seed, probe, None))
    todo.append(i)
  start = time.perf_counter()

  def started(k: int) -> None:
    i, job = todo[k], jobs[k]
    length = ('' if job.checkpoint_dir else f', {job.config.training.num_steps} minibatches')
    print(f'experiment: [{i + 1}/{len(plan)}] {labels[i]}: {job.arm.about}{length}', flush=True)

  def finished(k: int, result: dict[str, Any]) -> None:
    i = todo[k]
    results[i] = result
    done_now = sum(1 for j in todo if j in results)
    per_run = (time.perf_counter() - start) / done_now  # wall time: counts the side by side
    scores = ' | '.join(f'{cell} {value:.4g}' for cell, value in result['scores'].items())
    print(f'experiment: [{i + 1}/{len(plan)}] {labels[i]}: train {result["train_s"]:.0f} s, '
          f'eval {result["eval_s"]:.0f} s | {result["metric"]}: {scores} | ETA '
          f'{per_run * (len(todo) - done_now) / 60:.0f} min', flush=True)

  workers = min(workers, len(jobs))
  if workers > 1:
    print(f'experiment: {len(jobs)} runs, {workers} side by side', flush=True)
    try:
      workers_lib.run_jobs(run_job, jobs, [labels[i] for i in todo], workers, started,
                           finished)
    except KeyboardInterrupt:  # the workers have saved their checkpoints and exited
      raise Stopped('stopped (Ctrl-C or SIGTERM); every run in progress saved a checkpoint: '
                    'run the same command to resume') from None
  else:
    for k, job in enumerate(jobs):
      started(k)
      finished(k, run_job(job))
  return [results[i] for i in sorted(results)]


class Job(NamedTuple):
  """One planned run: run_arm's arguments (plain data: a worker's job pickles)."""
  config: Any
  workdir: str
  arm: arms_lib.Arm
  seed: int | None
  probe: tuple[str, int] | None
  checkpoint_dir: str | None


def run_job(job: Job) -> dict[str, Any]:
  return run_arm(*job)


def _checkpoint_updates(workdir: str) -> int:
  """Optimizer updates of a run's latest checkpoint (minibatches times K from its config)."""
  step = int(os.path.basename(checkpoint.find_checkpoint(workdir)))
  return step * config_lib.updates_per_minibatch(checkpoint.load_config(workdir))
