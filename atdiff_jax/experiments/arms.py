"""The arms of the AT-vs-standard experiment: what each fine-tuning run changes, and nothing
else.

Every arm starts from the same base checkpoint and makes the same number of optimizer
updates with the same optimizer, learning rate, EMA, timestep sampler and data order for a
given seed; an arm changes only how x_t is perturbed. Free AT makes K updates per minibatch,
so it sees 1/K as many minibatches (the paper's accounting: equal cost per update).

The grid is fixed in advance (the paper's radius 0.1 and two smaller ones, its PGD and IP
baselines, and a radius proportional to sigma_t); nothing here was chosen by looking at
evaluation results.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import ml_collections

from atdiff_jax.train_step import updates_per_minibatch


@dataclasses.dataclass(frozen=True)
class Arm:
  """One way of fine-tuning: `name` (a folder name too) and the config fields it sets."""
  name: str
  fields: tuple[tuple[str, Any], ...] = ()
  about: str = ''

  def apply(self, config: ml_collections.ConfigDict) -> None:
    for field, value in self.fields:
      block, _, name = field.partition('.')
      config[block][name] = value


def _ball_fields(method: str, steps: int, radius: float, schedule: str):
  """An L2 ball of `radius` per pixel, step size = radius, zero start, the paper's target."""
  return (('adv.method', method), ('adv.steps', steps), ('adv.norm', 'l2'),
          ('adv.radius', radius), ('adv.step_size', radius), ('adv.radius_scale', 'per_dim'),
          ('adv.radius_schedule', schedule), ('adv.init', 'zero'),
          ('adv.target', 'delta_detach'))


def free_at(radius: float, schedule: str = 'constant', steps: int = 3) -> Arm:
  """Free AT with K=`steps` passes in an L2 ball of `radius` per pixel, step size = radius."""
  suffix = '_sigma' if schedule == 'sigma' else ''
  return Arm(f'free{suffix}_r{radius:g}', _ball_fields('free', steps, radius, schedule),
             f'free AT, K={steps}, L2 radius {radius:g} per pixel'
             + (' times sigma_t' if schedule == 'sigma' else ''))


STANDARD = Arm('standard', (('adv.method', 'none'),), 'standard fine-tuning')

ARMS = {arm.name: arm for arm in (
    STANDARD,
    Arm('ip', (('adv.method', 'none'), ('input_perturbation.gamma', 0.1)),
        'DDPM-IP, gamma 0.1'),
    free_at(0.02),
    free_at(0.05),
    free_at(0.1),
    Arm('pgd_r0.05', _ball_fields('pgd', 2, 0.05, 'constant'),
        'PGD-AT, 2 ascent steps, L2 radius 0.05 per pixel'),
    free_at(0.1, 'sigma'),
)}
DEFAULT_ARMS = tuple(ARMS)


def resolve_arms(names: Sequence[str]) -> tuple[Arm, ...]:
  """The named arms, standard first (every comparison is to it)."""
  unknown = [n for n in names if n not in ARMS]
  if unknown:
    raise ValueError(f'unknown arm(s) {", ".join(unknown)}; known: {", ".join(ARMS)}')
  names = ['standard'] + [n for n in dict.fromkeys(names) if n != 'standard']
  return tuple(ARMS[n] for n in names)


def arm_config(base: ml_collections.ConfigDict, arm: Arm, seed: int, updates: int,
               lr: float, base_workdir: str) -> ml_collections.ConfigDict:
  """The fine-tuning config of `arm` with training seed `seed`: `updates` optimizer updates
  from `base_workdir`'s checkpoint (its params; the optimizer starts fresh)."""
  config = base.copy_and_resolve_references()
  config.unlock()
  arm.apply(config)
  config.seed = seed
  config.init_from = base_workdir
  training = config.training
  per_minibatch = updates_per_minibatch(config)
  if updates % per_minibatch:
    raise ValueError(f'{updates} updates are not a whole number of minibatches for arm '
                     f'{arm.name} ({per_minibatch} updates per minibatch)')
  training.num_steps = updates // per_minibatch
  training.lr = lr
  training.warmup_steps = 0
  training.log_every = max(1, training.num_steps // 4)
  training.checkpoint_every = training.num_steps  # one checkpoint: the arm's result
  training.keep_checkpoints = 1
  training.sample_every = 0
  return config
