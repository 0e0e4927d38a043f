"""Runs side by side: how many workers, which cores each gets, results and errors coming back."""
import os

import jax
import pytest

from atdiff_jax.config import ConfigError
from atdiff_jax import workers as workers_lib


def test_worker_count_is_checked_before_anything_runs():
  cores = len(workers_lib.available_cores())
  assert workers_lib.resolve_workers(0, 'cpu', 1) == min(cores, workers_lib.MAX_AUTO_WORKERS)
  assert workers_lib.resolve_workers(0, 'gpu', 1) == 1
  assert workers_lib.resolve_workers(0, 'cpu', 2) == 1
  assert workers_lib.resolve_workers(0, 'cpu', 1, local_devices=8) == 1  # simulated devices
  if cores >= 2:  # asked for, side by side works with simulated devices too (unpinned)
    assert workers_lib.resolve_workers(2, 'cpu', 1, local_devices=8) == 2
  assert workers_lib.resolve_workers(1, 'tpu', 4) == 1
  with pytest.raises(ConfigError, match=r'--workers=-1: give 0'):
    workers_lib.resolve_workers(-1, 'cpu', 1)
  with pytest.raises(ConfigError, match=r'--workers=2: .* not the gpu backend'):
    workers_lib.resolve_workers(2, 'gpu', 1)
  with pytest.raises(ConfigError, match=r'--workers=2: .* not 4 processes'):
    workers_lib.resolve_workers(2, 'cpu', 4)
  with pytest.raises(ConfigError, match=rf'more than the {cores} CPU cores'):
    workers_lib.resolve_workers(cores + 1, 'cpu', 1)


def test_core_shares_are_disjoint_contiguous_and_even():
  assert workers_lib.core_shares([0, 1, 2, 3, 4], 2) == [(0, 1, 2), (3, 4)]
  assert workers_lib.core_shares([4, 6, 9], 3) == [(4,), (6,), (9,)]
  shares = workers_lib.core_shares(list(range(16)), 3)
  assert [len(s) for s in shares] == [6, 5, 5]
  assert sorted(c for s in shares for c in s) == list(range(16))


@pytest.fixture
def two_shares(monkeypatch):
  """Two pinned workers, as for one-device runs (these jobs run no JAX program); on a
  one-core machine both share it (the pinning is still checked)."""
  cores = workers_lib.available_cores()
  if len(cores) < 2:
    monkeypatch.setattr(workers_lib, 'available_cores', lambda: cores * 2)
  monkeypatch.setattr(workers_lib.WorkerSetup, 'of_this_process', classmethod(
      lambda cls: cls(cpu_devices=1, cache_dir=None, cache_min_compile_s=1.0, pin=True)))
  return workers_lib.core_shares(workers_lib.available_cores(), 2)


def test_only_one_device_workers_are_pinned():
  # Simulated devices meet in collectives that a pinned worker's thread pool may not hold.
  assert workers_lib.WorkerSetup.of_this_process().pin == (jax.local_device_count() == 1)


def test_each_worker_runs_on_its_own_share_of_the_cores(two_shares):
  started, done = [], {}
  # os.sched_getaffinity(0) in a worker: the cores that worker may run on.
  workers_lib.run_jobs(os.sched_getaffinity, [0] * 4, [f'job {i}' for i in range(4)], 2,
                       started.append, done.__setitem__)
  assert sorted(started) == sorted(done) == [0, 1, 2, 3]
  assert all(tuple(sorted(cores)) in two_shares for cores in done.values())


def test_a_workers_error_comes_back_with_its_type_and_stops_the_run(two_shares):
  del two_shares
  done = {}
  with pytest.raises(TypeError) as error:
    workers_lib.run_jobs(os.sched_getaffinity, ['not a pid'], ['bad job'], 2,
                         lambda i: None, done.__setitem__)
  assert done == {}
  assert 'in the worker' in str(error.value.__cause__)  # the worker's traceback comes along


def test_a_worker_that_dies_without_a_word_stops_the_run(two_shares):
  del two_shares
  with pytest.raises(workers_lib.WorkerError,
                     match=r'exited before its runs were done \(exit codes: .*: 3'):
    workers_lib.run_jobs(os._exit, [3, 3], ['dies', 'dies too'], 2, lambda i: None,
                         lambda i, r: None)


def test_an_interrupt_here_stops_every_worker(two_shares):
  del two_shares
  import multiprocessing  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  def interrupt(i):  # Ctrl-C arriving here while job i runs
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    # time.sleep(600) in a worker: only the SIGTERM that the stop sends ends it early.
    workers_lib.run_jobs(time.sleep, [600, 600], ['sleeps', 'sleeps too'], 2, interrupt,
                         lambda i, r: None)
  assert multiprocessing.active_children() == []


def test_sigterm_here_takes_the_interrupt_path_and_leaves_the_handler_as_it_was(two_shares):
  del two_shares
  import multiprocessing  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(KeyboardInterrupt):  # a scheduler stopping the experiment process
    workers_lib.run_jobs(time.sleep, [600], ['sleeps'], 2,
                         lambda i: os.kill(os.getpid(), signal.SIGTERM), lambda i, r: None)
  assert multiprocessing.active_children() == []
  assert signal.getsignal(signal.SIGTERM) is before
