"""Benchmark: `python -m atdiff_jax.bench --config=configs/X.py [--what=train,sample,...]`.

Measures, on the current backend, the train step under each adversarial-training variant
(compile time, speed, MFU, memory; optionally with a rolled replay loop or remat), the
samplers at a fixed NFE, Inception feature extraction, and the FID pipeline end to end
(sampling + Inception + Frechet distance), and an evaluation sweep over several checkpoints
with programs built per run against once a process (`sweep`), and the host's dispatch floor
per minibatch with one and several minibatches per call (`dispatch`), and training images/s
of one process against one-core workers side by side (`side_by_side`); those three are not
in the default parts. `--reference=torch` adds guided-diffusion's PyTorch train step as a row
of the train part. It prints a markdown header, then each part's table as soon as the part
is done, so a run cut short still shows what it measured (progress goes to stderr);
`--json` keeps every number, rewritten after each part.
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from atdiff_jax import command_line

PARTS = ('train', 'sample', 'inception', 'fid', 'sweep', 'dispatch', 'side_by_side')
DEFAULT_PARTS = PARTS[:4]

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', flag_values=FLAGS,
                                          lock_config=True)
_WHAT = flags.DEFINE_list('what', list(DEFAULT_PARTS), f'Parts to run, any of {", ".join(PARTS)}.',
                          flag_values=FLAGS)
_SWEEP_RUNS = flags.DEFINE_integer('sweep_runs', 3, 'Checkpoints scored by the sweep part.',
                                   lower_bound=2, flag_values=FLAGS)
_SWEEP_SAMPLES = flags.DEFINE_integer('sweep_samples', 256, 'Samples per cell of the sweep '
                                      'part (its cells: config.eval).', lower_bound=2,
                                      flag_values=FLAGS)
_PER_CALL = flags.DEFINE_list('per_call', ['1', '4', '16'], 'Minibatches per call of the '
                               'dispatch part.', flag_values=FLAGS)
_WORKERS = flags.DEFINE_integer('workers', 0, 'Worker processes of the side_by_side part, '
                                'each on its share of the CPU cores; 0: one per core.',
                                flag_values=FLAGS)
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed calls per round.', lower_bound=1,
                              flag_values=FLAGS)
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed calls of each variant before timing.',
                               lower_bound=0, flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed rounds over all variants; the best counts.',
                                lower_bound=1, flag_values=FLAGS)
_VARIANTS = flags.DEFINE_string(
    'variants', 'none,free:3,pgd:1,pgd:3,fgsm',
    'AT variants of the train part, comma-separated: method[:K][@unrolled|@rolled]'
    '[@remat=none|attention|blocks], e.g. free:3@rolled or none@remat=blocks.',
    flag_values=FLAGS)
_REFERENCE = flags.DEFINE_enum(
    'reference', '', ['', 'torch'],
    'torch: the train part also times OpenAI\'s guided-diffusion (PyTorch) on the same '
    'config, batch and optimizer, in the same rounds, as a reference row with the ratio to '
    '`none` (torch_reference.py). Needs torch and guided-diffusion-sdk (pip install -e '
    '\'.[bench]\'): without them, or with a model.dtype other than float32, the bench exits '
    'with one line (status 2) before compiling anything. Empty: no reference.',
    flag_values=FLAGS)
_PEAK_TFLOPS = flags.DEFINE_float('peak_tflops', 0.0, 'Peak TFLOP/s of one device for the '
                                  'MFU; 0: from a table of known devices.', lower_bound=0.0,
                                  flag_values=FLAGS)
_FID_SAMPLES = flags.DEFINE_integer('fid_samples', 10_000, 'Samples of the fid part.',
                                    lower_bound=1, flag_values=FLAGS)
_FID_SAMPLER = flags.DEFINE_string('fid_sampler', 'dpm_solver++', 'Sampler of the fid part.',
                                   flag_values=FLAGS)
_SAMPLERS = flags.DEFINE_list('samplers', ['ancestral', 'ddim', 'dpm_solver++'],
                              'Samplers of the sample part.', flag_values=FLAGS)
_NFE = flags.DEFINE_integer('nfe', 10, 'Model evaluations per sample.', lower_bound=1,
                            flag_values=FLAGS)
_INCEPTION_WEIGHTS = flags.DEFINE_string(
    'inception_weights', '', 'Inception weights file; empty: random weights (same speed).',
    flag_values=FLAGS)
_INCEPTION_BATCH = flags.DEFINE_integer(
    'inception_batch', 0, 'Inception batch; 0: the config\'s training batch size.',
    lower_bound=0, flag_values=FLAGS)
_HEADER = flags.DEFINE_bool('header', True, 'Print the header (backend, versions, config); '
                            '--noheader when appending to an earlier report.',
                            flag_values=FLAGS)
_JSON = flags.DEFINE_string('json', '', 'Also write every number to this JSON file.',
                            flag_values=FLAGS)
flags.mark_flags_as_required(['config'], flag_values=FLAGS)


def _log(message: str) -> None:
  print(f'[bench] {message}', file=sys.stderr, flush=True)


def _check(config, variants) -> None:
  """Every part's input, before the first part measures anything: a bad one costs
  seconds, not the parts before it."""
  # pylint: disable=g-import-not-at-top
  import jax
  from atdiff_jax import bench, config as config_lib
  from atdiff_jax.models import inception
  UsageError = command_line.UsageError  # pylint: disable=invalid-name
  unknown = set(_WHAT.value) - set(PARTS)
  if unknown:
    raise UsageError(f'--what: unknown part(s) {", ".join(sorted(unknown))}; '
                     f'allowed: {", ".join(PARTS)}')
  unknown = set(_SAMPLERS.value + [_FID_SAMPLER.value]) - set(bench.SAMPLERS)
  if unknown:
    raise UsageError(f'--samplers: unknown {", ".join(sorted(unknown))}; '
                     f'allowed: {", ".join(bench.SAMPLERS)}')
  config_lib.validate_model(config)
  if {'sample', 'fid'} & set(_WHAT.value) and _NFE.value > config.diffusion.num_timesteps:
    raise UsageError(f'--nfe={_NFE.value} exceeds config.diffusion.num_timesteps='
                     f'{config.diffusion.num_timesteps}')
  if 'train' in _WHAT.value:
    for variant in variants:
      config_lib.validate_training(bench.variant_config(config, variant),
                                   jax.device_count())
  if 'dispatch' in _WHAT.value:
    _per_call()
  if 'side_by_side' in _WHAT.value:
    _side_by_side_workers()
  if _REFERENCE.value:
    if 'train' not in _WHAT.value:
      raise UsageError(f'--reference={_REFERENCE.value} is a row of the train part: add '
                       'train to --what')
    from atdiff_jax.bench import torch_reference
    torch_reference.check_config(config)
  if _JSON.value:
    folder = os.path.dirname(os.path.abspath(_JSON.value))
    if os.path.isdir(_JSON.value) or not os.path.isdir(folder) or not os.access(folder,
                                                                                 os.W_OK):
      raise UsageError(f'--json={_JSON.value}: cannot be written (its folder {folder} must '
                       'exist and be writable, and the path must not be a folder)')
  if _INCEPTION_WEIGHTS.value and {'inception', 'fid'} & set(_WHAT.value):
    try:
      inception.load_inception_weights(_INCEPTION_WEIGHTS.value)
    except (OSError, ValueError) as e:  # FileNotFoundError says how to make the file
      raise UsageError(f'--inception_weights: {" ".join(str(e).split())}') from None


def _per_call() -> list[int]:
  try:
    counts = [int(v) for v in _PER_CALL.value]
  except ValueError:
    counts = []
  if not counts or min(counts) < 1:
    raise command_line.UsageError(f'--per_call={",".join(_PER_CALL.value)}: must be whole '
                                  'numbers >= 1, e.g. 1,4,16')
  return counts


def _side_by_side_workers() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  from atdiff_jax import workers  # pylint: disable=g-import-not-at-top
  count = workers.resolve_workers(_WORKERS.value, jax.default_backend(), jax.process_count(),
                                 jax.local_device_count())
  if count < 2:
    raise command_line.UsageError(
        f'--workers={_WORKERS.value}: the side_by_side part needs 2 or more workers of one '
        f'CPU device each ({len(workers.available_cores())} core(s), '
        f'{jax.local_device_count()} {jax.default_backend()} device(s) here)')
  return count


def main() -> None:
  # Imported here so that flag errors cost no backend start-up.
  # pylint: disable=g-import-not-at-top
  from atdiff_jax import bench
  from atdiff_jax.writing import atomic_write

  config = _CONFIG.value
  try:
    variants = bench.parse_variants(_VARIANTS.value)
  except ValueError as e:
    raise command_line.UsageError(f'--variants: {e}') from None
  _check(config, variants)
  config_name = config_flags.get_config_filename(FLAGS['config'])
  steps, warmup, repeats = _STEPS.value, _WARMUP.value, _REPEATS.value

  results = {'environment': bench.environment(config, config_name)}
  if _HEADER.value:
    print(bench.format_header(results['environment'], steps=steps, warmup=warmup,
                                   repeats=repeats), flush=True)

  def done(part: str, result: dict, table: str) -> None:
    results[part] = result
    print('\n' + table, flush=True)
    if _JSON.value:
      atomic_write(_JSON.value, json.dumps(results, indent=2))

  if 'train' in _WHAT.value:
    reference = None
    if _REFERENCE.value == 'torch':
      from atdiff_jax.bench import torch_reference
      reference = torch_reference.build(config)
    result = bench.bench_train(config, variants, steps, warmup, repeats, log=_log,
                                    peak_tflops=_PEAK_TFLOPS.value, reference=reference)
    done('train', result, bench.format_train_table(result))
  if 'sample' in _WHAT.value:
    result = bench.bench_sample(config, _SAMPLERS.value, _NFE.value, steps, warmup,
                                     repeats, log=_log)
    done('sample', result, bench.format_sample_table(result))
  if 'inception' in _WHAT.value:
    result = bench.bench_inception(
        _INCEPTION_BATCH.value or config.training.batch_size, steps, warmup, repeats,
        _INCEPTION_WEIGHTS.value, log=_log)
    done('inception', result, bench.format_inception_table(result))
  if 'fid' in _WHAT.value:
    result = bench.bench_fid_pipeline(
        config, _FID_SAMPLES.value, _FID_SAMPLER.value, _NFE.value,
        _INCEPTION_BATCH.value, _INCEPTION_WEIGHTS.value, log=_log)
    done('fid', result, bench.format_fid_table(result))
  if 'sweep' in _WHAT.value:
    result = bench.bench_sweep(config, _SWEEP_RUNS.value, _SWEEP_SAMPLES.value, log=_log)
    done('sweep', result, bench.format_sweep_table(result))
  if 'dispatch' in _WHAT.value:
    result = bench.bench_dispatch(config, _per_call(), steps, repeats, log=_log)
    done('dispatch', result, bench.format_dispatch_table(result))
  if 'side_by_side' in _WHAT.value:
    result = bench.bench_side_by_side(config, _side_by_side_workers(), steps, warmup, repeats,
                                      log=_log)
    done('side_by_side', result, bench.format_side_by_side_table(result))
  if _JSON.value:
    _log(f'wrote {_JSON.value}')


def cli(argv: list[str]) -> int:
  """The whole command for `argv` (argv[0] is the program), in this process: for tests."""
  return command_line.run(FLAGS, main, argv, __doc__)


if __name__ == '__main__':
  command_line.main(FLAGS, main, __doc__)
