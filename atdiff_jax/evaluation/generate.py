"""Many samples from a run: batch by batch, reproducible, optionally as resumable shards.

Batch b (images b * batch_size ... (b + 1) * batch_size - 1) is drawn with the key
`fold_in(key(seed), b)` and, for class-conditional models, labels `image index mod
classes`; the samplers draw noise on the global batch shape, so the images depend on
(seed, batch_size, sampler settings) and not on the number of devices or hosts.

On disk (`out_dir`): one `samples_<start>_<end>.npz` per batch (uint8 `images`, plus int32
`labels` for class-conditional models), each written to a temporary file and renamed, so
a shard that exists is complete; `samples.json` records the settings, and a restart with
the same settings keeps the shards that exist and makes only the missing ones.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from atdiff_jax import config as config_lib
from atdiff_jax import images as images_lib
from atdiff_jax import writing
from atdiff_jax.data import to_uint8
from atdiff_jax.evaluation import settings as eval_settings
from atdiff_jax.evaluation import run as run_lib
from atdiff_jax.samplers.from_config import gather_to_host

log = logging.getLogger(__name__)

META_FILE = 'samples.json'
GRID_FILE = 'grid.png'
GRID_SIZE = 64
_SHARD = re.compile(r'^samples_(\d+)_(\d+)\.npz$')


def default_out_dir(workdir: str, sampler: str, nfe: int, eps_scale: float) -> str:
  """RUN/samples/<sampler>_nfe<N>_es<lambda>."""
  return os.path.join(workdir, 'samples', f'{sampler}_nfe{nfe}_es{eps_scale:g}')


def shard_name(start: int, end: int) -> str:
  return f'samples_{start:08d}_{end:08d}.npz'


def batch_labels(batch_index: int, batch_size: int, num_classes: int) -> np.ndarray | None:
  """Labels of batch `batch_index`: global image index mod num_classes (balanced classes)."""
  if not num_classes:
    return None
  start = batch_index * batch_size
  return (np.arange(start, start + batch_size) % num_classes).astype(np.int32)


def sample_batches(run: run_lib.Run, num_samples: int, *, sampler: str = 'dpm_solver++',
                   nfe: int = 10, eps_scale: float = 1.0, batch_size: int | None = None,
                   seed: int = 0, batches: list[int] | None = None, **opts: Any
                   ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
  """Yields (batch index, uint8 images, labels or None) for the batches of `num_samples`.

  `batches` restricts the output to those batch indices (e.g. the ones not on disk yet).
  The last batch is cut to `num_samples`. The next batch is dispatched before the current
  one is copied to the host, so the device keeps working while the caller writes.
  """
  fn = run.sample_fn(sampler, nfe, eps_scale, batch_size, **opts)
  batch_size = run.default_batch_size if batch_size is None else int(batch_size)
  num_batches = math.ceil(num_samples / batch_size)
  batches = list(range(num_batches)) if batches is None else list(batches)
  num_classes = int(run.config.model.num_classes)
  root = jax.random.key(seed)

  def finish(index, images, labels):
    count = min(batch_size, num_samples - index * batch_size)
    host = to_uint8(gather_to_host(images)[:count])
    return index, host, None if labels is None else labels[:count]

  pending = None
  for index in batches:
    labels = batch_labels(index, batch_size, num_classes)
    images = fn(jax.random.fold_in(root, index), labels)  # dispatched, not awaited
    if pending is not None:
      yield finish(*pending)
    pending = (index, images, labels)
  if pending is not None:
    yield finish(*pending)


class _Progress:
  """One terminal line per ~10 s: images done, images/s, time left."""

  def __init__(self, total: int, done: int, every_s: float = 10.0):
    self.total, self.done, self.every_s = total, done, every_s
    self._start = self._last = time.perf_counter()
    self._start_done = done

  def update(self, count: int, force: bool = False) -> None:
    self.done += count
    now = time.perf_counter()
    if not force and now - self._last < self.every_s:
      return
    self._last = now
    rate = (self.done - self._start_done) / max(now - self._start, 1e-9)
    left = (self.total - self.done) / max(rate, 1e-9)
    print(f'sample: {self.done}/{self.total} images | {rate:.1f} img/s | '
          f'ETA {int(left) // 60}:{int(left) % 60:02d}', flush=True)


def _check_meta(out_dir: str, meta: dict[str, Any]) -> None:
  """Refuses to mix shards made with other settings; records the settings otherwise."""
  path = os.path.join(out_dir, META_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    # A different count only adds or drops shards; a moved workdir changes no image.
    differ = {k: (old.get(k), v) for k, v in meta.items()
              if k not in ('num_samples', 'workdir') and old.get(k) != v}
    if differ:
      raise config_lib.ConfigError(
          f'{out_dir} holds samples made with other settings '
          f'({", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())}); '
          'choose another config.eval.out_dir or delete that folder')
  if jax.process_index() == 0:
    writing.atomic_write(path, json.dumps(meta, indent=2))


def _plan(num_samples: int, batch_size: int) -> list[tuple[int, int, int]]:
  """(batch index, start, end) of every shard."""
  return [(b, b * batch_size, min((b + 1) * batch_size, num_samples))
          for b in range(math.ceil(num_samples / batch_size))]


def load_samples(out_dir: str) -> tuple[np.ndarray, np.ndarray | None]:
  """(images uint8 (N, H, W, C), labels or None) of a finished `out_dir`, in order."""
  with open(os.path.join(out_dir, META_FILE)) as f:
    meta = json.load(f)
  images, labels = [], []
  for _, start, end in _plan(meta['num_samples'], meta['batch_size']):
    path = os.path.join(out_dir, shard_name(start, end))
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path} is missing: sampling into {out_dir} did not finish')
    with np.load(path) as shard:
      images.append(shard['images'])
      if 'labels' in shard.files:
        labels.append(shard['labels'])
  return np.concatenate(images), (np.concatenate(labels) if labels else None)


def generate(run: run_lib.Run, num_samples: int, *, sampler: str = 'dpm_solver++',
             nfe: int = 10, eps_scale: float = 1.0, batch_size: int | None = None,
             seed: int = 0, out_dir: str | None = None, return_images: bool = True,
             verbose: bool = False, **opts: Any) -> np.ndarray | None:
  """`num_samples` uint8 images (N, H, W, C) from `run`, the same on any device count.

  With `out_dir`, the images also go to disk as shards (see the module doc) with a PNG
  grid of the first 64, and a restart skips the shards already there. Returns the images,
  or None with `return_images=False` (the shards are then the only copy). `opts` are the
  sampler's keyword options; `verbose` prints progress with images/s.
  """
  batch_size = run.default_batch_size if batch_size is None else int(batch_size)
  if num_samples < 1:
    raise ValueError(f'num_samples must be positive, got {num_samples}')
  if out_dir is None:
    if not return_images:
      raise ValueError('return_images=False needs an out_dir')
    progress = _Progress(num_samples, 0) if verbose else None
    parts = []
    for _, images, _ in sample_batches(run, num_samples, sampler=sampler, nfe=nfe,
                                       eps_scale=eps_scale, batch_size=batch_size, seed=seed,
                                       **opts):
      parts.append(images)
      if progress:
        progress.update(len(images), force=len(parts) * batch_size >= num_samples)
    return np.concatenate(parts)

  is_main = jax.process_index() == 0
  os.makedirs(out_dir, exist_ok=True)
  _check_meta(out_dir, {
      'workdir': run.workdir, 'step': run.step, 'weights': run.weights_name,
      'sampler': sampler, 'nfe': int(nfe), 'eps_scale': float(eps_scale),
      'sampler_options': opts, 'seed': int(seed), 'batch_size': batch_size,
      'num_samples': int(num_samples)})
  plan = _plan(num_samples, batch_size)
  wanted = {shard_name(start, end) for _, start, end in plan}
  for name in os.listdir(out_dir):  # shards of an earlier, different num_samples
    if _SHARD.match(name) and name not in wanted and is_main:
      os.remove(os.path.join(out_dir, name))
  todo = np.array([not os.path.isfile(os.path.join(out_dir, shard_name(start, end)))
                   for _, start, end in plan])
  if jax.process_count() > 1:  # every host must run the same batches
    todo = np.asarray(multihost_utils.broadcast_one_to_all(todo))
  batches = [b for (b, _, _), missing in zip(plan, todo) if missing]
  done = sum(end - start for (_, start, end), missing in zip(plan, todo) if not missing)
  if verbose and is_main:
    print(f'sample: {len(plan) - len(batches)} of {len(plan)} shards already in {out_dir}',
          flush=True)
  progress = _Progress(num_samples, done) if verbose and is_main else None
  for index, images, labels in sample_batches(
      run, num_samples, sampler=sampler, nfe=nfe, eps_scale=eps_scale, batch_size=batch_size,
      seed=seed, batches=batches, **opts):
    _, start, end = plan[index]
    if is_main:
      arrays = {'images': images} if labels is None else {'images': images, 'labels': labels}
      with writing.replacing(os.path.join(out_dir, shard_name(start, end))) as tmp:
        np.savez(tmp, **arrays)
    if progress:
      progress.update(len(images), force=index == batches[-1])
  if not is_main:
    return None
  grid = []
  for _, start, end in plan:  # the first 64 images, from as many shards as that takes
    with np.load(os.path.join(out_dir, shard_name(start, end))) as shard:
      grid.append(shard['images'][:GRID_SIZE - sum(len(g) for g in grid)])
    if sum(len(g) for g in grid) >= GRID_SIZE:
      break
  images_lib.save_grid(np.concatenate(grid), os.path.join(out_dir, GRID_FILE))
  return load_samples(out_dir)[0] if return_images else None


def sample_mode(workdir: str, override=None) -> str:
  """`--mode=sample`: `config.eval.num_samples` images with one sampler setting to disk."""
  run = run_lib.open_run(workdir, override, 'sample')
  ev = run.config.eval
  out_dir = ev.out_dir or default_out_dir(run.workdir, ev.sampler, ev.nfe, ev.eps_scale)
  if jax.process_index() == 0:
    print(f'sample: step {run.step} ({run.weights_name}), {ev.sampler} with NFE {ev.nfe}, '
          f'eps_scale {ev.eps_scale:g}, {ev.num_samples} images -> {out_dir}', flush=True)
  generate(run, int(ev.num_samples), sampler=ev.sampler, nfe=int(ev.nfe),
           eps_scale=float(ev.eps_scale), batch_size=int(ev.batch_size), seed=int(ev.seed),
           out_dir=out_dir, return_images=False, verbose=True,
           **eval_settings.options_of(ev, ev.sampler))
  if jax.process_index() == 0:
    print(f'sample: done; grid in {os.path.join(out_dir, GRID_FILE)}', flush=True)
  return out_dir
