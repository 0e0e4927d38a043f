"""Sample-quality metrics for the evaluation: feature extractors, reference stats, scores.

Three Frechet distances, each named after its feature space so they are never confused:
- `fid`: the Inception FID (and `is`, the Inception Score, when the weights file has the
  classifier), from a converted weights file; comparable with published numbers only
  with 50k samples against the usual reference statistics. With it, as the ADM
  evaluator defines them: `sfid` (the Frechet distance of the spatial mixed_6/conv
  features) and `precision` / `recall` (k=3 manifolds of pool3 features: at most
  `max_manifold` random reference features against up to 50k sample features). They
  need reference statistics that have them (`mu_s` / `sigma_s` in the stats file, the
  features in `<stats stem>_manifold.npz`); a reference without them skips them.
- `fd_digits`: features of a small digits classifier (see `metrics.digits_fd`); only for
  the 8x8 digits, and not comparable with FID.
- `fd_pixels`: raw pixels in [-1, 1] (images of at most 32x32); a cheap sanity check
  for other data when no Inception weights are at hand, not a perceptual metric.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from typing import Callable

import jax
import numpy as np

from atdiff_jax import writing
from atdiff_jax.metrics import digits_fd
from atdiff_jax.metrics import precision_recall as pr
from atdiff_jax.metrics.features import make_feature_fn
from atdiff_jax.metrics.fid import (ReferenceStats, RunningFeatureStats, frechet_distance,
                                    load_stats, save_stats)
from atdiff_jax.metrics.inception_score import inception_score
from atdiff_jax.models.inception import FEATURE_DIM, SPATIAL_DIM, load_inception

log = logging.getLogger(__name__)

# images -> (features, logits or None), plus spatial features when the extractor has them.
FeatureFn = Callable[[np.ndarray], tuple[np.ndarray | None, ...]]
MAX_PIXEL_DIM = 32 * 32 * 3
DEFAULT_BATCH = 500
MAX_MANIFOLD = pr.MAX_MANIFOLD


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """uint8 NHWC images -> features, under the name of the metric they give."""
  name: str                    # 'fid' | 'fd_digits' | 'fd_pixels'
  fn: FeatureFn                # images -> (features (N, dim), logits (N, K) or None[, spatial])
  dim: int
  inception_score: bool = False  # the logits are the Inception classifier's
  spatial_dim: int = 0         # > 0: fn also returns (N, spatial_dim) features, for `sfid`
  max_manifold: int = 0        # > 0: precision / recall, this many reference features at most

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray | None, ...]:
    return self.fn(images)


def metric_names(extractor: FeatureExtractor, reference: ReferenceStats | None = None
                 ) -> list[str]:
  """The names of the metrics `MetricAccumulator.result(reference)` gives."""
  names = [extractor.name]
  if extractor.spatial_dim:
    names.append('sfid')
  if extractor.inception_score:
    names += ['is', 'is_std']
  if extractor.max_manifold:
    names += ['precision', 'recall']
  missing = [] if reference is None else missing_metrics(extractor, reference)
  return [n for n in names if n not in missing]


def missing_metrics(extractor: FeatureExtractor, reference: ReferenceStats) -> list[str]:
  """Metrics the extractor has but `reference` lacks the statistics / features for."""
  missing = []
  if extractor.spatial_dim and not reference.has_spatial:
    missing.append('sfid')
  if extractor.max_manifold and reference.features is None:
    missing += ['precision', 'recall']
  return missing


def inception_features(weights_path: str, mesh: jax.sharding.Mesh | None = None,
                       max_manifold: int = MAX_MANIFOLD) -> FeatureExtractor:
  """The FID Inception network of a converted weights file (never downloaded).

  Gives `fid`, `sfid`, `precision` and `recall` (at most `max_manifold` random
  reference features, up to 50k sample features), and `is` / `is_std` when the file
  has the classifier.

  Raises FileNotFoundError, saying how to convert the weights, when the file is missing.
  """
  model, variables = load_inception(weights_path)
  return FeatureExtractor('fid', make_feature_fn(model, variables, mesh, spatial=True),
                          FEATURE_DIM, inception_score=model.include_logits,
                          spatial_dim=SPATIAL_DIM, max_manifold=max_manifold)


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


# The last reference's features and their k-NN radii: every cell of a sweep is scored
# against the same reference, whose radii cost minutes on a CPU for 10k features.
_radii_memo: list[np.ndarray | None] = [None, None]


def _reference_radii(features: np.ndarray) -> np.ndarray:
  if _radii_memo[0] is not features:
    _radii_memo[:] = [features, pr.manifold_radii(features)]
  return _radii_memo[1]


# The host's share of every batch (float64 feature sums, the precision/recall subset) runs
# on this one worker, in order, while the caller goes on to dispatch the next batch to the
# device: the device does not wait for the host's statistics.
_HOST_STATS = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                    thread_name_prefix='feature-stats')


class MetricAccumulator:
  """Feeds image batches through one extractor; the metrics against reference stats.

  Keeps running statistics (pool3 and spatial) and, for precision / recall, a
  random subset of the features (drawn with `seed`): up to MAX_SAMPLE_MANIFOLD of
  them as samples, `extractor.max_manifold` of them as a reference. A batch's statistics
  are added in the background (`update` returns once its features are on the host); every
  reading waits for them.
  """

  def __init__(self, extractor: FeatureExtractor, seed: int = 0):
    self.extractor = extractor
    self._stats = RunningFeatureStats(extractor.dim)
    self._spatial = RunningFeatureStats(extractor.spatial_dim) if extractor.spatial_dim else None
    # Samples keep up to MAX_SAMPLE_MANIFOLD features (all of a 50k evaluation, as ADM);
    # as a reference, the max_manifold of them with the smallest keys are used.
    self._subset = (pr.RandomSubset(max(extractor.max_manifold, pr.MAX_SAMPLE_MANIFOLD), seed)
                    if extractor.max_manifold else None)
    self._logits: list[np.ndarray] = []
    self._pending: concurrent.futures.Future | None = None

  def update(self, images: np.ndarray) -> None:
    outputs = self.extractor(images)
    self._wait()  # one batch in flight: bounded memory, and errors surface at the next batch
    self._pending = _HOST_STATS.submit(self._add, outputs)

  def _wait(self) -> None:
    if self._pending is not None:
      pending, self._pending = self._pending, None
      pending.result()

  def _add(self, outputs) -> None:
    features, logits = outputs[0], outputs[1]
    self._stats.update(features)
    if self._spatial is not None:
      self._spatial.update(outputs[2])
    if self._subset is not None:
      self._subset.update(features)
    if self.extractor.inception_score and logits is not None:
      self._logits.append(np.asarray(logits, np.float32))

  def stats(self) -> tuple[np.ndarray, np.ndarray]:
    self._wait()
    return self._stats.result()

  def as_reference(self, **metadata) -> ReferenceStats:
    """Everything seen so far as reference statistics (spatial ones and features if kept)."""
    self._wait()
    mu, sigma = self._stats.result()
    mu_s, sigma_s = self._spatial.result() if self._spatial is not None else (None, None)
    features = (self._subset.result(self.extractor.max_manifold) if self._subset is not None
                else None)
    return ReferenceStats(mu, sigma, {'num_images': self._stats.count, **metadata},
                          mu_spatial=mu_s, sigma_spatial=sigma_s, features=features)

  def result(self, reference: ReferenceStats) -> dict[str, float]:
    """{name: Frechet distance} and the other `metric_names` that apply.

    Metrics whose data `reference` lacks (see `missing_metrics`) are left out.
    """
    self._wait()
    mu, sigma = self._stats.result()
    metrics = {self.extractor.name: frechet_distance(mu, sigma, reference.mu, reference.sigma)}
    if self._spatial is not None and reference.has_spatial:
      metrics['sfid'] = frechet_distance(*self._spatial.result(), reference.mu_spatial,
                                         reference.sigma_spatial)
    if self._logits:
      logits = np.concatenate(self._logits)
      metrics['is'], metrics['is_std'] = inception_score(logits, min(10, len(logits)))
    if self._subset is not None and reference.features is not None:
      samples = self._subset.result()
      if len(samples) > pr.NEIGHBORHOOD:
        metrics['precision'], metrics['recall'] = pr.precision_recall(
            reference.features, samples, ref_radii=_reference_radii(reference.features))
      else:
        log.warning('precision / recall need more than %d samples, have %d: skipped',
                    pr.NEIGHBORHOOD, len(samples))
    return metrics


def _batches(images: np.ndarray, batch_size: int):
  for start in range(0, images.shape[0], batch_size):
    yield images[start:start + batch_size]


def warn_missing(extractor: FeatureExtractor, reference: ReferenceStats, where: str) -> None:
  """Logs the metrics that are skipped because the reference `where` lacks their data."""
  missing = missing_metrics(extractor, reference)
  if missing:
    log.warning('%s lacks what %s need (sfid: mu_s / sigma_s in the stats file; precision / '
                'recall: reference features in <stats stem>_manifold.npz): skipped', where,
                ', '.join(missing))


def compute_metrics(images_uint8: np.ndarray, ref_stats: ReferenceStats,
                    feature_fn: FeatureExtractor, batch_size: int = DEFAULT_BATCH
                    ) -> dict[str, float]:
  """The extractor's metrics (`metric_names`) of uint8 NHWC images against `ref_stats`."""
  images_uint8 = np.asarray(images_uint8)
  if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4:
    raise ValueError(f'expected uint8 NHWC images, got {images_uint8.dtype} '
                     f'{images_uint8.shape}')
  warn_missing(feature_fn, ref_stats, 'the reference')
  accumulator = MetricAccumulator(feature_fn)
  for batch in _batches(images_uint8, batch_size):
    accumulator.update(batch)
  return accumulator.result(ref_stats)


def reference_stats(source, extractor: FeatureExtractor, batch_size: int = DEFAULT_BATCH,
                    **metadata) -> ReferenceStats:
  """Feature statistics of every image of a data source (`atdiff_jax.data` sources).

  With them, as the extractor has them: the spatial statistics and a random subset
  of at most `extractor.max_manifold` features.
  """
  accumulator = MetricAccumulator(dataclasses.replace(extractor, inception_score=False))
  for start in range(0, len(source), batch_size):
    images, _ = source.get(np.arange(start, min(start + batch_size, len(source))))
    accumulator.update(images)
  return accumulator.as_reference(**metadata)


def load_reference(path: str) -> ReferenceStats:
  """A stats file (`metrics.fid.load_stats`) with the features of its `_manifold.npz`, if any."""
  stats = load_stats(path)
  features_path = pr.manifold_features_path(path)
  if os.path.isfile(features_path):
    stats = dataclasses.replace(stats, features=pr.load_manifold_features(features_path))
  return stats


def save_reference(path: str, stats: ReferenceStats) -> None:
  """Writes `stats` to `path` and its features (if any) to `<stem>_manifold.npz`, atomically."""
  if stats.features is not None:
    with writing.replacing(pr.manifold_features_path(path)) as tmp:
      pr.save_manifold_features(tmp, stats.features, **stats.metadata)
  with writing.replacing(path) as tmp:
    save_stats(tmp, stats.mu, stats.sigma, mu_spatial=stats.mu_spatial,
               sigma_spatial=stats.sigma_spatial, **stats.metadata)


def _stale(stats: ReferenceStats, extractor: FeatureExtractor, num_images: int) -> list[str]:
  """What a cached reference lacks that `extractor` gives (empty: usable as it is)."""
  stale = []
  if extractor.spatial_dim and (not stats.has_spatial or
                                stats.mu_spatial.shape != (extractor.spatial_dim,)):
    stale.append('spatial statistics (sfid)')
  if extractor.max_manifold and (stats.features is None or
                                 len(stats.features) != min(extractor.max_manifold, num_images)):
    stale.append(f'{min(extractor.max_manifold, num_images)} reference features '
                 '(precision, recall)')
  return stale


def cached_reference_stats(path: str, source, extractor: FeatureExtractor,
                           batch_size: int = DEFAULT_BATCH, **metadata) -> ReferenceStats:
  """`reference_stats`, read from `path` when it exists, else computed and written there.

  A cached file without what the extractor needs (sfid statistics or precision /
  recall features: a file written before those metrics, or with another
  `max_manifold`) is recomputed from the data and rewritten, with a warning: it is
  this function's own cache, and `fid` comes out the same.
  """
  if os.path.isfile(path):
    stats = load_reference(path)
    stale = _stale(stats, extractor, len(source))
    if not stale:
      return stats
    log.warning('%s has no %s: recomputing it from the data', path, ' or '.join(stale))
  stats = reference_stats(source, extractor, batch_size, **metadata)
  if jax.process_index() == 0:
    save_reference(path, stats)
  return stats
