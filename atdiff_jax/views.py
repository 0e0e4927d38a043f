"""How a trained network is read, per training objective: one view class for each.

Sampling, evaluation and the probes see every network as an eps model. A view says how a
network trained by its objective becomes one, which sampler draws its preview grid, and the
sampler options its own training settles. Each objective (objectives/) names its view; this
module holds them and the one map from objective names to views (VIEWS), import-light, so
that evaluation reads any run without importing training code.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import ml_collections

from atdiff_jax.config import objective_of

ModelFn = Callable[..., Any]


class EpsView:
  """A DPM (objective dpm): the network predicts eps (and, learned, a variance)."""
  preview_sampler = 'ancestral'

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def eval_model_fn(self, model_fn: ModelFn) -> ModelFn:
    """`model_fn(x, t, y, *args)` as the eps model the samplers call."""
    return model_fn

  def sampler_defaults(self, sampler: str) -> dict[str, Any]:
    """Sampler options the run's training settles (the user's options win)."""
    del sampler
    return {}

  def key(self) -> str:
    """What, besides the network, fixes the programs that read it."""
    return type(self).__name__


class ConsistencyView(EpsView):
  """A consistency model (objectives cd, ct): the network's output is mapped to the
  consistency function f(x, t), and read as the eps whose x0 prediction is f."""
  preview_sampler = 'consistency'

  def eval_model_fn(self, model_fn: ModelFn) -> ModelFn:
    # pylint: disable=g-import-not-at-top
    from atdiff_jax.diffusion import betas_of
    from atdiff_jax.diffusion.consistency_function import Parametrisation, as_eps_model
    from atdiff_jax.diffusion.vp_time import VPTime
    return as_eps_model(model_fn, Parametrisation.from_config(self.config.consistency),
                        VPTime.create(betas_of(self.config)), self.config.data.channels)

  def sampler_defaults(self, sampler: str) -> dict[str, Any]:
    # The consistency sampler starts at the sigma~_max the run was trained up to and stops
    # at its boundary timestep t_min.
    if sampler != 'consistency':
      return {}
    return {'sigma_max': float(self.config.consistency.sigma_max),
            't_min': float(self.config.consistency.t_min)}

  def key(self) -> str:
    return json.dumps(self.config.consistency.to_dict(), sort_keys=True, default=str)


VIEWS = {'dpm': EpsView, 'cd': ConsistencyView, 'ct': ConsistencyView}


def view_of(config: ml_collections.ConfigDict) -> EpsView:
  """The view of a run trained with `config` (its objective's)."""
  return VIEWS[objective_of(config)](config)
