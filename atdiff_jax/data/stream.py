"""BatchStream: sharded global batches, loaded ahead of time in a background thread."""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from atdiff_jax import parallel
from atdiff_jax.data.batching import load_host_batch, process_batch_slice, steps_per_epoch

log = logging.getLogger(__name__)
_POLL_SECONDS = 0.1  # how often a blocked loader checks for close()


@jax.jit
def _to_model_range(images: jax.Array) -> jax.Array:
  """uint8 0..255 -> float32 [-1, 1]; done on device so only bytes cross the bus."""
  # XLA turns the division into a multiply by 1/127.5, which lands 255 a hair above 1.
  return jnp.clip(images.astype(jnp.float32) / 127.5 - 1.0, -1.0, 1.0)


class _Failure:
  """Carries an exception from the loader thread to the consumer."""

  def __init__(self, error: BaseException, step: int):
    self.error, self.step = error, step


def _check_rows_match_sharding(sharding: NamedSharding, global_batch_size: int,
                               rows: slice) -> None:
  """This process must own exactly the batch rows it loads."""
  owned = set()
  for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
    owned.update(range(*index[0].indices(global_batch_size)))
  if owned != set(range(rows.start, rows.stop)):
    held = f'{min(owned)}..{max(owned)}' if owned else 'no'
    raise ValueError(
        f'the mesh puts batch rows {held} on process {jax.process_index()}, which loads '
        f"rows {rows.start}..{rows.stop - 1}; order the mesh devices by process along "
        "the 'data' axis")


class BatchStream:
  """Endless iterator over sharded global batches, starting at `start_step`.

  Yields dict(image=float32 (B, H, W, C) in [-1, 1], label=int32 (B,)), both
  sharded over the mesh's 'data' axis (parallel.batch_sharding). `step` is the index of the next batch.
  Batch `k` depends only on (seed, k), so resuming at step k is exact.

  With `chunk_size` (a function of the next batch's index), each item instead holds the
  next `chunk_size(step)` batches stacked on a leading axis (parallel.stacked_batch_sharding),
  for a train step that runs several minibatches per compiled call; `step` then moves by
  the chunk. The chunks are stacked in the loader thread, not by the caller.
  """

  def __init__(self, source, global_batch_size: int, seed: int, mesh: Mesh,
               start_step: int = 0, random_flip: bool = True, prefetch: int = 2,
               chunk_size: Callable[[int], int] | None = None):
    data_size = parallel.num_shards(mesh)
    if global_batch_size % data_size:
      raise ValueError(f'global batch size {global_batch_size} is not divisible by the '
                       f'{data_size} devices of mesh axis {parallel.AXIS!r}')
    steps_per_epoch(len(source), global_batch_size)  # validates batch vs. data set
    if seed < 0 or start_step < 0 or prefetch < 1:
      raise ValueError(f'need seed >= 0, start_step >= 0, prefetch >= 1; got '
                       f'{seed}, {start_step}, {prefetch}')
    self.source = source
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.random_flip = random_flip
    self.sharding = parallel.batch_sharding(mesh)
    self._stacked_sharding = parallel.stacked_batch_sharding(mesh)
    self._chunk_size = chunk_size
    self._rows = process_batch_slice(global_batch_size, jax.process_index(),
                                     jax.process_count())
    _check_rows_match_sharding(self.sharding, global_batch_size, self._rows)
    self.step = start_step
    self.images_loaded = 0  # by this process (prefetched batches included)
    self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
    self._stop = threading.Event()
    self._failure: _Failure | None = None
    self._thread = threading.Thread(target=self._produce, args=(start_step,),
                                    name='BatchStream-loader', daemon=True)
    self._thread.start()

  # ---------------------------------------------------------------- loader side

  def _device_batch(self, step: int) -> tuple[int, dict[str, jax.Array]]:
    """(how many batches, the device batch) starting at batch `step`."""
    if self._chunk_size is None:
      images, labels = self.host_batch(step)
      count, sharding, lead = 1, self.sharding, ()
    else:
      count = self._chunk_size(step)
      loaded = [self.host_batch(s) for s in range(step, step + count)]
      images = np.stack([images for images, _ in loaded])
      labels = np.stack([labels for _, labels in loaded])
      sharding, lead = self._stacked_sharding, (count,)
    self.images_loaded += images.size // np.prod(images.shape[-3:])
    batch = self.global_batch_size
    images = jax.make_array_from_process_local_data(
        sharding, images, (*lead, batch, *images.shape[-3:]))
    labels = jax.make_array_from_process_local_data(sharding, labels, (*lead, batch))
    return count, {'image': _to_model_range(images), 'label': labels}

  def _put(self, item: Any) -> bool:
    """Blocks until there is room or close() is called; False when closed."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=_POLL_SECONDS)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self, step: int) -> None:
    try:
      while not self._stop.is_set():
        count, batch = self._device_batch(step)
        if not self._put((step, count, batch)):
          return
        step += count
    except BaseException as e:  # pylint: disable=broad-except
      self._put(_Failure(e, step))

  # -------------------------------------------------------------- consumer side

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._failure is None and self._stop.is_set():
      raise RuntimeError('BatchStream is closed')
    while self._failure is None:
      try:
        item = self._queue.get(timeout=_POLL_SECONDS)
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          raise RuntimeError('BatchStream loader thread stopped unexpectedly') from None
        continue
      if isinstance(item, _Failure):
        self._failure = item
        break
      step, count, batch = item
      assert step == self.step, (step, self.step)
      self.step += count
      return batch
    self.close()
    raise RuntimeError(f'loading batch {self._failure.step} failed: '
                       f'{type(self._failure.error).__name__}: {self._failure.error}'
                       ) from self._failure.error

  def host_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's uint8 images and labels of batch `step` (for inspection)."""
    return load_host_batch(
        self.source, self.global_batch_size, self.seed, step,
        process_index=jax.process_index(), process_count=jax.process_count(),
        random_flip=self.random_flip)

  def close(self) -> None:
    """Stops the loader thread and drops prefetched batches; idempotent."""
    closed_before = self._stop.is_set()
    self._stop.set()
    while True:  # unblock a loader waiting on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    if self._thread is not threading.current_thread():
      self._thread.join()
    if closed_before:
      return
    # Every process says what it read: its own rows of each global batch, nothing else.
    log.info('Process %d/%d loaded %d images: rows %d:%d of each global batch of %d.',
             jax.process_index(), jax.process_count(), self.images_loaded, self._rows.start,
             self._rows.stop, self.global_batch_size)

  def __enter__(self) -> 'BatchStream':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
