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

from atdiff_jax import adversarial
from atdiff_jax.config import updates_per_minibatch


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


def free_at_per_pixel(multiple: float, steps: int = 3, **extra: Any) -> Arm:
  """Free AT, K=`steps`, whose ascent step is `multiple` times the reference's per-pixel
  strength (0.1 / sqrt(3072) RMS per pixel) on any image shape, in the paper's L2 ball of
  0.1 per pixel (which its steps never reach). `extra`: more fields, name suffixes."""
  name = f'free_{multiple:g}x'
  fields = (('adv.method', 'free'), ('adv.steps', steps), ('adv.norm', 'l2'),
            ('adv.radius', 0.1), ('adv.radius_scale', 'per_dim'),
            ('adv.step_size', multiple * adversarial.REFERENCE_STEP_PER_PIXEL),
            ('adv.step_size_scale', 'per_dim'), ('adv.radius_schedule', 'constant'),
            ('adv.init', 'zero'), ('adv.target', 'delta_detach'))
  about = f'free AT, K={steps}, step {multiple:g}x the paper\'s per-pixel strength'
  for suffix, (field, value, what) in extra.items():
    name, fields, about = f'{name}_{suffix}', fields + ((field, value),), f'{about}, {what}'
  return Arm(name, fields, about)


STANDARD = Arm('standard', (('adv.method', 'none'),), 'standard fine-tuning')
# The base checkpoint itself, not fine-tuned: the paper-style comparison (AT against the
# checkpoint it started from). Evaluated once; it has no training seed.
BASE = Arm('base', (), 'the base checkpoint, not fine-tuned')

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
    free_at_per_pixel(0.5),
    free_at_per_pixel(1.0),
    free_at_per_pixel(2.0),
)}
# The first experiment's arms: absolute steps, 7x the paper's per-pixel strength on 8x8x1.
SHORT_ARMS = ('standard', 'ip', 'free_r0.02', 'free_r0.05', 'free_r0.1', 'pgd_r0.05',
              'free_sigma_r0.1')
# The paper's regime: the base itself, standard fine-tuning, the paper's per-pixel strength
# and twice it (0.5x and IP: --arms).
PAPER_ARMS = ('base', 'standard', 'free_1x', 'free_2x')
DEFAULT_ARMS = PAPER_ARMS

# Consistency distillation from the base: CD, and CD with free AT on the student's input.
CD = Arm('cd', (('adv.method', 'none'),), 'consistency distillation')
# Leaves the smallest tenth of the timesteps unperturbed (fixed before any run).
CM_AT_T_MIN = 100
CM_ARMS = {arm.name: arm for arm in (
    CD,
    free_at_per_pixel(1.0),
    free_at_per_pixel(2.0),
    free_at_per_pixel(1.0, perturbed=('consistency.target_at', 'perturbed',
                                      'target at the perturbed input')),
    free_at_per_pixel(1.0, t100=('adv.t_range', (CM_AT_T_MIN, -1),
                                 f'AT only at t >= {CM_AT_T_MIN}')),
)}


def resolve_arms(names: Sequence[str], known: dict[str, Arm] | None = None,
                 reference: str = 'standard') -> tuple[Arm, ...]:
  """The named arms of `known` (default ARMS and the base), the reference arm first (every
  comparison is to it)."""
  known = ({BASE.name: BASE} | ARMS) if known is None else known
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f'unknown arm(s) {", ".join(unknown)}; known: {", ".join(known)}')
  names = [reference] + [n for n in dict.fromkeys(names) if n != reference]
  return tuple(known[n] for n in names)


def arm_config(base: ml_collections.ConfigDict, arm: Arm, seed: int, updates: int,
               lr: float, base_workdir: str, source_field: str = 'init_from'
               ) -> ml_collections.ConfigDict:
  """The fine-tuning config of `arm` with training seed `seed`: `updates` optimizer updates
  from `base_workdir`'s checkpoint (its params; the optimizer starts fresh), given as
  `source_field` (init_from, or teacher for distillation)."""
  config = base.copy_and_resolve_references()
  config.unlock()
  arm.apply(config)
  config.seed = seed
  config[source_field] = base_workdir
  training = config.training
  per_minibatch = updates_per_minibatch(config)
  if updates % per_minibatch:
    raise ValueError(f'{updates} updates are not a whole number of minibatches for arm '
                     f'{arm.name} ({per_minibatch} updates per minibatch)')
  training.num_steps = updates // per_minibatch
  training.lr = lr
  training.warmup_steps = 0
  training.log_every = max(1, training.num_steps // 4)
  # A checkpoint each quarter: a run killed outright loses at most a quarter of its work.
  # The last one is the arm's result; older ones go.
  training.checkpoint_every = training.log_every
  training.keep_checkpoints = 1
  training.sample_every = 0
  return config
