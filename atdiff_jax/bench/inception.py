"""FID Inception feature extraction throughput, as the FID pipeline runs it."""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
from jax.sharding import Mesh

from atdiff_jax.bench import common
from atdiff_jax.metrics.features import make_feature_fn
from atdiff_jax.models.inception import (INCEPTION_SIZE, InceptionV3, load_inception,
                                         random_variables)
from atdiff_jax.parallel import make_mesh


def bench_inception(batch_size: int,
                    steps: int = 3,
                    warmup: int = 1,
                    repeats: int = 3,
                    weights_path: str = '',
                    image_size: int = 32,
                    mesh: Mesh | None = None,
                    log=None) -> dict[str, Any]:
  """Images per second from host uint8 images to host features (resize to 299 included).

  Random weights unless `weights_path` names a weights file: speed does not depend on
  the values. The batch is rounded up to the device count. Result: {'batch_size',
  'input_size', 'resized_to', 'weights', 'first_call_s' (compiling included),
  's_per_batch' (the best of `repeats` rounds of `steps` calls), 'round_s_per_batch',
  'images_per_s', 'peak_memory', 'steps', 'warmup', 'repeats'}.
  """
  mesh = make_mesh() if mesh is None else mesh
  batch = common.round_to_devices(batch_size, mesh.size)
  if weights_path:
    model, variables = load_inception(weights_path)
  else:
    model, variables = InceptionV3(include_logits=False), random_variables(include_logits=False)
  features = make_feature_fn(model, variables, mesh)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
  if log:
    log('inception')
  call = functools.partial(features, images)
  # make_feature_fn hides its executable, so compile time is read off the first call.
  first_call_s = common.seconds_per_call(call, 1)
  common.warm_up(call, warmup)
  times = common.round_robin([lambda: call], steps, repeats)[0]
  s_per_batch = min(times)
  return {
      'batch_size': batch,
      'input_size': image_size,
      'resized_to': INCEPTION_SIZE,
      'weights': weights_path or 'random',
      'first_call_s': first_call_s,
      's_per_batch': s_per_batch,
      'round_s_per_batch': times,
      'images_per_s': batch / s_per_batch,
      'peak_memory': common.peak_memory(),
      'steps': steps,
      'warmup': warmup,
      'repeats': repeats,
  }
