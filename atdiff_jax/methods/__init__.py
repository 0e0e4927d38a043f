"""Training objectives, one module each, behind the `Objective` interface of `base`.

  dpm:  ADM's diffusion objective (hybrid loss, DDPM-IP input perturbation)

`config.objective` picks one; the AT scheme (`config.adv.method`) is applied to any of them
by `replay.py`.
"""
from __future__ import annotations

import ml_collections

from atdiff_jax.methods.base import Objective

OBJECTIVES = ('dpm',)


def get_objective(config: ml_collections.ConfigDict, model) -> Objective:
  """The objective `config.objective` names ('dpm' when the config has no such field)."""
  name = config.get('objective', 'dpm')
  if name == 'dpm':
    from atdiff_jax.methods.dpm import DPMObjective  # pylint: disable=g-import-not-at-top
    return DPMObjective(config, model)
  raise ValueError(f'unknown objective {name!r}; allowed: {", ".join(OBJECTIVES)}')


__all__ = ['OBJECTIVES', 'Objective', 'get_objective']
