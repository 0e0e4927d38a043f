"""Does adversarial training beat standard training, and where? Seeds, spreads, a verdict.

  python -m atdiff_jax.experiments.at_vs_standard --config=configs/quickstart.py --workdir=DIR
  python -m atdiff_jax.experiments.at_vs_standard --regime=cd --config=configs/quickstart_cd.py \
    --base=DIR/base --workdir=DIR/cd

`--regime` picks a preset of arms, seeds, base and budget (`experiments.regimes`; default
`paper`: a base trained until it stops improving, then as many fine-tuning updates as the
base had). Every arm starts from the same base checkpoint (`--base=RUN`, or trained into
DIR/base from --config) and makes the same number of optimizer updates under each training
seed, into DIR/arms/<arm>/seed<s>/. Each is then evaluated with the same settings: the eval
sweep (samplers x NFEs, `--num_samples` images, one eval seed that no arm was tuned on) and
the mismatch probe (the model's eps-error on a sampler's own x_t). On a CPU, runs go side by
side, one per core (`--workers`): a small model uses the cores better that way. Each process
compiles a sampler once for all the runs it scores. DIR gets results.json (every seed's numbers),
results.md (mean ± std per arm; which arms beat the fair baseline, and the base, beyond
the seed spread) and <metric>_vs_nfe.png; with the plateau rule also base/plateau.{json,png}.

Resumable: a finished (arm, seed) keeps its result.json and is skipped; an interrupted
one resumes its training from its checkpoint and its sweep from its finished cells.
On a GPU the same command takes a larger config and more samples, e.g.
  --config=configs/cifar10_adm.py --base=runs/cifar10_adm --num_samples=10000 \\
  --config.eval.inception_weights=inception_fid.msgpack
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from atdiff_jax import command_line
from atdiff_jax.experiments import arms as arms_lib
from atdiff_jax.experiments import regimes

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'The base run\'s config file (model, data, eval metrics); for '
    '--regime=cd, the distillation config.', flag_values=FLAGS, lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the experiment\'s runs and reports go.',
                               flag_values=FLAGS)
_REGIME = flags.DEFINE_enum('regime', 'paper', list(regimes.REGIMES),
                            'Preset of arms, seeds, base and budget (experiments/regimes.py); '
                            'the flags below override it.', flag_values=FLAGS)
_BASE = flags.DEFINE_string('base', '', 'A trained run of --config to fine-tune (or, for '
                            '--regime=cd, distil) from; empty: train one into WORKDIR/base.',
                            flag_values=FLAGS)
_ARMS = flags.DEFINE_list('arms', None, f'Arms, any of {", ".join(arms_lib.ARMS)}, base '
                          f'(or, for --regime=cd, {", ".join(arms_lib.CM_ARMS)}).',
                          flag_values=FLAGS)
_SEEDS = flags.DEFINE_list('seeds', None, 'Training seeds of the main arms.', flag_values=FLAGS)
_FEW_SEEDS = flags.DEFINE_integer('few_seeds', None, 'How many of --seeds the other arms '
                                  'take.', lower_bound=1, flag_values=FLAGS)
_UPDATES = flags.DEFINE_integer('updates', None, 'Optimizer updates per fine-tuning run '
                                '(instead of the regime\'s).', lower_bound=1, flag_values=FLAGS)
_UPDATES_RATIO = flags.DEFINE_float('updates_ratio', None, 'Fine-tuning updates as a '
                                    'multiple of the base\'s.', lower_bound=0, flag_values=FLAGS)
_LR = flags.DEFINE_float('lr', None, 'Fine-tuning learning rate (no warm-up).', lower_bound=0,
                         flag_values=FLAGS)
_BASE_CHECK_EVERY = flags.DEFINE_integer('base_check_every', None, 'Plateau rule: minibatches '
                                         'between checks of the base.', lower_bound=1,
                                         flag_values=FLAGS)
_BASE_MAX = flags.DEFINE_integer('base_max', None, 'Plateau rule: the most minibatches of the '
                                 'base.', lower_bound=1, flag_values=FLAGS)
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 512, 'Samples per evaluation cell.',
                                    lower_bound=1, flag_values=FLAGS)
_SAMPLERS = flags.DEFINE_list('samplers', None, 'Samplers of the sweep.', flag_values=FLAGS)
_NFES = flags.DEFINE_list('nfes', None, 'NFEs of the sweep.', flag_values=FLAGS)
_EVAL_SEED = flags.DEFINE_integer('eval_seed', 1000, 'Sampling seed of every evaluation '
                                  '(the same for all arms; not a training seed).',
                                  flag_values=FLAGS)
_EVAL_BATCH = flags.DEFINE_integer('eval_batch', 256, 'Images per sampler call.', lower_bound=1,
                                   flag_values=FLAGS)
_WORKERS = flags.DEFINE_integer(
    'workers', 0, 'Runs trained and scored side by side, each in its own process on its share '
    'of the CPU cores (atdiff_jax/workers.py); 0: one per core where a run is one process on '
    'one CPU device (at most 8), else 1.', flag_values=FLAGS)
_PROBE = flags.DEFINE_string('probe', None, 'Mismatch probe sampler:NFE; empty: none.',
                             flag_values=FLAGS)
flags.mark_flags_as_required(['config', 'workdir'], flag_values=FLAGS)


def _int_list(name: str, values: Sequence[str]) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError:
    raise command_line.UsageError(f'--{name}: integers expected, got {",".join(values)}'
                                  ) from None


def _given(flag, default):
  return default if flag.value is None else flag.value


def main() -> None:
  # pylint: disable=g-import-not-at-top
  import dataclasses
  from atdiff_jax.experiments import runner
  regime = regimes.REGIMES[_REGIME.value]
  probe_text = _given(_PROBE, regime.probe)
  probe = None
  if probe_text:
    sampler, _, nfe = probe_text.partition(':')
    if not nfe.isdigit():
      raise command_line.UsageError(f'--probe={probe_text!r}: expected sampler:NFE, e.g. '
                                    'ddim:10')
    probe = (sampler, int(nfe))
    from atdiff_jax.evaluation import mismatch
    mismatch.check_applies(_CONFIG.value)  # before anything trains
  if regime.needs_base and not _BASE.value:
    raise command_line.UsageError(f'--regime={_REGIME.value} needs --base=RUN (the DPM to '
                                  'start from)')
  seeds = tuple(_int_list('seeds', _SEEDS.value) if _SEEDS.value else regime.seeds)
  updates, ratio = regime.updates, regime.updates_ratio
  if _UPDATES.value is not None:
    updates, ratio = _UPDATES.value, None
  if _UPDATES_RATIO.value is not None:
    updates, ratio = regime.updates or 300, _UPDATES_RATIO.value
  rule = regime.base_rule
  if rule is not None:
    rule = dataclasses.replace(
        rule, check_every=_given(_BASE_CHECK_EVERY, rule.check_every),
        max_minibatches=_given(_BASE_MAX, rule.max_minibatches))
  arm_names = tuple(_ARMS.value or regime.arms)
  _enable_compilation_cache(_WORKDIR.value)
  try:
    runner.run_experiment(
        _CONFIG.value, _WORKDIR.value, base=_BASE.value, arm_names=arm_names, seeds=seeds,
        seeds_by_arm=dataclasses.replace(regime, arms=arm_names).seeds_by_arm(
            seeds, _given(_FEW_SEEDS, regime.few_seeds)),
        updates=updates, updates_ratio=ratio, lr=_given(_LR, regime.lr),
        samplers=tuple(_given(_SAMPLERS, regime.samplers)),
        nfes=_int_list('nfes', _NFES.value) if _NFES.value else regime.nfes,
        num_samples=_NUM_SAMPLES.value, eval_seed=_EVAL_SEED.value,
        eval_batch=_EVAL_BATCH.value, probe=probe, base_rule=rule,
        known_arms=regime.known_arms, reference=regime.reference,
        source_field=regime.source_field, title=regime.title, workers=_WORKERS.value)
  except runner.Stopped as e:  # a requested stop: nothing half-done was scored
    print(f'experiment: {e}', flush=True)


def _enable_compilation_cache(workdir: str) -> None:
  """Every arm and seed compiles the same train step: a persistent cache (the user's, else
  one in WORKDIR) makes all but the first a lookup. A cache set up already keeps its
  settings."""
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'xla_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


# Unknown arms and bad seed lists are the experiment library's ValueErrors: bad input too.
_INPUT_ERRORS = (ValueError,)


def cli(argv: list[str]) -> int:
  """The whole command for `argv` (argv[0] is the program), in this process: for tests."""
  return command_line.run(FLAGS, main, argv, __doc__, _INPUT_ERRORS)


if __name__ == '__main__':
  command_line.main(FLAGS, main, __doc__, _INPUT_ERRORS)
