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


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None and _MODE.value == 'train':
    raise app.UsageError('--config is required for --mode=train')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s',
                      datefmt='%H:%M:%S')
  for noisy in ('absl', 'jax._src', 'orbax'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # Imports only (reading config.json touches no JAX backend).
  from atdiff_jax import checkpoint, config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    run_config = config if config is not None else checkpoint.load_config(_WORKDIR.value)
    if run_config.training.multi_host:
      import jax  # pylint: disable=g-import-not-at-top
      jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    # Imported after distributed initialisation: nothing may touch a JAX backend before it.
    # pylint: disable=g-import-not-at-top
    if _MODE.value == 'train':
      from atdiff_jax import train
      train.train(config, _WORKDIR.value)
    else:
      from atdiff_jax import evaluation
      entry = {'sample': evaluation.sample_mode, 'eval': evaluation.eval_mode,
               'probe': evaluation.probe_mode}[_MODE.value]
      entry(_WORKDIR.value, config)
  except (config_lib.ConfigError, checkpoint.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
