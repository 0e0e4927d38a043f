"""The host training loop: set-up, resume, log, checkpoint, sample, stop cleanly.

Only this file touches the host: the step itself (train_step.py) is one compiled program,
and the loop pulls metrics to the host once per log interval. Steps run asynchronously in
between; the state's guard (the first minibatch that must stop the run) is read before
every save and at every log and sample point, so no checkpoint holds a state past it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from atdiff_jax import checkpoint, config as config_lib, data, images, parallel
from atdiff_jax.samplers import from_config
from atdiff_jax.config import minibatches_per_call, updates_per_minibatch
from atdiff_jax.objectives import check_frozen_sources
from atdiff_jax.train_state import STOP_DIVERGED
from atdiff_jax.parallel import make_mesh
from atdiff_jax.train_step import (TrainParts, abstract_state, all_finite, create_train_state,
                                   make_train_step, num_params)

log = logging.getLogger(__name__)


class StopRequest:
  """SIGTERM / SIGINT (Ctrl-C) ask the loop to checkpoint and exit at the next step.

  A second Ctrl-C interrupts at once (the last checkpoint on disk is kept).
  """

  def __init__(self):
    self.requested = False
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    log.warning('%s received: saving a checkpoint and stopping.', signal.Signals(signum).name)

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@dataclasses.dataclass
class _Progress:
  """Throughput and ETA over the last log interval."""
  start_step: int
  total_steps: int
  images_per_step: int
  updates_per_step: int
  _last_time: float = dataclasses.field(default_factory=time.perf_counter)
  _last_step: int = 0

  def __post_init__(self):
    self._last_step = self.start_step

  def tick(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    elapsed = max(now - self._last_time, 1e-9)
    steps = step - self._last_step
    self._last_time, self._last_step = now, step
    steps_per_s = steps / elapsed
    return {
        'images_per_s': steps_per_s * self.images_per_step,
        'updates_per_s': steps_per_s * self.updates_per_step,
        'eta_s': (self.total_steps - step) / max(steps_per_s, 1e-9),
    }


def _format_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def call_sizes(training: ml_collections.ConfigDict, per_call: int):
  """`size(step)`: how many minibatches the call starting at minibatch `step` runs:
  `per_call`, or fewer to stop at the next point where the loop logs, saves, samples,
  profiles or ends, so those see the state of exactly that minibatch."""
  periods = [p for p in (training.log_every, training.checkpoint_every,
                         training.sample_every) if p]
  first, count = (int(v) for v in training.get('profile', (0, 0)))
  marks = {int(training.num_steps)} | ({first, first + count} if count else set())

  def size(step: int) -> int:
    ahead = [p - step % p for p in periods] + [m - step for m in marks if m > step]
    return max(1, min([per_call] + ahead))

  return size


def _fetch_mean(metrics: list[dict[str, jax.Array]]) -> tuple[dict[str, float], list[dict]]:
  """One host transfer per log interval for all buffered step metrics: their means (and
  the number of updates skipped as non-finite) and the host copies, one per minibatch
  (a call over several minibatches gives each metric a leading axis)."""
  stacked = []
  for metrics_of_call in jax.device_get(metrics):
    if np.ndim(metrics_of_call['loss']):
      stacked += [{k: v[i] for k, v in metrics_of_call.items()}
                  for i in range(len(metrics_of_call['loss']))]
    else:
      stacked.append(metrics_of_call)
  means = {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0] if k != 'nonfinite'}
  means['skipped_updates'] = int(sum(m['nonfinite'] for m in stacked))
  return means, stacked


class StopError(RuntimeError):
  """The run stopped itself to keep its checkpoints good (exit code 3); the message names
  the minibatch and the last good checkpoint, kept as it was."""


class NonFiniteError(StopError):
  """Too many minibatches in a row had a non-finite loss or gradient
  (training.stop_after_nonfinite), or the state to save holds a non-finite value."""


class DivergedError(StopError):
  """An update far larger than the params (training.max_update_ratio): finite, diverging."""


def _check_guard(state, ckpt: checkpoint.Checkpointer, training) -> None:
  """Raises the stop that the step's guard recorded, if any. Reads four scalars, a host
  sync: only where the loop logs, saves or samples."""
  guard = jax.device_get(state.guard)
  stop_at = int(guard.stop_at)
  if not stop_at:
    return
  ckpt.wait()  # a save in flight holds a state from before the stop: it counts as kept
  last = ckpt.latest_step()
  kept = f'step {last}' if last is not None else 'none'
  if int(guard.stop_reason) == STOP_DIVERGED:
    raise DivergedError(
        f'stopped at minibatch {stop_at}: the run diverged: the norm of its update over the '
        f'norm of the params was {float(guard.update_ratio):.3g} (training.max_update_ratio='
        f'{training.max_update_ratio}). Nothing after minibatch {stop_at - 1} was saved; '
        f'the last good checkpoint is {kept}, kept as it was. Resume from it with a lower '
        '--config.training.lr.')
  raise NonFiniteError(
      f'stopped at minibatch {stop_at}: {training.stop_after_nonfinite} minibatches in a row '
      'had a non-finite loss or gradient, their updates skipped '
      f'(training.stop_after_nonfinite={training.stop_after_nonfinite}); the last checkpoint '
      f'is {kept}, kept as it was. Lower training.lr, check the data, or raise the limit.')


def _warn_skipped(stacked: list[dict], first_step: int) -> None:
  """Says how many minibatches of a log interval had updates skipped as non-finite."""
  skipped = sum(bool(metrics['nonfinite']) for metrics in stacked)
  if skipped:
    log.warning('%d of the %d minibatches %d..%d had updates skipped: non-finite loss or '
                'gradient.', skipped, len(stacked), first_step + 1, first_step + len(stacked))


class _Writer:
  """TensorBoard scalars from process 0 only."""

  def __init__(self, workdir: str):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._writer:
      for key, value in values.items():
        self._writer.add_scalar(key, value, step)
      self._writer.flush()

  def close(self) -> None:
    if self._writer:
      self._writer.close()


def _initial_state(config, mesh, parts: TrainParts, ckpt: checkpoint.Checkpointer):
  """Resume from the workdir's latest checkpoint, else initialise, taking the weights of
  config.init_from (or the objective's default source, e.g. a distillation teacher)."""
  tx, objective = parts.tx, parts.objective
  abstract = abstract_state(config, parts)
  replicated = parallel.replicated(mesh)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
  if ckpt.latest_step() is not None:
    state, step = ckpt.restore_newest_intact(abstract)
    log.info('Resuming from %s/%d', ckpt.directory, step)
    return state
  source = config.init_from or objective.default_init_from
  if source:  # read first: weights that do not fit fail before anything compiles
    field = 'init_from' if config.init_from else 'teacher'
    try:
      params, ema = checkpoint.restore_weights(source, abstract.params, abstract.ema_params)
    except checkpoint.CheckpointError as e:
      raise checkpoint.CheckpointError(f'config.{field}={source!r}: {e}') from e
  state = create_train_state(config, mesh, parts)
  if source:
    if objective.init_params_from == 'ema':  # a copy: donated buffers must not be shared
      params = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree),
                       out_shardings=replicated)(ema[0])
    log.info('Params (%s) and EMA from %s; fresh optimizer state.',
             'its EMA' if objective.init_params_from == 'ema' else 'its params', source)
    state = state.replace(
        params=params, ema_params=ema,
        opt_state=jax.jit(tx.init, out_shardings=replicated)(params),
        objective_state=jax.jit(objective.init_state, out_shardings=replicated)(params))
  return state


def train(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Trains until config.training.num_steps minibatches; returns the final state."""
  mesh = make_mesh()
  # The eval block too (validate_eval_choices): a typo there must not cost a training run.
  config_lib.validate_training(config, jax.device_count(), jax.process_count())
  checkpoint.check_resume(config, workdir)  # a resume as another run stops here
  source = data.create_source(config.data)  # bad data stops here, before any compile
  config_lib.validate_source(config, source)
  is_main = jax.process_index() == 0
  make_workdir(workdir)
  check_frozen_sources(config)  # a missing or mismatched teacher stops here
  ckpt = checkpoint.Checkpointer(workdir, config.training.keep_checkpoints)
  writer = profiler = None
  try:
    ckpt.check_resumable()  # checkpoints that all fail are named before anything is built
    if config.init_from and ckpt.latest_step() is None:
      _check_init_from(config)
    parts = TrainParts.build(config)  # the one network, optimizer and objective of the run
    frozen = parts.objective.load_frozen(mesh)
    state = _initial_state(config, mesh, parts, ckpt)
    if is_main:  # only now: a command that fails leaves the run's config.json as it was
      checkpoint.save_config(workdir, config)
    start_step = int(state.step)
    log.info('Model: %s parameters; %d devices, %d processes; starting at minibatch %d.',
             f'{num_params(state.params):,}', jax.device_count(), jax.process_count(),
             start_step)

    train_step = make_train_step(config, mesh, parts)
    preview_fn = from_config.make_preview_fn(config, mesh, parts.model)
    training = config.training
    progress = _Progress(start_step, training.num_steps, training.batch_size,
                         updates_per_minibatch(config))
    writer = _Writer(workdir)
    buffered: list[dict[str, jax.Array]] = []
    step = start_step
    per_call = minibatches_per_call(config)
    chunk_size = None if per_call == 1 else call_sizes(training, per_call)
    stream = data.BatchStream(source, training.batch_size, config.seed, mesh,
                              start_step=start_step, random_flip=config.data.random_flip,
                              chunk_size=chunk_size)
    profiler = _Profiler(training.get('profile', (0, 0)), workdir, is_main)
    with StopRequest() as stop, stream:
      while step < training.num_steps:
        profiler.before(step, state)
        state, metrics = train_step(state, next(stream), frozen)
        count = 1 if chunk_size is None else chunk_size(step)
        profiler.after(step + count, state)
        buffered.append(metrics)
        step += count
        ckpt.check()  # a failed save stops the run now, not at the next save
        if step % training.log_every == 0 or step == training.num_steps:
          values, stacked = _fetch_mean(buffered)
          values |= progress.tick(step)
          _warn_skipped(stacked, step - len(stacked))
          buffered = []
          writer.scalars(step, values)
          if is_main:
            adversarial_keys = ('clean_loss', 'delta_over_radius', 'grad_delta_norm')
            extra = ''.join(f' | {k} {values[k]:.4f}' for k in adversarial_keys
                            if 'delta_over_radius' in values)
            if values['skipped_updates']:
              extra += f' | skipped updates {values["skipped_updates"]}'
            print(f'step {step}/{training.num_steps} (updates {int(state.opt_step)}) | '
                  f'loss {values["loss"]:.4f}{extra} | '
                  f'{values["images_per_s"]:.0f} img/s | '
                  f'{values["updates_per_s"]:.1f} updates/s | '
                  f'ETA {_format_eta(values["eta_s"])}', flush=True)
          _check_guard(state, ckpt, training)  # the fetch above waited for the steps
        preempted = stop.requested or (jax.process_count() > 1
                                       and ckpt.reached_preemption(step))
        if step % training.checkpoint_every == 0 or preempted:
          save_checkpoint(ckpt, step, state, training)
        if preempted:
          ckpt.wait()
          log.warning('Stopped at minibatch %d; run the same command to resume.', step)
          return state
        if training.sample_every and step % training.sample_every == 0:
          _check_guard(state, ckpt, training)
          _write_samples(preview_fn, state, config, workdir, step, is_main)
    if ckpt.latest_step() != step:
      save_checkpoint(ckpt, step, state, training)
    ckpt.wait()  # the last save's failure is this run's
    return state
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()
    if profiler is not None:
      profiler.close()


class _Profiler:
  """A jax.profiler trace of minibatches [first, first + count) (training.profile) into
  WORKDIR/profile: the device work of exactly those steps, waited for at both ends."""

  def __init__(self, window, workdir: str, is_main: bool):
    self.first, count = (int(v) for v in window)
    self.last = self.first + count
    self.directory = os.path.join(workdir, 'profile')
    self.active = False
    self.enabled = count > 0 and is_main

  def before(self, step: int, state) -> None:
    if self.enabled and step == self.first and not self.active:
      jax.block_until_ready(state)  # earlier steps' device work stays out of the trace
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step >= self.last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      print(f'profile: minibatches {self.first}-{self.last - 1} -> {self.directory} '
            f'(tensorboard --logdir {self.directory})', flush=True)

  def close(self) -> None:
    """Ends a trace that the run left open (a stop inside the window)."""
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def _check_init_from(config: ml_collections.ConfigDict) -> None:
  """config.init_from is a run with a checkpoint and this config's network: one line,
  before anything is built or compiled."""
  if os.path.isfile(os.path.join(config.init_from, checkpoint.CONFIG_FILE)):
    checkpoint.check_same_network(config, config.init_from, 'init_from',
                                  'fine-tuning starts from its weights, so the networks and '
                                  'noise processes must match')
  try:
    checkpoint.usable_checkpoint(config.init_from)
  except checkpoint.CheckpointError as e:
    raise checkpoint.CheckpointError(f'config.init_from={config.init_from!r}: {e}') from e


def make_workdir(workdir: str) -> None:
  """Creates the run's folder, or says in one line why it cannot be one."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise config_lib.ConfigError(f'--workdir={workdir!r}: cannot be a folder here: '
                                 f'{e.strerror} ({e.filename})') from None


_all_finite = jax.jit(all_finite)


def save_checkpoint(ckpt: checkpoint.Checkpointer, step: int, state, training) -> None:
  """Saves `state` unless the guard stopped the run at or before `step`, or a value of it
  is not finite: a checkpoint is always usable."""
  _check_guard(state, ckpt, training)
  if not bool(_all_finite(state)):
    raise NonFiniteError(f'the train state at minibatch {step} holds non-finite values; it '
                         f'was not saved (the last checkpoint, step {ckpt.latest_step()}, is '
                         'kept)')
  ckpt.save(step, state)


def _write_samples(preview_fn, state, config, workdir, step, is_main) -> None:
  start = time.perf_counter()
  samples = preview_fn(state.ema_params[0], jax.random.key(config.seed + step))
  samples = from_config.gather_to_host(samples)
  if is_main:
    path = images.save_grid(samples, os.path.join(workdir, 'samples', f'step_{step:08d}.png'))
    print(f'samples: {path} ({time.perf_counter() - start:.1f} s)', flush=True)
