"""The FID pipeline end to end, as `--mode=eval` runs one cell: sample, copy to the host as
uint8, Inception features, Frechet distance."""
from __future__ import annotations

import time
from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from atdiff_jax import config as config_lib
from atdiff_jax.bench import common
from atdiff_jax.bench.sample import random_params
from atdiff_jax.evaluation import metrics as metrics_lib
from atdiff_jax.evaluation.run import Run
from atdiff_jax.evaluation.sweep import score_samples
from atdiff_jax.metrics.features import make_feature_fn
from atdiff_jax.metrics.fid import ReferenceStats
from atdiff_jax.models import create_model
from atdiff_jax.models.inception import (FEATURE_DIM, SPATIAL_DIM, InceptionV3,
                                         random_variables)
from atdiff_jax.parallel import make_mesh


def bench_fid_pipeline(config: ml_collections.ConfigDict, num_samples: int = 10_000,
                       sampler: str = 'dpm_solver++', nfe: int = 10, batch_size: int = 0,
                       weights_path: str = '', mesh: Mesh | None = None,
                       log=None) -> dict[str, Any]:
  """Seconds and images per second for `num_samples` samples scored with FID.

  Random-init U-Net params and (without `weights_path`) random Inception weights: the
  work is the same as with trained ones. The reference statistics are a stand-in (zero
  mean, identity covariance): the 2048-dimensional Frechet distance is computed all the
  same. A first, untimed batch compiles both networks. Result: {'sampler', 'nfe',
  'num_samples', 'batch_size', 'weights', 'compile_s', 'seconds', 'images_per_s',
  'extrapolated_50k_s', 'fid', 'peak_memory'}.
  """
  mesh = make_mesh() if mesh is None else mesh
  config_lib.validate_model(config)
  batch = common.round_to_devices(batch_size or int(config.eval.batch_size), mesh.size)
  model = create_model(config)
  run = Run(config, random_params(config, model, mesh), model, mesh, step=0, workdir='')
  if weights_path:
    extractor = metrics_lib.inception_features(weights_path, mesh)
  else:
    # As `inception_features` builds it from a weights file.
    extractor = metrics_lib.FeatureExtractor(
        'fid', make_feature_fn(InceptionV3(include_logits=False),
                               random_variables(include_logits=False), mesh, spatial=True),
        FEATURE_DIM, spatial_dim=SPATIAL_DIM, max_manifold=metrics_lib.MAX_MANIFOLD)
  reference = ReferenceStats(np.zeros(FEATURE_DIM), np.eye(FEATURE_DIM))
  metrics = [(extractor, reference)]
  options = {'sampler': sampler, 'nfe': nfe, 'eps_scale': 1.0, 'batch_size': batch}
  if log:
    log(f'fid: compiling {sampler} NFE {nfe} and Inception, batch {batch}')
  start = time.perf_counter()
  score_samples(run, metrics, batch, seed=1, **options)  # compiles both networks
  compile_s = time.perf_counter() - start
  if log:
    log(f'fid: first batch {compile_s:.1f} s; timing {num_samples} samples')
  start = time.perf_counter()
  scores = score_samples(run, metrics, num_samples, seed=0, **options)  # ends on the host
  seconds = time.perf_counter() - start
  return {'sampler': sampler, 'nfe': nfe, 'num_samples': num_samples, 'batch_size': batch,
          'weights': weights_path or 'random', 'compile_s': compile_s, 'seconds': seconds,
          'images_per_s': num_samples / seconds,
          'extrapolated_50k_s': seconds * 50_000 / num_samples, 'fid': scores['fid'],
          'peak_memory': common.peak_memory()}
