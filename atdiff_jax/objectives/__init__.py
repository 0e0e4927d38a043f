"""Training objectives, one module each, behind the `Objective` interface of `base`.

  dpm:          ADM's diffusion objective (hybrid loss, DDPM-IP input perturbation)
  consistency:  consistency distillation (cd) and consistency training (ct, ECT)

`config.objective` picks one; the AT scheme (`config.adv.method`) is applied to any of them
by `replay.py`.
"""
from __future__ import annotations

import ml_collections

from atdiff_jax.config import OBJECTIVES, objective_of
from atdiff_jax.objectives.base import Objective


def get_objective(config: ml_collections.ConfigDict, model) -> Objective:
  """The objective `config.objective` names, for the student network `model`."""
  # pylint: disable=g-import-not-at-top
  name = objective_of(config)
  if name == 'dpm':
    from atdiff_jax.objectives.dpm import DPMObjective
    return DPMObjective(config, model)
  if name in ('cd', 'ct'):
    from atdiff_jax.objectives.cm import ConsistencyObjective
    return ConsistencyObjective(config, model)
  raise ValueError(f'unknown objective {name!r}; allowed: {", ".join(OBJECTIVES)}')


def check_frozen_sources(config: ml_collections.ConfigDict) -> None:
  """Checks the runs the objective reads its frozen extras from (a distillation teacher):
  one clear line, before the objective is built and anything compiles."""
  if objective_of(config) == 'cd':
    from atdiff_jax.objectives.cm import teacher_problems  # pylint: disable=g-import-not-at-top
    teacher_problems(config)


__all__ = ['OBJECTIVES', 'Objective', 'check_frozen_sources', 'get_objective']
