"""Command line: `python -m atdiff_jax.main --workdir=RUN --mode=MODE [--config=...]`.

  train:  --config=configs/X.py is required; trains (or resumes) the run in RUN.
  sample: writes config.eval.num_samples images with one sampler setting to .npz shards
          (default RUN/samples/<sampler>_nfe<N>_es<lambda>/), resumable.
  eval:   the sweep config.eval.samplers x nfes x eps_scales into RUN/eval/ (results.json,
          .csv, .md, fid_vs_nfe.png), resumable.
  probe:  the mismatch and robustness probes (config.probe) of the config.eval.sampler
          setting into RUN/probe/.

For sample, eval and probe, the model always comes from RUN/config.json (what the checkpoint was
trained with). Without --config, the eval settings stored there are used. To change them,
pass the run's own config file and override fields, e.g.
  --config=configs/quickstart.py --config.eval.nfe=20 --config.eval.sampler=ddim
then the eval, data and probe blocks of --config are used (its model must match the run's).

Flags and mode dispatch only; the work lives in the library.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file; required for train, optional for the other modes.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and images go.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'probe'], 'What to do.')
# Multi-host (config.training.multi_host): on TPU pods, SLURM and Open MPI JAX finds these
# itself; elsewhere give them (the coordinator also reads JAX_COORDINATOR_ADDRESS).
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index.')
flags.mark_flags_as_required(['workdir'])


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every mistake in the command line as one ConfigError line."""
  from atdiff_jax import command_line  # pylint: disable=g-import-not-at-top
  command_line.check_argv(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise command_line.ConfigError(command_line.flag_error_line(e)) from None


def _parse_or_exit(argv: list[str]) -> list[str]:
  from atdiff_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  try:
    return _parse_flags(argv)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def run() -> int:
  """The parsed command; returns the exit status: 0 done (or stopped by a signal, resumable),
  2 bad input (config, data, checkpoint, command line), 3 stopped to keep the checkpoints
  good (non-finite values, divergence, a failed save)."""
  config = _CONFIG.value
  # Imports only (reading config.json touches no JAX backend).
  from atdiff_jax import checkpoint, config as config_lib  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s',
                      datefmt='%H:%M:%S')
  for noisy in ('absl', 'jax._src', 'orbax'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    if config is None and _MODE.value == 'train':
      raise config_lib.ConfigError('--config is required for --mode=train')
    run_config = config if config is not None else checkpoint.load_config(_WORKDIR.value)
    if run_config.training.multi_host:
      import jax  # pylint: disable=g-import-not-at-top
      jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    # Imported after distributed initialisation: nothing may touch a JAX backend before it.
    # pylint: disable=g-import-not-at-top
    if _MODE.value == 'train':
      from atdiff_jax import train
      try:
        train.train(config, _WORKDIR.value)
      except (train.StopError, checkpoint.CheckpointWriteError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 3
    else:
      from atdiff_jax import evaluation
      entry = {'sample': evaluation.sample_mode, 'eval': evaluation.eval_mode,
               'probe': evaluation.probe_mode}[_MODE.value]
      entry(_WORKDIR.value, config)
  except (config_lib.ConfigError, checkpoint.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


def cli(argv: list[str]) -> int:
  """The whole command for `argv` (argv[0] is the program), in this process: for tests."""
  from atdiff_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:
    delattr(flags.FLAGS, name)  # an earlier call's overrides; config_flags defines them anew
  saved, sys.argv = sys.argv, list(argv)  # config_flags finds its overrides in sys.argv
  try:
    _parse_flags(list(argv))
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  finally:
    sys.argv = saved
  return run()


if __name__ == '__main__':
  app.run(lambda argv: run(), flags_parser=_parse_or_exit)
