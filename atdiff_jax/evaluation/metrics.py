"""Sample-quality metrics for the evaluation: feature extractors, reference stats, scores.

Three Frechet distances, each named after its feature space so they are never confused:
- `fid`: the Inception FID (and `is`, the Inception Score, when the weights file has the
  classifier), from a converted weights file; comparable with published numbers only
  with 50k samples against the usual reference statistics.
- `fd_digits`: features of a small digits classifier (see `metrics.digits_fd`); only for
  the 8x8 digits, and not comparable with FID.
- `fd_pixels`: raw pixels in [-1, 1] (images of at most 32x32); a cheap sanity check
  for other data when no Inception weights are at hand, not a perceptual metric.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import numpy as np

from atdiff_jax.metrics import digits_fd
from atdiff_jax.metrics.features import make_feature_fn
from atdiff_jax.metrics.fid import (ReferenceStats, RunningFeatureStats, frechet_distance,
                                    load_stats, save_stats)
from atdiff_jax.metrics.inception_score import inception_score
from atdiff_jax.models.inception import FEATURE_DIM, load_inception

FeatureFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
MAX_PIXEL_DIM = 32 * 32 * 3
DEFAULT_BATCH = 500


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """uint8 NHWC images -> features, under the name of the metric they give."""
  name: str                    # 'fid' | 'fd_digits' | 'fd_pixels'
  fn: FeatureFn                # images -> (features (N, dim), logits (N, K) or None)
  dim: int
  inception_score: bool = False  # the logits are the Inception classifier's

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    return self.fn(images)


def inception_features(weights_path: str, mesh: jax.sharding.Mesh | None = None
                       ) -> FeatureExtractor:
  """The FID Inception network of a converted weights file (never downloaded).

  Raises FileNotFoundError, saying how to convert the weights, when the file is missing.
  """
  model, variables = load_inception(weights_path)
  return FeatureExtractor('fid', make_feature_fn(model, variables, mesh), FEATURE_DIM,
                          inception_score=model.include_logits)


def digits_features(weights_path: str | None = None) -> FeatureExtractor:
  """`fd_digits` features of 8x8x1 digits (the shipped classifier by default). Not FID."""
  params, _ = digits_fd.load_weights(weights_path)
  return FeatureExtractor('fd_digits', digits_fd.make_digits_feature_fn(params),
                          digits_fd.FEATURE_DIM)


def pixel_features(image_shape: tuple[int, int, int]) -> FeatureExtractor:
  """`fd_pixels`: the flattened pixels in [-1, 1], for images of at most 32x32x3. Not FID."""
  dim = int(np.prod(image_shape))
  if dim > MAX_PIXEL_DIM:
    raise ValueError(f'fd_pixels is for images up to 32x32x3, got {image_shape}')

  def fn(images):
    images = np.asarray(images)
    if images.shape[1:] != tuple(image_shape):
      raise ValueError(f'expected images of shape {image_shape}, got {images.shape[1:]}')
    return images.reshape(images.shape[0], -1).astype(np.float32) / 127.5 - 1.0, None

  return FeatureExtractor('fd_pixels', fn, dim)


class MetricAccumulator:
  """Feeds image batches through one extractor; the metric against reference stats."""

  def __init__(self, extractor: FeatureExtractor):
    self.extractor = extractor
    self._stats = RunningFeatureStats(extractor.dim)
    self._logits: list[np.ndarray] = []

  def update(self, images: np.ndarray) -> None:
    features, logits = self.extractor(images)
    self._stats.update(features)
    if self.extractor.inception_score and logits is not None:
      self._logits.append(np.asarray(logits, np.float32))

  def stats(self) -> tuple[np.ndarray, np.ndarray]:
    return self._stats.result()

  def result(self, reference: ReferenceStats) -> dict[str, float]:
    """{name: Frechet distance}, plus 'is' and 'is_std' for Inception with logits."""
    mu, sigma = self._stats.result()
    metrics = {self.extractor.name: frechet_distance(mu, sigma, reference.mu, reference.sigma)}
    if self._logits:
      logits = np.concatenate(self._logits)
      metrics['is'], metrics['is_std'] = inception_score(logits, min(10, len(logits)))
    return metrics


def _batches(images: np.ndarray, batch_size: int):
  for start in range(0, images.shape[0], batch_size):
    yield images[start:start + batch_size]


def compute_metrics(images_uint8: np.ndarray, ref_stats: ReferenceStats,
                    feature_fn: FeatureExtractor, batch_size: int = DEFAULT_BATCH
                    ) -> dict[str, float]:
  """The extractor's Frechet distance (and IS) of uint8 NHWC images against `ref_stats`."""
  images_uint8 = np.asarray(images_uint8)
  if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4:
    raise ValueError(f'expected uint8 NHWC images, got {images_uint8.dtype} '
                     f'{images_uint8.shape}')
  accumulator = MetricAccumulator(feature_fn)
  for batch in _batches(images_uint8, batch_size):
    accumulator.update(batch)
  return accumulator.result(ref_stats)


def reference_stats(source, extractor: FeatureExtractor, batch_size: int = DEFAULT_BATCH,
                    **metadata) -> ReferenceStats:
  """Feature statistics of every image of a data source (`atdiff_jax.data` sources)."""
  accumulator = MetricAccumulator(dataclasses.replace(extractor, inception_score=False))
  for start in range(0, len(source), batch_size):
    images, _ = source.get(np.arange(start, min(start + batch_size, len(source))))
    accumulator.update(images)
  mu, sigma = accumulator.stats()
  return ReferenceStats(mu, sigma, {'num_images': len(source), **metadata})


def cached_reference_stats(path: str, source, extractor: FeatureExtractor,
                           batch_size: int = DEFAULT_BATCH, **metadata) -> ReferenceStats:
  """`reference_stats`, read from `path` when it exists, else computed and written there."""
  if os.path.isfile(path):
    return load_stats(path)
  stats = reference_stats(source, extractor, batch_size, **metadata)
  if jax.process_index() == 0:
    tmp = f'{path}.tmp'
    save_stats(tmp, stats.mu, stats.sigma, **stats.metadata)
    os.replace(tmp, path)
  return stats
