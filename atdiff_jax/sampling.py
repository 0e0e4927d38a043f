"""Sampling from a trained model's params: the bridge between a run's config and the samplers."""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from atdiff_jax import parallel, samplers
from atdiff_jax.config import is_consistency
from atdiff_jax.diffusion import get_beta_schedule
from atdiff_jax.diffusion.consistency import Parametrisation, as_eps_model
from atdiff_jax.diffusion.vp_time import VPTime
from atdiff_jax.models import create_model, make_apply_fn


def diffusion_betas(config: ml_collections.ConfigDict) -> np.ndarray:
  """The run's beta schedule (float64), as the samplers take it."""
  return get_beta_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)


def params_model_fn(model, config: ml_collections.ConfigDict | None = None
                    ) -> Callable[..., jax.Array]:
  """`model_fn(x, t, y, params) -> output` for the samplers: params are an input of the
  compiled program, not constants baked into it.

  For a consistency run (`config.objective` cd | ct) the output is the eps whose x0
  prediction is the consistency function f(x, t), so every sampler and probe can use it.
  """
  apply = make_apply_fn(model)
  model_fn = lambda x, t, y, params: apply(params, x, t, y)
  if config is None or not is_consistency(config):
    return model_fn
  return as_eps_model(model_fn, Parametrisation.from_config(config.consistency),
                      VPTime.create(diffusion_betas(config)), config.data.channels)


def sampler_defaults(config: ml_collections.ConfigDict, sampler: str) -> dict:
  """Options a run's own training settles: the consistency sampler starts at the sigma~_max
  a consistency run was trained up to and stops at its boundary timestep t_min."""
  if sampler == 'consistency' and is_consistency(config):
    return {'sigma_max': float(config.consistency.sigma_max),
            't_min': float(config.consistency.t_min)}
  return {}


def make_generate_fn(config: ml_collections.ConfigDict, mesh: Mesh, num_samples: int,
                     sampler: str = 'ancestral', num_steps: int | None = None, model=None,
                     **sampler_opts) -> Callable[[object, jax.Array], jax.Array]:
  """A jitted `generate(params, rng) -> images in [-1, 1]`, sharded over the mesh.

  `num_samples` is rounded up to a multiple of the device count; class-conditional models
  cycle through the labels.
  """
  model = create_model(config) if model is None else model
  devices = parallel.num_shards(mesh)
  n = math.ceil(num_samples / devices) * devices
  shape = (n, config.data.image_size, config.data.image_size, config.data.channels)
  num_steps = num_steps or config.diffusion.num_timesteps
  sample = samplers.make_sample_fn(params_model_fn(model, config), sampler,
                                   diffusion_betas(config), num_steps, shape, mesh,
                                   **(sampler_defaults(config, sampler) | sampler_opts))
  labels = None
  if config.model.num_classes:
    labels = jnp.arange(n, dtype=jnp.int32) % config.model.num_classes

  def generate(params, rng: jax.Array) -> jax.Array:
    return sample(rng, labels, params)

  return generate


def make_grid_sampler(config: ml_collections.ConfigDict, mesh: Mesh, model=None):
  """The training loop's preview with training.sample_steps steps: ancestral sampling, or
  consistency sampling for a consistency run."""
  sampler = 'consistency' if is_consistency(config) else 'ancestral'
  return make_generate_fn(config, mesh, config.training.num_samples, sampler,
                          config.training.sample_steps, model)


def gather_to_host(x: jax.Array) -> np.ndarray:
  """The whole (possibly multi-host) array on every host."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
