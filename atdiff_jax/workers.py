"""Jobs side by side: worker processes, each pinned to its own share of the CPU cores.

A small model uses a CPU's cores poorly: on 2 cores the quickstart's train step is only
1.2-1.4x faster than on one, so two runs, one per core, do 1.5-1.7x the work of one process
on both (`python -m atdiff_jax.bench --what=side_by_side`, docs/benchmark.md). `run_jobs`
hands a list of independent jobs (an experiment's runs) to worker processes (spawned: each
starts its own JAX), each pinned to its share of this process's cores; they take the jobs in
order, and each result comes back as soon as it is done. Workers of a process with several
simulated CPU devices are not pinned (see WorkerSetup.pin).

Only for one process on the CPU backend: a GPU or TPU runs one job at a time here, and a
multi-host run is one program over all its hosts.

Stopping: Ctrl-C (or SIGTERM to this process) reaches every worker; a training saves a
checkpoint and stops, so the same command resumes it, and no further job starts.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import time
import traceback
from typing import Any, Callable, Sequence

from atdiff_jax.config import ConfigError

# The default ceiling: each worker holds its own JAX, programs and data (about 1.3 GB for
# the quickstart), and past a few workers a run's own threads use the cores as well.
MAX_AUTO_WORKERS = 8
_POLL_S = 1.0
# How long stopped workers get to save their checkpoints before they are ended.
STOP_GRACE_S = 120.0


class WorkerError(RuntimeError):
  """A worker died without reporting (killed, out of memory), or its error could not be
  sent back as it was."""


def available_cores() -> list[int]:
  return sorted(os.sched_getaffinity(0))


def resolve_workers(requested: int, backend: str, process_count: int,
                    local_devices: int = 1) -> int:
  """How many workers: `requested`, or with 0 one per core where a run is one process on
  one CPU device (at most MAX_AUTO_WORKERS), else 1: several (simulated) CPU devices
  already spread a run over the cores, unpinned. A number that cannot work is a
  ConfigError."""
  cores = len(available_cores())
  single_cpu = backend == 'cpu' and process_count == 1
  if requested < 0:
    raise ConfigError(f'--workers={requested}: give 0 (one per CPU core) or a positive count')
  if requested == 0:
    return min(cores, MAX_AUTO_WORKERS) if single_cpu and local_devices == 1 else 1
  if requested > 1 and not single_cpu:
    where = (f'{process_count} processes' if process_count > 1 else
             f'the {backend} backend')
    raise ConfigError(f'--workers={requested}: runs side by side need one process on the CPU '
                      f'backend, not {where}; use --workers=1')
  if requested > cores:
    raise ConfigError(f'--workers={requested}: more than the {cores} CPU cores this process '
                      'may use')
  return requested


def core_shares(cores: Sequence[int], workers: int) -> list[tuple[int, ...]]:
  """`cores` cut into `workers` contiguous, disjoint shares that differ by at most one."""
  base, extra = divmod(len(cores), workers)
  shares, start = [], 0
  for w in range(workers):
    size = base + (w < extra)
    shares.append(tuple(cores[start:start + size]))
    start += size
  return shares


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
  """What a worker's JAX must share with this process's: the CPU device count (tests
  simulate several) and the persistent compilation cache; and whether to pin it."""
  cpu_devices: int
  cache_dir: str | None
  cache_min_compile_s: float
  # Only a one-device worker is pinned: simulated devices meet in collectives, and on too few
  # cores XLA's CPU thread pool cannot hold them all at once (the step deadlocks).
  pin: bool = True

  @classmethod
  def of_this_process(cls) -> WorkerSetup:
    import jax  # pylint: disable=g-import-not-at-top
    devices = jax.local_device_count()
    return cls(devices, jax.config.jax_compilation_cache_dir,
               float(jax.config.jax_persistent_cache_min_compile_time_secs), pin=devices == 1)

  def apply(self) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', self.cpu_devices)
    if self.cache_dir:
      jax.config.update('jax_compilation_cache_dir', self.cache_dir)
      jax.config.update('jax_persistent_cache_min_compile_time_secs',
                        self.cache_min_compile_s)


def run_jobs(fn: Callable[[Any], Any], jobs: Sequence[Any], labels: Sequence[str],
             workers: int, on_start: Callable[[int], None],
             on_done: Callable[[int, Any], None], one_each: bool = False) -> None:
  """fn(job) for every job, in `workers` processes; on_start(i) and on_done(i, result) run
  here as job i starts and ends. The workers take the jobs in order, or with `one_each`
  worker w runs job w (as many jobs as workers, all at once). `fn` and the jobs must pickle
  (module-level function, plain data). The first error (or an interrupt) stops the other
  workers, which checkpoint a training first, and is raised here once they have exited."""
  if one_each and len(jobs) != workers:
    raise ValueError(f'one_each: {len(jobs)} jobs for {workers} workers')
  context = multiprocessing.get_context('spawn')
  queues = [context.Queue() for _ in range(workers if one_each else 1)]
  reports = context.Queue()
  for i, (label, job) in enumerate(zip(labels, jobs)):
    queues[i % len(queues)].put((i, label, job))
  for w in range(workers):
    queues[w % len(queues)].put(None)  # one end mark per worker
  setup = WorkerSetup.of_this_process()
  processes = [context.Process(target=_work, name=f'worker{w}', daemon=True,
                               args=(w, share, setup, fn, queues[w % len(queues)], reports))
               for w, share in enumerate(core_shares(available_cores(), workers))]
  for process in processes:
    process.start()
  left, error = len(jobs), None
  previous = _sigterm_as_interrupt()
  try:
    while left and error is None:
      try:
        kind, i, payload = reports.get(timeout=_POLL_S)
      except queue.Empty:
        dead = [p for p in processes if p.exitcode not in (None, 0)]
        if dead or not any(p.is_alive() for p in processes):
          codes = ', '.join(f'{p.name}: {p.exitcode}' for p in processes)
          error = WorkerError(f'a worker exited before its runs were done (exit codes: '
                              f'{codes}); run the same command to resume')
        continue
      if kind == 'start':
        on_start(i)
      elif kind == 'done':
        left -= 1
        on_done(i, payload)
      else:
        error, trace = payload
        if trace:
          error.__cause__ = WorkerError(f'in the worker:\n{trace}')
  except KeyboardInterrupt as e:
    error = e
  finally:
    _stop(processes, signal_them=error is not None or left > 0)
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  if error is not None:
    raise error


def _sigterm_as_interrupt():
  """SIGTERM to this process (a scheduler's stop) takes the Ctrl-C path, which stops the
  workers gently; returns the handler it replaced (None off the main thread)."""
  def interrupt(signum, frame):
    del signum, frame
    raise KeyboardInterrupt
  try:
    return signal.signal(signal.SIGTERM, interrupt)
  except ValueError:  # not the main thread: signals stay as they are
    return None


def _stop(processes, signal_them: bool) -> None:
  """Waits for the workers: done ones leave at their end marks; with `signal_them`, each
  still running gets SIGTERM first (a training checkpoints and stops). At most STOP_GRACE_S
  (a worker stuck in a compiled program never sees the signal) or until a second Ctrl-C;
  then the rest are ended outright."""
  if signal_them:
    for process in processes:
      if process.is_alive():
        os.kill(process.pid, signal.SIGTERM)
  deadline = time.monotonic() + STOP_GRACE_S
  try:
    for process in processes:
      process.join(max(0.0, deadline - time.monotonic()))
  finally:
    for process in processes:
      if process.is_alive():
        process.kill()
        process.join()


def _work(index: int, share: tuple[int, ...], setup: WorkerSetup, fn, todo, reports) -> None:
  """A worker: pinned to `share` before its JAX starts, then job after job until the end
  mark, an error, or its parent is gone."""
  if setup.pin:
    os.sched_setaffinity(0, share)
  setup.apply()
  from atdiff_jax import command_line  # pylint: disable=g-import-not-at-top
  parent = os.getppid()
  while True:
    try:
      item = todo.get(timeout=_POLL_S)
    except queue.Empty:
      if os.getppid() != parent:  # the experiment process died: nobody reads results
        return
      continue
    except KeyboardInterrupt:
      return
    if item is None:
      return
    i, label, job = item
    command_line.setup_logging(f'[{label}]')  # which run wrote a line, when runs interleave
    sys.stdout = _TaggedLines(sys.__stdout__, f'[{label}]')
    reports.put(('start', i, index))
    try:
      result = fn(job)
    except BaseException as e:  # pylint: disable=broad-except
      trace = '' if isinstance(e, (ConfigError, KeyboardInterrupt)) else ''.join(
          traceback.format_exception(e))
      reports.put(('error', i, (_sendable(e), trace)))
      return
    reports.put(('done', i, result))


class _TaggedLines:
  """A text stream that leads every line with `tag` (progress lines are printed)."""

  def __init__(self, stream, tag: str):
    self._stream, self._tag, self._line_start = stream, tag + ' ', True

  def write(self, text: str) -> int:
    pieces = []
    for piece in text.splitlines(keepends=True):
      if self._line_start:
        pieces.append(self._tag)
      pieces.append(piece)
      self._line_start = piece.endswith('\n')
    self._stream.write(''.join(pieces))
    return len(text)

  def flush(self) -> None:
    self._stream.flush()

  def __getattr__(self, name: str):
    return getattr(self._stream, name)


def _sendable(error: BaseException) -> BaseException:
  """`error` itself where it pickles (an input error keeps its type and its one line), else
  a WorkerError that names it."""
  try:
    pickle.loads(pickle.dumps(error))
    return error
  except Exception:  # pylint: disable=broad-except
    return WorkerError(f'{type(error).__name__}: {error}')
