"""Benchmark: `python -m atdiff_jax.bench --config=configs/X.py [--what=train,sample,inception]`.

Measures, on the current backend, the train step under each adversarial-training variant,
the samplers at a fixed NFE and Inception feature extraction, then prints a markdown
header and one table per part (progress goes to stderr); `--json` keeps every number.
"""
from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

PARTS = ('train', 'sample', 'inception')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WHAT = flags.DEFINE_list('what', list(PARTS), f'Parts to run, any of {", ".join(PARTS)}.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed calls per round.', lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed calls of each variant before timing.',
                               lower_bound=0)
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed rounds over all variants; the best counts.',
                                lower_bound=1)
_VARIANTS = flags.DEFINE_string('variants', 'none,free:3,pgd:1,pgd:3,fgsm',
                                'AT variants of the train part, method[:K], comma-separated.')
_SAMPLERS = flags.DEFINE_list('samplers', ['ancestral', 'ddim', 'dpm_solver++'],
                              'Samplers of the sample part.')
_NFE = flags.DEFINE_integer('nfe', 10, 'Model evaluations per sample.', lower_bound=1)
_INCEPTION_WEIGHTS = flags.DEFINE_string(
    'inception_weights', '', 'Inception weights file; empty: random weights (same speed).')
_INCEPTION_BATCH = flags.DEFINE_integer(
    'inception_batch', 0, 'Inception batch; 0: the config\'s training batch size.',
    lower_bound=0)
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
  from atdiff_jax import benchmarks, config as config_lib  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  config_name = config_flags.get_config_filename(flags.FLAGS['config'])
  steps, warmup, repeats = _STEPS.value, _WARMUP.value, _REPEATS.value
  try:
    variants = benchmarks.parse_variants(_VARIANTS.value)
  except ValueError as e:
    raise app.UsageError(f'--variants: {e}') from None
  unknown = set(_SAMPLERS.value) - set(benchmarks.SAMPLERS)
  if unknown:
    raise app.UsageError(f'--samplers: unknown {", ".join(sorted(unknown))}; '
                         f'allowed: {", ".join(benchmarks.SAMPLERS)}')
  if 'sample' in _WHAT.value and _NFE.value > config.diffusion.num_timesteps:
    raise app.UsageError(f'--nfe={_NFE.value} exceeds config.diffusion.num_timesteps='
                         f'{config.diffusion.num_timesteps}')

  results = {'environment': benchmarks.environment(config, config_name)}
  tables = []
  try:
    if 'train' in _WHAT.value:
      results['train'] = benchmarks.bench_train(config, variants, steps, warmup, repeats,
                                                log=_log)
      tables.append(benchmarks.format_train_table(results['train']))
    if 'sample' in _WHAT.value:
      results['sample'] = benchmarks.bench_sample(config, _SAMPLERS.value, _NFE.value, steps,
                                                  warmup, repeats, log=_log)
      tables.append(benchmarks.format_sample_table(results['sample']))
    if 'inception' in _WHAT.value:
      results['inception'] = benchmarks.bench_inception(
          _INCEPTION_BATCH.value or config.training.batch_size, steps, warmup,
          repeats, _INCEPTION_WEIGHTS.value, log=_log)
      tables.append(benchmarks.format_inception_table(results['inception']))
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)

  part = results.get('train') or results.get('sample') or {}
  header = benchmarks.format_header(results['environment'], part.get('num_params'),
                                    steps, warmup, repeats)
  print('\n\n'.join([header] + tables), flush=True)
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(results, f, indent=2)
    _log(f'wrote {_JSON.value}')


if __name__ == '__main__':
  app.run(main)
