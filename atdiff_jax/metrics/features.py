"""Images -> FID Inception features and logits, sharded over devices.

Input pipeline, chosen to reproduce the TF graph `inception-2015-12-05` that
reference FID numbers come from:

1. Images are uint8 or floats in [-1, 1], NHWC, any size, 1 or 3 channels
   (grey images are repeated to RGB). Floats are first quantised to the 256
   levels a saved sample would have (`round((x + 1) * 127.5)`, clipped, as
   `atdiff_jax.images.to_uint8` does), so that FID on in-memory samples equals
   FID on the same samples written to disk. (ADM's sampling script truncates
   instead of rounding; `quantize=False` keeps the floats unquantised.)
2. Resize to 299x299 with the graph's own resize: TF1 `ResizeBilinear` with
   `align_corners=False` and no half-pixel centres, i.e. output pixel j samples
   the input at j * in / out (edge-clamped). The reference evaluators (TTUR,
   ADM) feed the raw images to the graph, so it is this op that produced their
   statistics; PIL / torch / `jax.image.resize` use half-pixel centres and give
   slightly different features. The resize is two small interpolation matrices
   applied with einsum, and the identity at 299x299.
3. Scale to the graph's range, (x - 128) / 128.

With `spatial=True` the functions also return the sFID features (N, 2023):
the first 7 channels of `mixed_6/conv`, flattened (`models.inception`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from atdiff_jax import parallel
from atdiff_jax.models.inception import (INCEPTION_SIZE, InceptionV3, load_inception,
                                         spatial_features)

# images -> (features, logits or None), plus the spatial features with spatial=True.
FeatureFn = Callable[[np.ndarray | jax.Array], tuple[np.ndarray | None, ...]]


def tf_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) interpolation weights of TF1 ResizeBilinear (no half-pixel centres)."""
  src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
  lower = np.floor(src).astype(np.int64)
  upper = np.minimum(lower + 1, in_size - 1)
  frac = src - lower
  weights = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lower), 1.0 - frac)
  np.add.at(weights, (rows, upper), frac)
  return weights.astype(np.float32)


def tf_bilinear_resize(images: jax.Array, size: int = INCEPTION_SIZE) -> jax.Array:
  """Resizes float NHWC images to size x size as the FID graph does (see module doc)."""
  _, h, w, _ = images.shape
  hi = jax.lax.Precision.HIGHEST
  if h != size:
    images = jnp.einsum('oh,nhwc->nowc', tf_bilinear_matrix(h, size), images, precision=hi)
  if w != size:
    images = jnp.einsum('ow,nhwc->nhoc', tf_bilinear_matrix(w, size), images, precision=hi)
  return images


def preprocess(images: jax.Array, quantize: bool = True) -> jax.Array:
  """uint8 or [-1, 1] float NHWC images -> float32 299x299x3 in the graph's range."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'expected NHWC images with 1 or 3 channels, got shape {images.shape}')
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32)
  elif jnp.issubdtype(images.dtype, jnp.floating):
    x = jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)
    if quantize:
      x = jnp.round(x)
  else:
    raise TypeError(f'images must be uint8 or floats in [-1, 1], got dtype {images.dtype}')
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = tf_bilinear_resize(x, INCEPTION_SIZE)
  return (x - 128.0) / 128.0


def inception_outputs(model: InceptionV3, variables: dict, images: jax.Array,
                      quantize: bool = True, spatial: bool = False
                      ) -> tuple[jax.Array | None, ...]:
  """Pure and jittable: images -> (pool3 features (N, 2048), logits (N, 1008) or None).

  With `spatial`, a third output: the sFID features (N, 2023).
  """
  x = preprocess(images, quantize)
  if not spatial:
    return model.apply(variables, x)
  (features, logits), state = model.apply(variables, x, mutable='intermediates')
  return features, logits, spatial_features(state['intermediates'])


def make_feature_fn(model: InceptionV3, variables: dict, mesh: jax.sharding.Mesh | None = None,
                    quantize: bool = True, spatial: bool = False) -> FeatureFn:
  """A function images -> (features, logits or None) as float32 numpy arrays.

  With `spatial`, it returns (features, logits or None, spatial features (N, 2023)).

  The batch is split over the mesh axis 'data' (data-parallel, weights
  replicated) and padded to a multiple of the mesh size; the padding is dropped
  from the outputs. Each new batch shape compiles once.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  shards = parallel.num_shards(mesh)
  batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  variables = jax.device_put(variables, replicated)
  apply = jax.jit(lambda v, x: inception_outputs(model, v, x, quantize, spatial),
                  in_shardings=(replicated, batch_sharding), out_shardings=batch_sharding)

  def features(images):
    n = images.shape[0]
    if n == 0:
      raise ValueError('empty batch')
    pad = -n % shards
    if pad:
      xp = jnp if isinstance(images, jax.Array) else np
      images = xp.concatenate([images, xp.repeat(images[-1:], pad, axis=0)], axis=0)
    # An explicit reshard: jit refuses committed arrays laid out differently.
    outputs = apply(variables, jax.device_put(images, batch_sharding))
    return tuple(None if out is None else np.asarray(out)[:n] for out in outputs)

  return features


def load_feature_fn(weights_path: str, mesh: jax.sharding.Mesh | None = None,
                    quantize: bool = True, spatial: bool = False) -> FeatureFn:
  """`make_feature_fn` for the network in a weights file (see models.inception)."""
  model, variables = load_inception(weights_path)
  return make_feature_fn(model, variables, mesh, quantize, spatial)
