"""Benchmark: `python -m atdiff_jax.bench --config=configs/X.py [--what=train,sample,...]`.

Measures, on the current backend, the train step under each adversarial-training variant
(compile time, speed, MFU, memory; optionally with a rolled replay loop or remat), the
samplers at a fixed NFE, Inception feature extraction, and the FID pipeline end to end
(sampling + Inception + Frechet distance), and an evaluation sweep over several checkpoints
with programs built per run against once a process (`sweep`, not in the default parts). It prints a markdown header, then each part's
table as soon as the part is done, so a run cut short still shows what it measured
(progress goes to stderr); `--json` keeps every number, rewritten after each part.
"""
from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

PARTS = ('train', 'sample', 'inception', 'fid', 'sweep')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WHAT = flags.DEFINE_list('what', list(PARTS[:-1]), f'Parts to run, any of {", ".join(PARTS)}.')
_SWEEP_RUNS = flags.DEFINE_integer('sweep_runs', 3, 'Checkpoints scored by the sweep part.',
                                   lower_bound=2)
_SWEEP_SAMPLES = flags.DEFINE_integer('sweep_samples', 256, 'Samples per cell of the sweep '
                                      'part (its cells: config.eval).', lower_bound=2)
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed calls per round.', lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed calls of each variant before timing.',
                               lower_bound=0)
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed rounds over all variants; the best counts.',
                                lower_bound=1)
_VARIANTS = flags.DEFINE_string(
    'variants', 'none,free:3,pgd:1,pgd:3,fgsm',
    'AT variants of the train part, comma-separated: method[:K][@unrolled|@rolled]'
    '[@remat=none|attention|blocks], e.g. free:3@rolled or none@remat=blocks.')
_PEAK_TFLOPS = flags.DEFINE_float('peak_tflops', 0.0, 'Peak TFLOP/s of one device for the '
                                  'MFU; 0: from a table of known devices.', lower_bound=0.0)
_FID_SAMPLES = flags.DEFINE_integer('fid_samples', 10_000, 'Samples of the fid part.',
                                    lower_bound=1)
_FID_SAMPLER = flags.DEFINE_string('fid_sampler', 'dpm_solver++', 'Sampler of the fid part.')
_SAMPLERS = flags.DEFINE_list('samplers', ['ancestral', 'ddim', 'dpm_solver++'],
                              'Samplers of the sample part.')
_NFE = flags.DEFINE_integer('nfe', 10, 'Model evaluations per sample.', lower_bound=1)
_INCEPTION_WEIGHTS = flags.DEFINE_string(
    'inception_weights', '', 'Inception weights file; empty: random weights (same speed).')
_INCEPTION_BATCH = flags.DEFINE_integer(
    'inception_batch', 0, 'Inception batch; 0: the config\'s training batch size.',
    lower_bound=0)
_HEADER = flags.DEFINE_bool('header', True, 'Print the header (backend, versions, config); '
                            '--noheader when appending to an earlier report.')
_JSON = flags.DEFINE_string('json', '', 'Also write every number to this JSON file.')
flags.mark_flags_as_required(['config'])


def _log(message: str) -> None:
  print(f'[bench] {message}', file=sys.stderr, flush=True)


def main(argv):
  del argv
  unknown = set(_WHAT.value) - set(PARTS)
  if unknown:
    raise app.UsageError(f'--what: unknown part(s) {", ".join(sorted(unknown))}; '
                         f'allowed: {", ".join(PARTS)}')
  logging.getLogger('jax._src').setLevel(logging.WARNING)  # backend probing is noise here
  # Imported here so that flag errors cost no backend start-up.
  # pylint: disable=g-import-not-at-top
  from atdiff_jax import bench, config as config_lib
  from atdiff_jax.writing import atomic_write

  config = _CONFIG.value
  config_name = config_flags.get_config_filename(flags.FLAGS['config'])
  steps, warmup, repeats = _STEPS.value, _WARMUP.value, _REPEATS.value
  try:
    variants = bench.parse_variants(_VARIANTS.value)
  except ValueError as e:
    raise app.UsageError(f'--variants: {e}') from None
  unknown = set(_SAMPLERS.value + [_FID_SAMPLER.value]) - set(bench.SAMPLERS)
  if unknown:
    raise app.UsageError(f'--samplers: unknown {", ".join(sorted(unknown))}; '
                         f'allowed: {", ".join(bench.SAMPLERS)}')
  if {'sample', 'fid'} & set(_WHAT.value) and _NFE.value > config.diffusion.num_timesteps:
    raise app.UsageError(f'--nfe={_NFE.value} exceeds config.diffusion.num_timesteps='
                         f'{config.diffusion.num_timesteps}')

  results = {'environment': bench.environment(config, config_name)}
  if _HEADER.value:
    print(bench.format_header(results['environment'], steps=steps, warmup=warmup,
                                   repeats=repeats), flush=True)

  def done(part: str, result: dict, table: str) -> None:
    results[part] = result
    print('\n' + table, flush=True)
    if _JSON.value:
      atomic_write(_JSON.value, json.dumps(results, indent=2))

  try:
    if 'train' in _WHAT.value:
      result = bench.bench_train(config, variants, steps, warmup, repeats, log=_log,
                                      peak_tflops=_PEAK_TFLOPS.value)
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
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if _JSON.value:
    _log(f'wrote {_JSON.value}')


if __name__ == '__main__':
  app.run(main)
