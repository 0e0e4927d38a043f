"""Command line: `python -m atdiff_jax.main --config=configs/X.py --workdir=DIR --mode=train`.

Flags and mode dispatch only; the work lives in the library.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and images go.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train'], 'What to do.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  config = _CONFIG.value
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s',
                      datefmt='%H:%M:%S')
  for noisy in ('absl', 'jax._src', 'orbax'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if config.training.multi_host:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()

  # Imported after distributed initialisation: nothing may touch a JAX backend before it.
  from atdiff_jax import checkpoint, config as config_lib, train  # pylint: disable=g-import-not-at-top
  try:
    if _MODE.value == 'train':
      train.train(config, _WORKDIR.value)
  except (config_lib.ConfigError, checkpoint.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
