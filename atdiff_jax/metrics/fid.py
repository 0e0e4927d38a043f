"""Frechet Inception Distance: feature statistics, the distance, reference-stats files.

FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), everything in float64 on
the host. The trace of the matrix square root is computed from eigenvalues:
with A = S1^(1/2) (symmetric, from `eigh`), S1 S2 is similar to the symmetric
PSD matrix A S2 A, so tr((S1 S2)^(1/2)) = sum sqrt(eig(A S2 A)). This stays
real and needs no iteration, unlike a general `sqrtm`, and tiny negative
eigenvalues from rounding are clipped to 0.

Reference stats are `.npz` files with `mu`, `sigma`, optionally `mu_s` and
`sigma_s` (the sFID statistics of the spatial features, named as in the ADM
reference batches) and `meta_<name>` scalars (e.g. `meta_num_images`); files
with just `mu` and `sigma` (pytorch-fid, older files of this module) load too,
without spatial statistics.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) of (N, D) features in float64; covariance with N - 1, as np.cov."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f'need (N, D) features with N >= 2, got shape {features.shape}')
  return features.mean(axis=0), np.cov(features, rowvar=False)


class RunningFeatureStats:
  """Accumulates mean and covariance batch by batch (no need to keep all features)."""

  def __init__(self, dim: int):
    self.count = 0
    self._shift = None  # first batch's mean: keeps the float64 sums well conditioned
    self._sum = np.zeros(dim, np.float64)
    self._outer = np.zeros((dim, dim), np.float64)

  def update(self, features: np.ndarray) -> None:
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != self._sum.shape[0]:
      raise ValueError(f'expected (N, {self._sum.shape[0]}) features, got shape {x.shape}')
    if self._shift is None:
      self._shift = x.mean(axis=0)
    x = x - self._shift
    self.count += x.shape[0]
    self._sum += x.sum(axis=0)
    self._outer += x.T @ x

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance with N - 1) of everything seen so far."""
    if self.count < 2:
      raise ValueError(f'need at least 2 feature vectors, have {self.count}')
    mean = self._sum / self.count
    cov = (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)
    return mean + self._shift, cov


def _sqrt_trace_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((sigma1 sigma2)^(1/2)) for symmetric PSD matrices."""
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  middle = root1 @ sigma2 @ root1
  eig = np.linalg.eigvalsh((middle + middle.T) / 2.0)
  return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f'shape mismatch: mu1 {mu1.shape}, sigma1 {sigma1.shape}, '
                     f'mu2 {mu2.shape}, sigma2 {sigma2.shape}')
  sigma1, sigma2 = (sigma1 + sigma1.T) / 2.0, (sigma2 + sigma2.T) / 2.0
  diff = mu1 - mu2
  value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * _sqrt_trace_product(
      sigma1, sigma2)
  return float(max(value, 0.0))  # rounding can leave -1e-12 for identical inputs


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID between two sets of (N, D) features."""
  return frechet_distance(*feature_stats(features1), *feature_stats(features2))


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
  """Feature statistics of a reference set, with whatever was recorded about it.

  `mu_spatial` / `sigma_spatial` (sFID) and `features` (a random subset of the
  reference features, for precision / recall; see `metrics.precision_recall`)
  are None when unknown.
  """
  mu: np.ndarray
  sigma: np.ndarray
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
  mu_spatial: np.ndarray | None = None
  sigma_spatial: np.ndarray | None = None
  features: np.ndarray | None = None

  @property
  def num_images(self) -> int | None:
    n = self.metadata.get('num_images')
    return None if n is None else int(n)

  @property
  def has_spatial(self) -> bool:
    return self.mu_spatial is not None and self.sigma_spatial is not None


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, *,
               mu_spatial: np.ndarray | None = None, sigma_spatial: np.ndarray | None = None,
               **metadata: Any) -> None:
  """Writes `mu`, `sigma` and scalar metadata (e.g. num_images=50000) as .npz.

  The spatial statistics, when given, are stored as `mu_s`, `sigma_s`; all arrays
  in float64.
  """
  for key, value in metadata.items():
    if np.ndim(value) != 0:
      raise ValueError(f'metadata {key!r} must be a scalar or string, got {value!r}')
  if (mu_spatial is None) != (sigma_spatial is None):
    raise ValueError('give both mu_spatial and sigma_spatial, or neither')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrays = {f'meta_{k}': np.asarray(v) for k, v in metadata.items()}
  if mu_spatial is not None:
    arrays['mu_s'] = np.asarray(mu_spatial, np.float64)
    arrays['sigma_s'] = np.asarray(sigma_spatial, np.float64)
  with open(path, 'wb') as f:  # a file object keeps np.savez from appending '.npz'
    np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **arrays)


def load_stats(path: str) -> ReferenceStats:
  """Reads a stats .npz (this module's, pytorch-fid's or ADM's reference batches).

  Spatial statistics are read when the file has both `mu_s` and `sigma_s`; the
  `features` of the result are None (they live in their own file).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'FID reference statistics not found at {path!r}')
  with np.load(path, allow_pickle=False) as data:
    if 'mu' not in data.files or 'sigma' not in data.files:
      raise ValueError(f'{path!r} has no mu / sigma arrays (keys: {data.files[:10]})')
    metadata = {k.removeprefix('meta_'): data[k].item() for k in data.files
                if k.startswith('meta_')}
    spatial = {}
    if 'mu_s' in data.files and 'sigma_s' in data.files:
      spatial = {'mu_spatial': np.asarray(data['mu_s'], np.float64),
                 'sigma_spatial': np.asarray(data['sigma_s'], np.float64)}
    return ReferenceStats(np.asarray(data['mu'], np.float64),
                          np.asarray(data['sigma'], np.float64), metadata, **spatial)
