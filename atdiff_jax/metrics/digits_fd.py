"""`fd_digits`: an offline sample-quality metric for the embedded 8x8 digits.

fd_digits is the Frechet distance between the penultimate-layer features (64 ReLU units)
of a small CNN digit classifier, computed for generated and for real digits. It plays the
role FID plays for natural images, but it is NOT the Inception FID: its values are on
another scale and must never be compared with, or reported as, FID numbers. It exists so
that the quickstart (8x8 digits, no Inception weights, no download) can be evaluated.

The classifier ships as `atdiff_jax/assets/digits_classifier.msgpack` (weights in
float16, ~50 KB); `python -m atdiff_jax.tools.train_digits_classifier` regenerates it and
reports its held-out accuracy, which is also stored in the file.
"""
from __future__ import annotations

import importlib.resources
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
FEATURE_DIM = 64
WEIGHTS_FORMAT = 'atdiff-digits-classifier/1'
ASSET_NAME = 'digits_classifier.msgpack'
_CHUNK = 512  # images per compiled call: one program for any number of images


class DigitsClassifier(nn.Module):
  """Three 3x3 convolutions (8x8 -> 4x4 -> 2x2), a 64-unit feature layer, 10 logits."""

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: float NHWC (N, 8, 8, 1) in [-1, 1] -> (features (N, 64), logits (N, 10))."""
    x = nn.relu(nn.Conv(16, (3, 3), name='conv1')(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2, name='conv2')(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2, name='conv3')(x))
    x = x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(FEATURE_DIM, name='features')(x))
    return features, nn.Dense(NUM_CLASSES, name='logits')(features)


def to_model_input(images) -> jax.Array:
  """uint8 images (0..255), or floats in [-1, 1] quantised as saved samples are, -> [-1, 1]."""
  images = jnp.asarray(images)
  if images.shape[1:] != IMAGE_SHAPE:
    raise ValueError(f'the digits classifier takes (N, 8, 8, 1) images, got {images.shape}')
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32)
  elif jnp.issubdtype(images.dtype, jnp.floating):
    x = jnp.round(jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0))
  else:
    raise TypeError(f'images must be uint8 or floats in [-1, 1], got dtype {images.dtype}')
  return x / 127.5 - 1.0


def save_weights(path: str, params: Any, heldout_accuracy: float, source: str) -> None:
  """Writes the classifier's params (as float16, to stay small) and its accuracy."""
  payload = {
      'format': WEIGHTS_FORMAT,
      'source': source,
      'heldout_accuracy': float(heldout_accuracy),
      'params': jax.tree.map(lambda a: np.asarray(a, np.float16), params),
  }
  with open(path, 'wb') as f:
    f.write(serialization.msgpack_serialize(payload))


def load_weights(path: str | None = None) -> tuple[Any, dict[str, Any]]:
  """(float32 params, {'heldout_accuracy', 'source'}) from `path` or the shipped asset."""
  if path is None:
    data = (importlib.resources.files('atdiff_jax') / 'assets' / ASSET_NAME).read_bytes()
    path = ASSET_NAME
  else:
    with open(path, 'rb') as f:
      data = f.read()
  try:
    payload = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types on garbage
    raise ValueError(f'{path!r} is not a digits classifier weights file: {e}') from e
  if not isinstance(payload, dict) or payload.get('format') != WEIGHTS_FORMAT:
    raise ValueError(f'{path!r} is not a digits classifier weights file ({WEIGHTS_FORMAT!r}); '
                     'regenerate it with python -m atdiff_jax.tools.train_digits_classifier')
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), payload['params'])
  meta = {'heldout_accuracy': float(payload['heldout_accuracy']),
          'source': str(payload['source'])}
  return params, meta


def make_digits_feature_fn(params: Any = None):
  """images (N, 8, 8, 1) -> (features (N, 64), logits (N, 10)) as float32 numpy arrays.

  Images go through in fixed chunks (the last one padded), so any N compiles once.
  """
  params = load_weights()[0] if params is None else params
  model = DigitsClassifier()
  apply = jax.jit(lambda p, x: model.apply({'params': p}, to_model_input(x)))

  def features(images) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    n = images.shape[0]
    if n == 0:
      raise ValueError('empty batch')
    feats, logits = [], []
    for start in range(0, n, _CHUNK):
      chunk = images[start:start + _CHUNK]
      pad = _CHUNK - chunk.shape[0]
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)], axis=0)
      f, l = apply(params, chunk)
      feats.append(np.asarray(f)[:_CHUNK - pad])
      logits.append(np.asarray(l)[:_CHUNK - pad])
    return np.concatenate(feats), np.concatenate(logits)

  return features
