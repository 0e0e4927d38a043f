"""Does adversarial training beat standard training, and where? Seeds, spreads, a verdict.

  python -m atdiff_jax.experiments.at_vs_standard --config=configs/quickstart.py --workdir=DIR

From one base checkpoint (`--base=RUN`, or trained into DIR/base from --config), every arm
of `experiments.arms` fine-tunes with the same number of optimizer updates under each
training seed, into DIR/arms/<arm>/seed<s>/. Each is then evaluated with the same settings:
the eval sweep (samplers x NFEs, `--num_samples` images, one eval seed that no arm was
tuned on) and the mismatch probe (the model's eps-error on a sampler's own x_t). DIR gets
results.json (every seed's numbers), results.md (mean ± std per arm, and which arms beat
standard training beyond the seed spread) and <metric>_vs_nfe.png.

Resumable: a finished (arm, seed) keeps its result.json and is skipped; an interrupted
one resumes its training from its checkpoint and its sweep from its finished cells.
On a GPU the same command takes a larger config and more samples, e.g.
  --config=configs/cifar10_adm.py --base=runs/cifar10_adm --num_samples=10000 \\
  --config.eval.inception_weights=inception_fid.msgpack
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Sequence

from absl import app, flags
from ml_collections import config_flags

from atdiff_jax.experiments import arms as arms_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'The base run\'s config file (model, data, eval metrics).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the experiment\'s runs and reports go.')
_BASE = flags.DEFINE_string('base', '', 'A trained run of --config to fine-tune from; '
                            'empty: train one into WORKDIR/base first.')
_ARMS = flags.DEFINE_list('arms', list(arms_lib.DEFAULT_ARMS),
                          f'Arms, any of {", ".join(arms_lib.ARMS)}.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds of every arm.')
_UPDATES = flags.DEFINE_integer('updates', 300, 'Optimizer updates per fine-tuning run.',
                                lower_bound=1)
_LR = flags.DEFINE_float('lr', 1e-4, 'Fine-tuning learning rate (no warm-up).', lower_bound=0)
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 512, 'Samples per evaluation cell.',
                                    lower_bound=1)
_SAMPLERS = flags.DEFINE_list('samplers', ['ancestral', 'ddim', 'dpm_solver++'],
                              'Samplers of the sweep.')
_NFES = flags.DEFINE_list('nfes', ['5', '10', '20'], 'NFEs of the sweep.')
_EVAL_SEED = flags.DEFINE_integer('eval_seed', 1000, 'Sampling seed of every evaluation '
                                  '(the same for all arms; not a training seed).')
_EVAL_BATCH = flags.DEFINE_integer('eval_batch', 256, 'Images per sampler call.', lower_bound=1)
_PROBE = flags.DEFINE_string('probe', 'ddim:10', 'Mismatch probe sampler:NFE; empty: none.')
flags.mark_flags_as_required(['config', 'workdir'])

RESULT_FILE = 'result.json'
log = logging.getLogger(__name__)


def _int_list(name: str, values: Sequence[str]) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError:
    raise app.UsageError(f'--{name}: integers expected, got {",".join(values)}') from None


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


def _atomic_json(path: str, value: Any) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)


def run_arm(config, workdir: str, arm: arms_lib.Arm, seed: int,
            probe: tuple[str, int] | None) -> dict[str, Any]:
  """Fine-tunes, evaluates and probes one (arm, seed); returns (and writes) its result."""
  # pylint: disable=g-import-not-at-top
  from atdiff_jax import evaluation, train
  from atdiff_jax.evaluation import report, run as run_lib
  start = time.perf_counter()
  train.train(config, workdir)
  trained = time.perf_counter()
  run = evaluation.open_run(workdir, config, 'eval')
  rows = evaluation.evaluate(run, verbose=False)
  metric = next(m for m in report.PLOT_METRICS if m in rows[0])
  result = {'arm': arm.name, 'about': arm.about, 'seed': seed, 'metric': metric,
            'updates': None, 'scores': {}, 'mismatch': {}}
  for row in rows:
    result['scores'][f'{row["sampler"]} NFE {row["nfe"]}'] = row[metric]
  if probe is not None:
    sampler, nfe = probe
    ev = run.config.eval
    mismatch = evaluation.measure_mismatch(
        run, sampler, nfe, int(ev.num_samples), 1.0, int(ev.batch_size), int(ev.seed),
        **run_lib.sampler_options(ev, sampler))
    # Means over the sampler's steps: the model's eps-error on its own x_t and on q(x_t|x0).
    result['mismatch'] = {k: float(mismatch.values[k].mean()) for k in ('err_sampler', 'err_q')}
    result['mismatch_setting'] = f'{sampler} NFE {nfe}'
  result['updates'] = int(run.step) * arms_lib.updates_per_minibatch(config)
  result['train_s'] = round(trained - start, 1)
  result['eval_s'] = round(time.perf_counter() - trained, 1)
  _atomic_json(os.path.join(workdir, RESULT_FILE), result)
  return result


def run_experiment(base_config, workdir: str, *, base: str = '',
                   arm_names: Sequence[str] = arms_lib.DEFAULT_ARMS,
                   seeds: Sequence[int] = (0, 1, 2), updates: int = 300, lr: float = 1e-4,
                   samplers: Sequence[str] = ('ancestral', 'ddim', 'dpm_solver++'),
                   nfes: Sequence[int] = (5, 10, 20), num_samples: int = 512,
                   eval_seed: int = 1000, eval_batch: int = 256,
                   probe: tuple[str, int] | None = ('ddim', 10)) -> dict[str, Any]:
  """The whole experiment (see the module doc); returns the summary."""
  # pylint: disable=g-import-not-at-top
  import jax
  from atdiff_jax import checkpoint, config as config_lib, train
  from atdiff_jax.evaluation import run as run_lib
  from atdiff_jax.experiments import summary as summary_lib
  from atdiff_jax.samplers import options as sampler_options

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
    _atomic_json(os.path.join(workdir, 'results.json'),
                 {'settings': settings, 'summary': summary, 'runs': results})
    markdown = summary_lib.to_markdown(summary, settings)
    with open(os.path.join(workdir, 'results.md'), 'w') as f:
      f.write(markdown)
    summary_lib.plot(summary, os.path.join(workdir, f'{summary["metric"]}_vs_nfe.png'))
    print(markdown, flush=True)
  return summary


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s',
                      datefmt='%H:%M:%S')
  for noisy in ('absl', 'jax._src', 'orbax'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from atdiff_jax import checkpoint  # pylint: disable=g-import-not-at-top
  probe = None
  if _PROBE.value:
    sampler, _, nfe = _PROBE.value.partition(':')
    if not nfe.isdigit():
      raise app.UsageError(f'--probe={_PROBE.value!r}: expected sampler:NFE, e.g. ddim:10')
    probe = (sampler, int(nfe))
  _enable_compilation_cache(_WORKDIR.value)
  try:
    run_experiment(_CONFIG.value, _WORKDIR.value, base=_BASE.value, arm_names=_ARMS.value,
                   seeds=_int_list('seeds', _SEEDS.value), updates=_UPDATES.value,
                   lr=_LR.value, samplers=_SAMPLERS.value, nfes=_int_list('nfes', _NFES.value),
                   num_samples=_NUM_SAMPLES.value, eval_seed=_EVAL_SEED.value,
                   eval_batch=_EVAL_BATCH.value, probe=probe)
  except (ValueError, checkpoint.CheckpointError) as e:  # ConfigError, unknown arms, no base
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def _enable_compilation_cache(workdir: str) -> None:
  """Every arm and seed compiles the same sampler programs: a persistent cache (the user's,
  else one in WORKDIR) makes all but the first a lookup."""
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


if __name__ == '__main__':
  app.run(main)
