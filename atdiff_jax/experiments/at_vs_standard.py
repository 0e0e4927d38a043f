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

import logging
import os
import sys
from typing import Sequence

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



def _int_list(name: str, values: Sequence[str]) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError:
    raise app.UsageError(f'--{name}: integers expected, got {",".join(values)}') from None


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s',
                      datefmt='%H:%M:%S')
  for noisy in ('absl', 'jax._src', 'orbax'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # pylint: disable=g-import-not-at-top
  from atdiff_jax import checkpoint
  from atdiff_jax.experiments import runner
  probe = None
  if _PROBE.value:
    sampler, _, nfe = _PROBE.value.partition(':')
    if not nfe.isdigit():
      raise app.UsageError(f'--probe={_PROBE.value!r}: expected sampler:NFE, e.g. ddim:10')
    probe = (sampler, int(nfe))
  _enable_compilation_cache(_WORKDIR.value)
  try:
    runner.run_experiment(_CONFIG.value, _WORKDIR.value, base=_BASE.value, arm_names=_ARMS.value,
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
