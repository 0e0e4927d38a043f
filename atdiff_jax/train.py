"""The host training loop: set-up, resume, log, checkpoint, sample, stop cleanly.

Only this file touches the host: the step itself (train_step.py) is one compiled program,
and the loop pulls metrics to the host once per log interval.
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
from jax.sharding import NamedSharding, PartitionSpec as P

from atdiff_jax import checkpoint, config as config_lib, data, images, sampling
from atdiff_jax.methods import check_frozen_sources, get_objective
from atdiff_jax.models import create_model
from atdiff_jax.train_state import make_optimizer
from atdiff_jax.train_step import (create_train_state, make_init_fn, make_mesh,
                                   make_train_step, num_params, updates_per_minibatch)

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


def _fetch_mean(metrics: list[dict[str, jax.Array]]) -> dict[str, float]:
  """One host transfer per log interval for all buffered step metrics."""
  stacked = jax.device_get(metrics)
  return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


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


def _initial_state(config, mesh, model, tx, ckpt: checkpoint.Checkpointer, objective=None):
  """Resume from the workdir's latest checkpoint, else initialise, taking the weights of
  config.init_from (or the objective's default source, e.g. a distillation teacher)."""
  objective = get_objective(config, model) if objective is None else objective
  abstract = jax.eval_shape(make_init_fn(config, model, tx, objective), jax.random.key(0))
  replicated = NamedSharding(mesh, P())
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
  latest = ckpt.latest_step()
  if latest is not None:
    log.info('Resuming from %s/%d', ckpt.directory, latest)
    return ckpt.restore(abstract, latest)
  state = create_train_state(config, mesh, model, tx)
  source = config.init_from or objective.default_init_from
  if source:
    if config.init_from and os.path.isdir(source):
      checkpoint.check_same_network(config, source, 'init_from',
                                    'fine-tuning starts from its weights, so the networks '
                                    'and noise processes must match')
    params, ema = checkpoint.restore_weights(source, abstract.params, abstract.ema_params)
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
  config_lib.validate_training(config, jax.device_count(), jax.process_count())
  source = data.create_source(config.data)  # bad data stops here, before any compile
  config_lib.validate_source(config, source)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    checkpoint.save_config(workdir, config)

  check_frozen_sources(config)  # a missing or mismatched teacher stops here
  model, tx = create_model(config), make_optimizer(config.training)
  objective = get_objective(config, model)
  frozen = objective.load_frozen(mesh)
  ckpt = checkpoint.Checkpointer(workdir, config.training.keep_checkpoints)
  state = _initial_state(config, mesh, model, tx, ckpt, objective)
  start_step = int(state.step)
  log.info('Model: %s parameters; %d devices, %d processes; starting at minibatch %d.',
           f'{num_params(state.params):,}', jax.device_count(), jax.process_count(),
           start_step)

  train_step = make_train_step(config, mesh, model, tx, objective)
  grid_sampler = sampling.make_grid_sampler(config, mesh, model)
  training = config.training
  progress = _Progress(start_step, training.num_steps, training.batch_size,
                       updates_per_minibatch(config))
  writer = _Writer(workdir)
  buffered: list[dict[str, jax.Array]] = []
  step = start_step
  stream = data.BatchStream(source, training.batch_size, config.seed, mesh,
                            start_step=start_step, random_flip=config.data.random_flip)
  try:
    with StopRequest() as stop, stream:
      while step < training.num_steps:
        state, metrics = train_step(state, next(stream), frozen)
        buffered.append(metrics)
        step += 1
        if step % training.log_every == 0 or step == training.num_steps:
          values = _fetch_mean(buffered) | progress.tick(step)
          buffered = []
          writer.scalars(step, values)
          if is_main:
            adversarial_keys = ('clean_loss', 'delta_over_radius', 'grad_delta_norm')
            extra = ''.join(f' | {k} {values[k]:.4f}' for k in adversarial_keys
                            if 'delta_over_radius' in values)
            print(f'step {step}/{training.num_steps} (updates {int(state.opt_step)}) | '
                  f'loss {values["loss"]:.4f}{extra} | '
                  f'{values["images_per_s"]:.0f} img/s | '
                  f'{values["updates_per_s"]:.1f} updates/s | '
                  f'ETA {_format_eta(values["eta_s"])}', flush=True)
        preempted = stop.requested or (jax.process_count() > 1
                                       and ckpt.reached_preemption(step))
        if step % training.checkpoint_every == 0 or preempted:
          ckpt.save(step, state)
        if preempted:
          log.warning('Stopped at minibatch %d; run the same command to resume.', step)
          return state
        if training.sample_every and step % training.sample_every == 0:
          _write_samples(grid_sampler, state, config, workdir, step, is_main)
    if ckpt.latest_step() != step:
      ckpt.save(step, state)
    return state
  finally:
    ckpt.close()
    writer.close()


def _write_samples(grid_sampler, state, config, workdir, step, is_main) -> None:
  start = time.perf_counter()
  samples = grid_sampler(state.ema_params[0], jax.random.key(config.seed + step))
  samples = sampling.gather_to_host(samples)
  if is_main:
    path = images.save_grid(samples, os.path.join(workdir, 'samples', f'step_{step:08d}.png'))
    print(f'samples: {path} ({time.perf_counter() - start:.1f} s)', flush=True)
