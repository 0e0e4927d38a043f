"""Checkpoints with Orbax: resume a run exactly, or start a new run from another's weights.

A run's workdir holds `checkpoints/<step>/` (the whole TrainState, written asynchronously
and atomically by Orbax's CheckpointManager) and `config.json`. Nothing here deletes or
overwrites a checkpoint that the current run did not write: resume picks up the newest
step that restores (one that does not is moved to `checkpoints_unreadable/`) and only ever
adds later ones; `init_from` and a distillation teacher are opened read-only.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from atdiff_jax import config as config_lib
from atdiff_jax import writing

log = logging.getLogger(__name__)

CHECKPOINT_DIR = 'checkpoints'
UNREADABLE_SUFFIX = '_unreadable'  # checkpoints that do not restore go to checkpoints_unreadable/
CONFIG_FILE = 'config.json'
# Orbax writes step N into N.orbax-checkpoint-tmp and renames it to N once complete: such a
# folder at start is a save that never finished (kill -9, a full disk), never a checkpoint.
PARTIAL_MARK = '.orbax-checkpoint-tmp'
_ITEM = 'default'  # where CheckpointManager puts a step's single unnamed item
# Train-state fields renamed since checkpoints were first written: new name -> old name.
_RENAMED_FIELDS = {'objective_state': 'sampler_state'}
# Train-state fields added since: a checkpoint without one restores it as zeros, its value
# at initialisation.
_ADDED_FIELDS = ('guard',)


class CheckpointError(RuntimeError):
  """A checkpoint that is missing, unreadable or does not fit the model."""


class CheckpointWriteError(RuntimeError):
  """A save failed (a full disk, ...): the run stops and its last good checkpoint stays."""


def _abstract(tree):
  """ShapeDtypeStructs (with shardings) of a concrete or abstract pytree."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
      tree)


class _QuietFailedSaves(logging.Filter):
  """Orbax logs a failed save with a traceback from each of its threads, and TensorStore's
  late callbacks then find Orbax's event loop closed. Every such failure reaches the run as
  one CheckpointWriteError line, so these duplicates are dropped."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and record.exc_info
                and f'{os.sep}orbax{os.sep}' in record.pathname)

  @classmethod
  def install(cls) -> None:
    absl_logger = logging.getLogger('absl')  # the logger Orbax writes to
    if any(isinstance(f, cls) for f in absl_logger.filters):
      return
    absl_logger.addFilter(cls())
    previous = sys.unraisablehook

    def hook(unraisable):
      if not (isinstance(unraisable.exc_value, RuntimeError)
              and str(unraisable.exc_value) == 'Event loop is closed'):
        previous(unraisable)

    sys.unraisablehook = hook


class Checkpointer:
  """The run's own checkpoints: save every N minibatches, keep the last K, resume.

  Saves are asynchronous. A save that fails in the background is noticed by `check()`
  (cheap: call it every step), and by the next `save`, `wait` or `close`, as one
  CheckpointWriteError; Orbax deletes old checkpoints only after a newer one is complete,
  so the last good one stays.
  """

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise CheckpointError(f'{self.directory} is not a folder; the run keeps its checkpoints '
                            'there: move it away, or give another --workdir')
    self._remove_partial_saves()
    _QuietFailedSaves.install()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._watcher: threading.Thread | None = None  # awaits the save in flight
    self._failure: tuple[int, BaseException] | None = None  # (step, error) of a failed save
    self._reported = False
    self._state_bytes = 0

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Starts writing `state` as checkpoint `step`. Raises CheckpointWriteError when the
    save before it failed, or this one cannot start."""
    self.wait()  # Orbax waits for the save in flight anyway; its failure stops the run here
    self._state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    except Exception as e:  # Orbax and TensorStore raise many types; each stops the run
      self._failure = (step, e)
      self.check()
    self._watcher = threading.Thread(target=self._await_save, args=(step,),
                                     name=f'checkpoint {step}', daemon=True)
    self._watcher.start()

  def _await_save(self, step: int) -> None:
    try:
      self._manager.wait_until_finished()
    except BaseException as e:  # pylint: disable=broad-except  # reported by check()
      self._failure = (step, e)

  def check(self) -> None:
    """Raises CheckpointWriteError, once, if a save has failed. It reads a flag only: cheap
    enough for every step."""
    if self._failure is not None and not self._reported:
      self._reported = True
      raise CheckpointWriteError(self._failure_message(*self._failure)) from self._failure[1]

  def _failure_message(self, step: int, error: BaseException) -> str:
    path = os.path.join(self.directory, str(step))
    # From disk: Orbax forgets the steps it will rotate out once this save is complete.
    good = [s for s in saved_steps(self.directory) if s < step]
    kept = (f'the last good checkpoint, step {good[-1]}, is kept' if good else
            'no checkpoint was written before it')
    code = _os_error_code(error)
    if code in (errno.ENOSPC, errno.EDQUOT):
      needed = (f'about {_folder_bytes(os.path.join(self.directory, str(good[-1]))):,} bytes '
                f'(the size of step {good[-1]})' if good else
                f'about {self._state_bytes:,} bytes (the size of the train state)')
      free = shutil.disk_usage(self.directory).free
      return (f'cannot write checkpoint step {step} to {path}: {os.strerror(code).lower()}: it '
              f'needs {needed} and {free:,} bytes are free; {kept}. Free some space and run '
              'the same command to resume')
    reason = ' '.join(str(error).split())[:300]
    return (f'cannot write checkpoint step {step} to {path}: {type(error).__name__}: '
            f'{reason}; {kept}')

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    try:
      renamed, added = self._older_layout(step, abstract_state)
      if not renamed and not added:
        return self._manager.restore(
            step, args=ocp.args.StandardRestore(_abstract(abstract_state)))
      # An older layout: restore its fields under their old names, then rebuild the state
      # with the fields it lacks at their initial values.
      fields = {f.name: getattr(abstract_state, f.name)
                for f in dataclasses.fields(abstract_state) if f.name not in added}
      target = {renamed.get(name, name): value for name, value in fields.items()}
      restored = self._manager.restore(step, args=ocp.args.StandardRestore(_abstract(target)))
      return abstract_state.replace(
          **{name: restored[renamed.get(name, name)] for name in fields},
          **{name: _zeros(getattr(abstract_state, name)) for name in added})
    except Exception as e:  # Orbax raises many types; name the checkpoint either way.
      why = _restore_problem(os.path.join(self.directory, str(step)),
                             getattr(abstract_state, 'params', None), e)
      raise self._unrestorable(step, why) from e

  def _unrestorable(self, step: int, why: str) -> CheckpointError:
    return CheckpointError(f'cannot restore checkpoint step {step} from {self.directory}: '
                           f'{why}. It was kept as it was (nothing on disk changed).')

  def check_resumable(self) -> None:
    """Raises restore_newest_intact's error, without a network built to restore into, when
    no checkpoint's metadata reads (none could restore)."""
    latest = None
    for step in reversed(self.all_steps()):
      try:
        _tree_metadata(os.path.join(self.directory, str(step), _ITEM))
        return
      except CheckpointError as e:
        latest = latest or (step, e)
    if latest:
      raise self._unrestorable(latest[0], f'the checkpoint is damaged: {latest[1]}')

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_newest_intact(self, abstract_state: Any) -> tuple[Any, int]:
    """(state, step) of the newest checkpoint that restores.

    A newer one that does not (truncated, deleted or garbled files: an interrupted copy, a
    full disk) is moved aside to `<workdir>/checkpoints_unreadable/<step>`, never deleted,
    and the run says so. When none restores, the latest's error is raised and nothing on
    disk changes.
    """
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    errors = []
    for step in reversed(steps):
      try:
        state = self.restore(abstract_state, step)
      except CheckpointError as e:
        errors.append((step, e))
        continue
      for broken, error in errors:
        moved = self._move_aside(broken)
        log.warning('Checkpoint step %d cannot be restored (%s); moved it to %s.', broken,
                    error.__cause__ or error, moved)
      if errors:
        log.warning('Resuming from checkpoint step %d, the newest intact one.', step)
      return state, step
    raise errors[0][1]

  def _move_aside(self, step: int) -> str:
    target_dir = self.directory + UNREADABLE_SUFFIX
    target = os.path.join(target_dir, str(step))
    if jax.process_index() == 0:
      os.makedirs(target_dir, exist_ok=True)
      suffix = 0
      while os.path.exists(target):  # an earlier move of the same step is kept too
        suffix += 1
        target = os.path.join(target_dir, f'{step}.{suffix}')
      os.rename(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint {step} moved aside')
    self._manager.reload()
    return target

  def _older_layout(self, step: int,
                    abstract_state: Any) -> tuple[dict[str, str], tuple[str, ...]]:
    """({new: old} for the state fields that checkpoint `step` stores under an old name,
    the added fields it does not have)."""
    if not dataclasses.is_dataclass(abstract_state):
      return {}, ()
    on_disk = _tree_metadata(os.path.join(self.directory, str(step), _ITEM))
    renamed = {new: old for new, old in _RENAMED_FIELDS.items()
               if hasattr(abstract_state, new) and new not in on_disk and old in on_disk}
    added = tuple(name for name in _ADDED_FIELDS
                  if hasattr(abstract_state, name) and name not in on_disk)
    return renamed, added

  def _remove_partial_saves(self) -> None:
    """Deletes the folders of saves that never finished, left by a kill -9 or a full disk
    (PARTIAL_MARK: a finished checkpoint's folder never has it)."""
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      for name in sorted(os.listdir(self.directory)):
        if PARTIAL_MARK in name:
          path = os.path.join(self.directory, name)
          try:
            shutil.rmtree(path)
            log.warning('Removed %s: a checkpoint save that never finished.', path)
          except OSError as e:  # e.g. writes of a failed save still landing: Orbax skips it
            log.warning('Cannot remove %s, a checkpoint save that never finished: %s', path, e)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('partial checkpoint saves removed')

  def wait(self) -> None:
    """Blocks until the save in flight is written; raises CheckpointWriteError if it failed."""
    if self._watcher is not None:
      self._watcher.join()
      self._watcher = None
    self.check()

  def close(self) -> None:
    """Waits for the save in flight, then closes; raises CheckpointWriteError if it failed
    and nothing has said so yet."""
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception as e:  # pylint: disable=broad-except
        if self._failure is None:
          raise CheckpointWriteError(f'cannot close the checkpoints in {self.directory}: '
                                     f'{type(e).__name__}: {e}') from e
        # else: Orbax raising again the failure already reported

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)


def _zeros(abstract_tree: Any) -> Any:
  """Zeros of an abstract (or concrete) pytree, with its shardings."""
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype,
                                          device=getattr(x, 'sharding', None)), abstract_tree)


def _os_error_code(error: BaseException | None) -> int | None:
  """The errno of an OSError in `error`'s chain, or of the OS error a TensorStore message
  names ("... [os_error_code='28']")."""
  while error is not None:
    if isinstance(error, OSError) and error.errno:
      return error.errno
    match = re.search(r"os_error_code='(\d+)'", str(error))
    if match:
      return int(match.group(1))
    error = error.__cause__ or error.__context__
  return None


def _folder_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


class _Quiet:
  """Orbax's warnings (through absl) off while it probes a folder: a missing or garbled
  metadata file is reported once, as a CheckpointError, not as log lines."""

  def __enter__(self):
    self._logger = logging.getLogger('absl')
    self._level = self._logger.level
    self._logger.setLevel(logging.ERROR)

  def __exit__(self, *exc):
    self._logger.setLevel(self._level)


def _tree_metadata(item_dir: str) -> dict:
  """The stored tree's structure (dicts of array metadata) of a checkpoint item folder;
  CheckpointError when it cannot be read (a damaged checkpoint)."""
  # Orbax's JSON files are parsed here first, to name the one that does not parse.
  for path in (os.path.join(item_dir, '_METADATA'),
               os.path.join(os.path.dirname(item_dir), '_CHECKPOINT_METADATA')):
    if os.path.isfile(path):
      try:
        with open(path) as f:
          json.load(f)
      except (OSError, ValueError) as e:
        raise CheckpointError(f'its metadata cannot be read ({os.path.basename(path)}: '
                              f'{" ".join(str(e).split())})') from e
  try:
    with _Quiet(), ocp.StandardCheckpointer() as reader:
      metadata = reader.metadata(item_dir)
  except Exception as e:  # Orbax raises many types
    raise CheckpointError(f'its metadata cannot be read ({" ".join(str(e).split())})') from e
  if hasattr(metadata, 'item_metadata'):  # None when the metadata files do not parse
    metadata = getattr(metadata.item_metadata, 'tree', None)
  if not isinstance(metadata, dict):
    raise CheckpointError('its metadata is missing or cannot be read')
  return metadata


def _restore_problem(step_dir: str, abstract_params: Any, error: Exception) -> str:
  """Why a checkpoint did not restore: damaged (unreadable metadata or data) or another
  network (the stored params' shapes differ from `abstract_params`)."""
  try:
    stored = _tree_metadata(os.path.join(step_dir, _ITEM))
  except CheckpointError as e:
    return f'the checkpoint is damaged: {e}'
  if abstract_params is not None and 'params' in stored:
    shapes = lambda tree: {jax.tree_util.keystr(path): tuple(getattr(leaf, 'shape', ()))
                           for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    there, here = shapes(stored['params']), shapes(abstract_params)
    for key in sorted(set(there) | set(here)):
      if there.get(key) != here.get(key):
        return (f'it holds another network (params{key}: {there.get(key, "absent")} there, '
                f'{here.get(key, "absent")} in this config); is it from a run with another '
                'model config?')
  reason = ' '.join(str(error).split()).split('. ')[0]  # Orbax's first sentence says it
  return f'the checkpoint is damaged: its arrays cannot be read ({reason})'


def find_checkpoint(path: str) -> str:
  """A checkpoint step folder from a workdir, its checkpoints/ folder, or a step folder."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f'checkpoint path {path} does not exist')
  candidates = [os.path.join(path, CHECKPOINT_DIR), path]
  for directory in candidates:
    steps = saved_steps(directory)
    if steps:
      return os.path.join(directory, str(steps[-1]))
  if os.path.isdir(path) and os.path.basename(path).isdigit():
    return path
  raise CheckpointError(f'no checkpoint found under {path} (expected {CHECKPOINT_DIR}/<step>/)')


def usable_checkpoint(path: str) -> str:
  """`find_checkpoint`, and its metadata reads: a damaged checkpoint is named before a
  network is built for it."""
  step_dir = find_checkpoint(path)
  _num_saved_ema(step_dir)
  return step_dir


def _restore_trees(step_dir: str, target: dict, what: str, params: Any) -> dict:
  """The trees of `target` (abstract leaves; ocp.PLACEHOLDER skips one) from a checkpoint
  step folder, read-only: the one way weights are read out of another run. `params`: the
  abstract params, to tell another network from a damaged checkpoint."""
  item_dir = os.path.join(step_dir, _ITEM)
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      return checkpointer.restore(
          item_dir, args=ocp.args.PyTreeRestore(
              item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True))
  except Exception as e:  # Orbax raises many types; name the checkpoint either way.
    raise CheckpointError(f'cannot load {what} from {step_dir}: '
                          f'{_restore_problem(step_dir, params, e)}. It was left as it '
                          'was.') from e


def _num_saved_ema(step_dir: str) -> int:
  try:
    return len(_tree_metadata(os.path.join(step_dir, _ITEM))['ema_params'])
  except (CheckpointError, KeyError, TypeError) as e:
    raise CheckpointError(f'cannot read the checkpoint in {step_dir}: the checkpoint is '
                          f'damaged: {e}. It was left as it was.') from e


def restore_weights(path: str, abstract_params: Any, abstract_ema: tuple) -> tuple[Any, tuple]:
  """Params and EMA params of another run (read-only), for fine-tuning with a fresh optimizer.

  The other run's EMA trees are matched by position; when it kept fewer EMA rates than this
  run, the extra ones start from its last EMA tree.
  """
  step_dir = find_checkpoint(path)
  target = {
      'params': _abstract(abstract_params),
      'ema_params': [_abstract(abstract_params)] * _num_saved_ema(step_dir),
  }
  restored = _restore_trees(step_dir, target, 'weights', target['params'])
  saved_ema = list(restored['ema_params'])
  ema = tuple(saved_ema[min(i, len(saved_ema) - 1)] for i in range(len(abstract_ema)))
  return restored['params'], ema


def restore_params(step_dir: str, abstract_params: Any, ema_index: int | None = 0) -> Any:
  """One params tree of a checkpoint step folder (read-only): EMA tree `ema_index`, or
  with None the training params. The other trees are not read."""
  abstract_params = _abstract(abstract_params)
  if ema_index is None:
    return _restore_trees(step_dir, {'params': abstract_params}, 'params',
                          abstract_params)['params']
  skip = jax.tree.map(lambda _: ocp.PLACEHOLDER, abstract_params)
  num_ema = _num_saved_ema(step_dir)
  if not 0 <= ema_index < num_ema:
    raise CheckpointError(f'{step_dir} holds {num_ema} EMA trees; there is no EMA tree '
                          f'{ema_index}')
  target = {'ema_params': [abstract_params if i == ema_index else skip
                           for i in range(num_ema)]}
  return _restore_trees(step_dir, target, 'ema_params',
                        abstract_params)['ema_params'][ema_index]


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """The run's config.json, replaced whole (a kill mid-write leaves the old one)."""
  writing.atomic_write(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))


def check_same_network(config: ml_collections.ConfigDict, source: str, field: str,
                       why: str) -> None:
  """Raises ConfigError when the run `source` (given as config.<field>) has another network
  or noise process than `config` (dropout may differ), naming the first differing field."""
  try:
    theirs = load_config(source)
  except (CheckpointError, config_lib.ConfigError) as e:
    raise type(e)(f'config.{field}={source!r}: {e}') from None
  _raise_differences(config, theirs, config_lib.network_differences(
      config, theirs, ignore=('dropout',)), f'config.{field}={source!r}', why)


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ConfigError, reading only, when `workdir` holds checkpoints of a run whose
  config.json differs from `config` in a field a resumed run may not change
  (config.resume_differences), naming the first one."""
  if not (has_checkpoints(workdir) and os.path.isfile(os.path.join(workdir, CONFIG_FILE))):
    return  # nothing to resume: the run starts afresh and writes its config.json
  theirs = load_config(workdir)
  _raise_differences(config, theirs, config_lib.resume_differences(config, theirs),
                     f'in --workdir={workdir!r}',
                     'resuming would continue its checkpoints as another run: give a new run '
                     'another --workdir')
  _raise_differences(config, theirs, config_lib.switched_optimizer_fields(config, theirs),
                     f'in --workdir={workdir!r}',
                     'turning it on or off changes the optimizer state its checkpoints hold '
                     '(a new value > 0 resumes): start a new --workdir with --config.init_from '
                     'to keep the weights')


def _raise_differences(config: ml_collections.ConfigDict, theirs: ml_collections.ConfigDict,
                       differ: list[str], run: str, why: str) -> None:
  """One line for the first of `differ`, the fields in which `config` and the run `run`
  (with config `theirs`) disagree."""
  if differ:
    first = differ[0]
    raise config_lib.ConfigError(
        f'config.{first}={config_lib.field_value(config, first)!r}: the run {run} has '
        f'{first}={config_lib.field_value(theirs, first)!r}; {why} '
        f'(differing: {", ".join(differ)})')


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` holds a checkpoint step folder of its own (a run to resume)."""
  return bool(saved_steps(os.path.join(workdir, CHECKPOINT_DIR)))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f'{path} not found: is {workdir} a training workdir?')
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:  # ValueError: not JSON, or not text
    raise CheckpointError(f'{path} cannot be read: {" ".join(str(e).split())}') from None
  return config_lib.check_run_config(raw, path)


def saved_steps(directory: str) -> list[int]:
  """The step folders (ascending) in a checkpoints/ folder; [] when there is none."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def step_folder(workdir: str, step: int | None) -> str:
  """Checkpoint `step` of the run in `workdir` (None: its latest), or CheckpointError naming
  the steps there."""
  if step is None:
    return usable_checkpoint(workdir)
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  path = os.path.join(directory, str(step))
  if not os.path.isdir(path):
    raise CheckpointError(f'no checkpoint for step {step} in {directory} '
                          f'(steps there: {saved_steps(directory) or "none"})')
  return usable_checkpoint(path)


def check_source_run(config: ml_collections.ConfigDict, source: str, field: str, why: str,
                     objective: str | None = None) -> None:
  """Checks the run `source` (given as config.<field>) that weights are read from before
  anything is loaded or compiled: a run folder, of `objective` if given, with `config`'s
  network, holding a checkpoint. Raises ConfigError / CheckpointError naming the problem."""
  if not os.path.isdir(source):
    raise config_lib.ConfigError(f'config.{field}={source!r}: no such directory (expected '
                                 'the workdir of a run)')
  try:
    theirs = load_config(source)
  except (CheckpointError, config_lib.ConfigError) as e:
    raise type(e)(f'config.{field}={source!r}: {e}') from None
  if objective is not None and config_lib.objective_of(theirs) != objective:
    raise config_lib.ConfigError(
        f'config.{field}={source!r}: the run there trains '
        f'objective={config_lib.objective_of(theirs)!r}; a {field} must be a '
        f'{objective.upper()} run')
  check_same_network(config, source, field, why)
  try:  # none, or a damaged one: said before anything is built for it
    usable_checkpoint(source)
  except CheckpointError as e:
    raise CheckpointError(f'config.{field}={source!r}: {e}') from None


def read_ema_params(source: str, abstract_params: Any, ema_index: int = 0) -> Any:
  """EMA tree `ema_index` of the latest checkpoint of the run `source`, read-only, into
  `abstract_params` (ShapeDtypeStructs with their shardings)."""
  return restore_params(find_checkpoint(source), abstract_params, ema_index=ema_index)
