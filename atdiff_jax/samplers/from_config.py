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
from atdiff_jax.config import image_shape
from atdiff_jax.diffusion import betas_of
from atdiff_jax.models import create_model, make_apply_fn
from atdiff_jax.views import view_of


def params_model_fn(model, config: ml_collections.ConfigDict | None = None
                    ) -> Callable[..., jax.Array]:
  """`model_fn(x, t, y, params) -> output` for the samplers: params are an input of the
  compiled program, not constants baked into it.

  With `config`, the output is read as the run's objective reads it (`views`): e.g. a
  consistency run's as the eps whose x0 prediction is f(x, t), so every sampler and probe
  can use it.
  """
  apply = make_apply_fn(model)
  model_fn = lambda x, t, y, params: apply(params, x, t, y)
  return model_fn if config is None else view_of(config).eval_model_fn(model_fn)


def sampler_defaults(config: ml_collections.ConfigDict, sampler: str) -> dict:
  """Options of `sampler` that the run's own training settles (`views`)."""
  return view_of(config).sampler_defaults(sampler)


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
  shape = (n, *image_shape(config))
  num_steps = num_steps or config.diffusion.num_timesteps
  sample = samplers.make_sample_fn(params_model_fn(model, config), sampler,
                                   betas_of(config), num_steps, shape, mesh,
                                   **(sampler_defaults(config, sampler) | sampler_opts))
  labels = None
  if config.model.num_classes:
    labels = jnp.arange(n, dtype=jnp.int32) % config.model.num_classes

  def generate(params, rng: jax.Array) -> jax.Array:
    return sample(rng, labels, params)

  return generate


def make_preview_fn(config: ml_collections.ConfigDict, mesh: Mesh, model=None):
  """The training loop's preview with training.sample_steps steps, with the sampler of the
  run's objective (`views`: ancestral, or consistency sampling for a consistency run)."""
  sampler = view_of(config).preview_sampler
  return make_generate_fn(config, mesh, config.training.num_samples, sampler,
                          config.training.sample_steps, model)


def gather_to_host(x: jax.Array) -> np.ndarray:
  """The whole (possibly multi-host) array on every host."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
