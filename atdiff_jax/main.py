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

import sys

from absl import flags
from ml_collections import config_flags

from atdiff_jax import command_line

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file; required for train, optional for the other modes.',
    flag_values=FLAGS, lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and images go.',
                               flag_values=FLAGS)
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'probe'], 'What to do.',
                          flag_values=FLAGS)
# Multi-host (config.training.multi_host): on TPU pods, SLURM and Open MPI JAX finds these
# itself; elsewhere give them (the coordinator also reads JAX_COORDINATOR_ADDRESS).
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.',
                                   flag_values=FLAGS)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.',
                                      flag_values=FLAGS)
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index.',
                                   flag_values=FLAGS)
flags.mark_flags_as_required(['workdir'], flag_values=FLAGS)


def _join_cluster() -> None:
  """jax.distributed.initialize, or one line saying why this process cannot join."""
  import jax  # pylint: disable=g-import-not-at-top
  given = [f'--{f.name}' for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)
           if f.value is not None]
  if given and len(given) < 3:  # JAX would wait for the missing ones
    raise command_line.UsageError(
        f'{", ".join(given)} given: --coordinator_address, --num_processes and --process_id '
        'go together')
  try:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except (RuntimeError, ValueError) as e:
    raise command_line.UsageError(
        f'config.training.multi_host=True: cannot join a cluster: '
        f'{" ".join(str(e).split()).rstrip(".")}. '
        'Outside a TPU pod, SLURM or Open MPI give --coordinator_address, --num_processes '
        'and --process_id') from None


def run() -> int:
  """The parsed command; returns the exit status: 0 done (or stopped by a signal, resumable),
  2 bad input (config, data, checkpoint, command line), 3 stopped to keep the checkpoints
  good (non-finite values, divergence, a failed save)."""
  config = _CONFIG.value
  # Imports only (reading config.json touches no JAX backend).
  from atdiff_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if config is None and _MODE.value == 'train':
    raise command_line.UsageError('--config is required for --mode=train')
  run_config = config if config is not None else checkpoint.load_config(_WORKDIR.value)
  if run_config.training.multi_host:
    _join_cluster()

  # Imported after distributed initialisation: nothing may touch a JAX backend before it.
  # pylint: disable=g-import-not-at-top
  if _MODE.value == 'train':
    from atdiff_jax import train
    try:
      train.train(config, _WORKDIR.value)
    except (train.StopError, checkpoint.CheckpointWriteError) as e:
      print(f'error: {e}', file=sys.stderr)
      return 3
    return 0
  from atdiff_jax import evaluation
  entry = {'sample': evaluation.sample_mode, 'eval': evaluation.eval_mode,
           'probe': evaluation.probe_mode}[_MODE.value]
  entry(_WORKDIR.value, config)
  return 0


def cli(argv: list[str]) -> int:
  """The whole command for `argv` (argv[0] is the program), in this process: for tests."""
  return command_line.run(FLAGS, run, argv, __doc__)


if __name__ == '__main__':
  command_line.main(FLAGS, run, __doc__)
