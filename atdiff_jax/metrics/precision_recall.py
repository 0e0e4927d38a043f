"""Improved precision and recall (Kynkäänniemi et al. 2019) on Inception features.

Every feature vector of a set spans a ball whose radius is the distance to its
k-th nearest neighbour in the same set (k = 3, itself excluded); the union of a
set's balls estimates its manifold. Precision is the fraction of sample
features inside the reference manifold, recall the fraction of reference
features inside the sample manifold.

As the ADM evaluator (`ManifoldEstimator` in guided-diffusion's
evaluations/evaluator.py) computes them: squared Euclidean distances
|u|^2 - 2 u.v + |v|^2 clipped at 0, a point is inside a ball when d^2 <= r^2,
pool3 features, k = 3. Differences that only move numbers within rounding:
float32 throughout (ADM tries float16 first), and both sets are shifted by the
reference mean first (distances do not change; the expansion cancels less).
The evaluation keeps at most `MAX_MANIFOLD` random reference features and up to
`MAX_SAMPLE_MANIFOLD` sample features, as ADM (its 10k reference batch against all
50k samples).

Distances run in JAX, one block of rows against a whole set at a time, so
memory is O(block_size * N), never N x N (1024 x 10k floats: 40 MB).

Reference features live in their own .npz next to the reference statistics
(`manifold_features_path`): `features` (float32) and `meta_<name>` scalars.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NEIGHBORHOOD = 3
MAX_MANIFOLD = 10_000  # reference features, as the ADM reference batches
MAX_SAMPLE_MANIFOLD = 50_000  # sample features: all of a standard 50k evaluation
BLOCK_SIZE = 1024  # rows per distance block

# No TF32 / bf16 passes on accelerators: radii and distances are compared exactly.
_PRECISION = jax.lax.Precision.HIGHEST


def _sq_distances(x: jax.Array, y: jax.Array) -> jax.Array:
  """(B, D), (M, D) -> (B, M) squared Euclidean distances, clipped at 0."""
  xx = jnp.sum(x * x, axis=1)[:, None]
  yy = jnp.sum(y * y, axis=1)[None, :]
  return jnp.maximum(xx - 2.0 * jnp.dot(x, y.T, precision=_PRECISION) + yy, 0.0)


def _row_blocks(x: jax.Array, block_size: int, fill: float = 0.0) -> jax.Array:
  """(N, ...) -> (ceil(N / block_size), block_size, ...), the last block padded with `fill`."""
  pad = -x.shape[0] % block_size
  x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
  return x.reshape(-1, block_size, *x.shape[1:])


@functools.partial(jax.jit, static_argnames=('k', 'block_size'))
def _knn_radii(features: jax.Array, k: int, block_size: int) -> jax.Array:
  n = features.shape[0]
  starts = jnp.arange(-(-n // block_size)) * block_size

  def block_radii(args):
    rows, start = args
    d = _sq_distances(rows, features)
    is_self = (start + jnp.arange(block_size))[:, None] == jnp.arange(n)[None, :]
    d = jnp.where(is_self, jnp.inf, d)
    return -jax.lax.top_k(-d, k)[0][:, k - 1]  # the k-th smallest

  # lax.map runs the blocks one after another: one (block_size, N) matrix at a time.
  return jax.lax.map(block_radii, (_row_blocks(features, block_size), starts)).reshape(-1)[:n]


@functools.partial(jax.jit, static_argnames=('block_size',))
def _membership(ref: jax.Array, ref_radii: jax.Array, samples: jax.Array,
                sample_radii: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
  # One pass over reference row blocks answers both questions (as ADM's `less_thans`).
  def step(samples_in, args):
    rows, radii = args
    d = _sq_distances(rows, samples)
    samples_in = samples_in | jnp.any(d <= radii[:, None], axis=0)
    return samples_in, jnp.any(d <= sample_radii[None, :], axis=1)

  # Padding rows get radius -inf: their balls hold nothing.
  blocks = (_row_blocks(ref, block_size), _row_blocks(ref_radii, block_size, -jnp.inf))
  samples_in, refs_in = jax.lax.scan(step, jnp.zeros(samples.shape[0], bool), blocks)
  return refs_in.reshape(-1)[:ref.shape[0]], samples_in


def _check(features: np.ndarray, k: int, what: str) -> np.ndarray:
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] <= k:
    raise ValueError(f'{what}: need (N, D) features with N > k={k}, got shape {features.shape}')
  return features


def _block(block_size: int, n: int) -> int:
  if block_size < 1:
    raise ValueError(f'block_size must be positive, got {block_size}')
  return min(block_size, n)  # small sets: one unpadded block


def manifold_radii(features: np.ndarray, k: int = NEIGHBORHOOD,
                   block_size: int = BLOCK_SIZE) -> np.ndarray:
  """(N,) float32 squared distance of each feature to its k-th nearest other feature."""
  x = _check(features, k, 'features')
  x = jnp.asarray(x - x.mean(axis=0), jnp.float32)
  return np.asarray(_knn_radii(x, k, _block(block_size, x.shape[0])))


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray,
                     k: int = NEIGHBORHOOD, block_size: int = BLOCK_SIZE,
                     ref_radii: np.ndarray | None = None) -> tuple[float, float]:
  """(precision, recall) of (N, D) sample features against (M, D) reference features.

  `ref_radii`: `manifold_radii(ref_features, k)`, when already known (a sweep scores
  many sample sets against one reference).
  """
  if k < 1:
    raise ValueError(f'k must be positive, got {k}')
  ref = _check(ref_features, k, 'reference features')
  samples = _check(sample_features, k, 'sample features')
  if ref.shape[1] != samples.shape[1]:
    raise ValueError(f'feature dims differ: reference {ref.shape}, samples {samples.shape}')
  shift = ref.mean(axis=0)
  ref = jnp.asarray(ref - shift, jnp.float32)
  samples = jnp.asarray(samples - shift, jnp.float32)
  ref_block = _block(block_size, ref.shape[0])
  if ref_radii is None:
    ref_radii = _knn_radii(ref, k, ref_block)
  elif np.shape(ref_radii) != (ref.shape[0],):
    raise ValueError(f'ref_radii has shape {np.shape(ref_radii)}, expected ({ref.shape[0]},)')
  ref_radii = jnp.asarray(ref_radii, jnp.float32)
  sample_radii = _knn_radii(samples, k, _block(block_size, samples.shape[0]))
  refs_in, samples_in = _membership(ref, ref_radii, samples, sample_radii, ref_block)
  return float(np.mean(np.asarray(samples_in))), float(np.mean(np.asarray(refs_in)))


class RandomSubset:
  """A uniform random subset of at most `size` of the rows seen by `update`, streamed.

  Each row draws a random key and the `size` rows with the smallest keys are
  kept: a sample without replacement that does not depend on how the rows were
  batched, nor on their order in the data (reference sets are often sorted by class).
  """

  def __init__(self, size: int, seed: int = 0):
    if size < 1:
      raise ValueError(f'size must be positive, got {size}')
    self.size = size
    self.count = 0
    self._rng = np.random.default_rng(seed)
    self._rows: np.ndarray | None = None
    self._keys = np.full(size, np.inf)  # empty slots: key inf, replaced first
    self._index = np.full(size, -1, np.int64)

  def update(self, rows: np.ndarray) -> None:
    rows = np.asarray(rows, np.float32)
    if rows.ndim != 2 or (self._rows is not None and rows.shape[1] != self._rows.shape[1]):
      raise ValueError(f'expected (N, D) rows with the same D each time, got {rows.shape}')
    keys = self._rng.random(rows.shape[0])
    index = self.count + np.arange(rows.shape[0])
    # Until the subset is full every row is kept, in the next free slot; the buffer grows
    # as rows come, so a large `size` costs nothing for a small set.
    filled = min(self.count, self.size)
    take = min(rows.shape[0], self.size - filled)
    self.count += rows.shape[0]
    if take:
      self._reserve(filled + take, rows.shape[1])
      fill = slice(filled, filled + take)
      self._rows[fill], self._keys[fill], self._index[fill] = (rows[:take], keys[:take],
                                                               index[:take])
      rows, keys, index = rows[take:], keys[take:], index[take:]
    if not rows.shape[0]:
      return
    # Full: the `size` smallest keys of the kept rows and the new ones stay.
    keep = np.argpartition(np.concatenate([self._keys, keys]), self.size - 1)[:self.size]
    new = keep[keep >= self.size] - self.size
    stays = np.zeros(self.size, bool)
    stays[keep[keep < self.size]] = True
    slots = np.flatnonzero(~stays)  # as many as `new`
    self._rows[slots], self._keys[slots], self._index[slots] = rows[new], keys[new], index[new]

  def _reserve(self, rows_needed: int, dim: int) -> None:
    allocated = 0 if self._rows is None else self._rows.shape[0]
    if allocated >= rows_needed:
      return
    grown = np.zeros((min(self.size, max(rows_needed, 2 * allocated)), dim), np.float32)
    if self._rows is not None:
      grown[:allocated] = self._rows
    self._rows = grown

  def result(self, limit: int | None = None) -> np.ndarray:
    """The kept rows (min(size, count), D), in the order they were seen.

    `limit`: only the `limit` rows with the smallest keys, i.e. the subset a
    RandomSubset(limit) with the same seed would have kept.
    """
    if self._rows is None:
      raise ValueError('no rows seen')
    filled = np.flatnonzero(self._index >= 0)
    if limit is not None and limit < filled.size:
      filled = filled[np.argsort(self._keys[filled], kind='stable')[:limit]]
    return self._rows[filled[np.argsort(self._index[filled])]]


def manifold_features_path(stats_path: str) -> str:
  """The reference features' file that goes with a stats file: <stats stem>_manifold.npz."""
  return f'{os.path.splitext(stats_path)[0]}_manifold.npz'


def save_manifold_features(path: str, features: np.ndarray, **metadata: Any) -> None:
  """Writes (N, D) features (float32) and scalar metadata as .npz."""
  features = np.asarray(features, np.float32)
  if features.ndim != 2:
    raise ValueError(f'expected (N, D) features, got shape {features.shape}')
  for key, value in metadata.items():
    if np.ndim(value) != 0:
      raise ValueError(f'metadata {key!r} must be a scalar or string, got {value!r}')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrays = {f'meta_{k}': np.asarray(v) for k, v in metadata.items()}
  with open(path, 'wb') as f:  # a file object keeps np.savez from appending '.npz'
    np.savez(f, features=features, **arrays)


def load_manifold_features(path: str) -> np.ndarray:
  """The (N, D) float32 features of a file written by `save_manifold_features`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'reference features for precision / recall not found at {path!r}')
  with np.load(path, allow_pickle=False) as data:
    if 'features' not in data.files:
      raise ValueError(f'{path!r} has no features array (keys: {data.files[:10]})')
    return np.asarray(data['features'], np.float32)
