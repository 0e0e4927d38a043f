"""Where the loss-second-moment timestep sampler puts its mass under AT, and why it matters.

  python -m atdiff_jax.experiments.timestep_mass --config=configs/quickstart.py \
    --base=RUNS/paper/base --workdir=RUNS/timestep_mass

The sampler draws t with probability proportional to the RMS of its recent losses at t.
Free AT feeds it the losses of its adversarial passes, whose target carries delta / sigma_t:
at small t (small sigma_t) those losses grow with the perturbation's strength, so a strong
perturbation could pull the sampler's draws, and so the training, towards small t. Each arm
(standard, free AT at the paper's per-pixel strength, free AT at the absolute step of 0.1
that is 7x that strength on 8x8x1) fine-tunes the base for the same updates with that
sampler; the table gives each arm's probability mass below a few timesteps and the RMS of
its recorded losses there. WORKDIR gets timestep_mass.{json,md}.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from atdiff_jax import command_line
from atdiff_jax.diffusion.timestep_sampler import loss_second_moment_probs
from atdiff_jax.experiments import arms as arms_lib
from atdiff_jax.writing import atomic_write, markdown_table

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file('config', None, 'The base run\'s config file.',
                                          flag_values=FLAGS, lock_config=True)
_BASE = flags.DEFINE_string('base', None, 'The trained run every arm fine-tunes.',
                            flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the arms\' runs and the table go.',
                               flag_values=FLAGS)
_UPDATES = flags.DEFINE_integer('updates', 1200, 'Optimizer updates per arm.', lower_bound=3,
                                flag_values=FLAGS)
_ARMS = flags.DEFINE_list('arms', ['standard', 'free_1x', 'free_r0.1'], 'Arms (any of '
                          f'{", ".join(arms_lib.ARMS)}).', flag_values=FLAGS)
flags.mark_flags_as_required(['config', 'base', 'workdir'], flag_values=FLAGS)

BELOW = (20, 50, 100, 250)  # mass of t < each


def mass_below(probs: np.ndarray, history: np.ndarray, cuts=BELOW) -> dict[str, float]:
  """The sampler's probability of t < each cut (uniform would give cut / T), and the RMS
  of the recorded losses there and over all t."""
  probs, history = np.asarray(probs, np.float64), np.asarray(history, np.float64)
  rms = np.sqrt(np.mean(np.square(history), axis=-1))
  row = {f'p(t<{c})': float(probs[:c].sum()) for c in cuts}
  row |= {f'rms loss t<{c}': float(rms[:c].mean()) for c in cuts[-2:-1]}
  row['rms loss, all t'] = float(rms.mean())
  return row


def main() -> None:
  # pylint: disable=g-import-not-at-top
  from atdiff_jax import train
  base_config = _CONFIG.value.copy_and_resolve_references()
  base_config.training.timestep_sampler = 'loss_second_moment'
  unknown = set(_ARMS.value) - set(arms_lib.ARMS)
  if unknown:
    raise command_line.UsageError(f'--arms: unknown {", ".join(sorted(unknown))}')
  rows = {}
  for name in _ARMS.value:
    arm = arms_lib.ARMS[name]
    config = arms_lib.arm_config(base_config, arm, seed=0, updates=_UPDATES.value, lr=1e-4,
                                 base_workdir=_BASE.value)
    state = train.train(config, os.path.join(_WORKDIR.value, name))
    sampler_state = jax.device_get(state.objective_state)
    probs = np.asarray(loss_second_moment_probs(sampler_state))
    rows[name] = mass_below(probs, sampler_state.history) | {
        'warm': bool(np.all(sampler_state.counts >= sampler_state.history.shape[1])),
        'about': arm.about}
  num_t = int(base_config.diffusion.num_timesteps)
  keys = [k for k in next(iter(rows.values())) if k not in ('warm', 'about')]
  table = markdown_table(['arm'] + keys + ['warm'],
                         [[n] + [f'{r[k]:.3f}' for k in keys] + [str(r['warm'])]
                          for n, r in rows.items()]
                         + [['uniform'] + [f'{c / num_t:.3f}' for c in BELOW]
                            + [''] * (len(keys) - len(BELOW)) + ['']])
  text = '\n'.join(table) + '\n'
  atomic_write(os.path.join(_WORKDIR.value, 'timestep_mass.md'), text)
  atomic_write(os.path.join(_WORKDIR.value, 'timestep_mass.json'),
               json.dumps({'updates': _UPDATES.value, 'arms': rows}, indent=2))
  print(text, flush=True)


if __name__ == '__main__':
  command_line.main(FLAGS, main, __doc__)
