"""Faults and recovery: kill -9 and SIGTERM mid-run, unreadable checkpoints, non-finite
updates, and one clear line for every bad input.

The kill loop and the SIGTERM test run the real command in subprocesses (one CPU device, a
one-level U-Net, a compilation cache shared by the runs). They are marked `faults`:
`pytest -m faults -s` runs them alone and prints the steps lost per kill.
"""
import copy
import errno
import importlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from atdiff_jax import checkpoint, config as config_lib, data, main, train, train_step
from atdiff_jax.parallel import make_mesh
from atdiff_jax.train_state import STOP_DIVERGED, STOP_NONFINITE
from atdiff_jax.train_step import (TrainParts, abstract_state, all_finite, create_train_state,
                                   make_init_fn,
                                   make_train_step)
from conftest import ToyDenoiser, assert_trees_equal, no_compiles, tiny_config

NUM_STEPS = 24
TINY = ['--config=configs/quickstart.py', '--config.model.ch_mult=(1,)',
        '--config.model.attn_resolutions=()', '--config.diffusion.num_timesteps=100',
        '--config.training.batch_size=8', '--config.training.log_every=1',
        '--config.training.checkpoint_every=3', '--config.training.keep_checkpoints=2',
        '--config.training.sample_every=0', f'--config.training.num_steps={NUM_STEPS}']
_STEP_LINE = re.compile(r'^step (\d+)/')
_START_LINE = re.compile(r'starting at minibatch (\d+)')


# ------------------------------------------------------------------ the real command


@pytest.fixture(scope='module')
def command_env(tmp_path_factory):
  env = dict(os.environ)
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
  env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path_factory.mktemp('xla_cache'))
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  env['PYTHONPATH'] = os.getcwd()
  return env


def _train(workdir, env, stop_at=None, sig=signal.SIGKILL, delay=0.0):
  """Runs the train command; with `stop_at`, sends `sig` `delay` s after it logs that
  minibatch. Returns (exit code, minibatch it started at, last minibatch it logged)."""
  proc = subprocess.Popen([sys.executable, '-m', 'atdiff_jax.main', f'--workdir={workdir}',
                           *TINY], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env)
  start, last, lines, sent = None, None, [], False
  # Read to the end, also after the signal: a stopping run still writes (a closed pipe would
  # make its last lines fail).
  for line in proc.stdout:
    lines.append(line)
    if start is None and _START_LINE.search(line):
      start = int(_START_LINE.search(line).group(1))
    match = _STEP_LINE.match(line)
    if match and not sent:
      last = int(match.group(1))
      if stop_at is not None and last >= stop_at:
        time.sleep(delay)
        proc.send_signal(sig)
        sent = True
  proc.stdout.close()
  code = proc.wait(timeout=120)
  assert start is not None, ''.join(lines)
  return code, start, last, ''.join(lines)


def _saved_state(workdir, step=None):
  """The whole TrainState of a checkpoint (default: the latest), on the host."""
  config = checkpoint.load_config(workdir)
  abstract = jax.eval_shape(make_init_fn(config, TrainParts.build(config)), jax.random.key(0))
  ckpt = checkpoint.Checkpointer(workdir, keep=100, async_save=False)
  try:
    return jax.device_get(ckpt.restore(abstract, step))
  finally:
    ckpt.close()


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, command_env):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  code, start, last, out = _train(workdir, command_env)
  assert code == 0 and start == 0 and last == NUM_STEPS, out
  return _saved_state(workdir)


@pytest.mark.faults
def test_kill_9_at_random_moments_then_the_same_command_ends_bit_for_bit(
    tmp_path, command_env, uninterrupted):
  rng = random.Random(0)
  stops = sorted(set(rng.sample(range(2, NUM_STEPS - 2), 4)) | {9})  # 9: a save in flight
  starts, lasts, intact = [], [], [0]
  for stop_at in stops:
    delay = 0.01 if stop_at % 3 == 0 else rng.uniform(0.0, 0.2)
    code, start, last, out = _train(tmp_path, command_env, stop_at, signal.SIGKILL, delay)
    assert code == -signal.SIGKILL, out
    starts.append(start)
    lasts.append(last)
    intact.append(_latest_step(tmp_path))
    assert intact[-1] >= intact[-2], intact  # no kill destroys a finished checkpoint
  code, start, last, out = _train(tmp_path, command_env)
  assert code == 0 and last == NUM_STEPS, out
  starts.append(start)
  assert starts[1:] == intact[1:], (starts, intact)  # each restart resumes from the newest
  lost = [killed - resumed for killed, resumed in zip(lasts, starts[1:])]
  # A checkpoint every 3; one save may be in flight and the next wait for it.
  assert all(0 <= n <= 6 for n in lost), lost
  assert_trees_equal(_saved_state(tmp_path), uninterrupted)
  print(f'\nkill -9 after minibatches {lasts}: resumed from {starts[1:]}, minibatches lost per '
        f'kill {lost} (a checkpoint every 3); finished checkpoints lost: 0')


def _latest_step(workdir):
  """The checkpoint a restart would resume from (the newest intact one)."""
  steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())
  for step in reversed(steps):
    try:
      _saved_state(workdir, step)
      return step
    except checkpoint.CheckpointError:
      continue
  return 0


@pytest.mark.faults
def test_sigterm_checkpoints_the_current_step_and_resumes_exactly(tmp_path, command_env,
                                                                   uninterrupted):
  code, _, last, out = _train(tmp_path, command_env, 8, signal.SIGTERM)
  assert code == 0, out
  stopped = int(re.search(r'Stopped at minibatch (\d+)', out).group(1))
  assert stopped >= last and _latest_step(tmp_path) == stopped
  code, start, last, out = _train(tmp_path, command_env)
  assert code == 0 and start == stopped and last == NUM_STEPS, out
  assert_trees_equal(_saved_state(tmp_path), uninterrupted)


# ------------------------------------------------------------------ unreadable checkpoints


@pytest.fixture
def loop_config(config):
  """The host loop's plumbing on a one-level, attention-free U-Net: quick compiles."""
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = ()
  config.training.num_steps = 4
  config.training.checkpoint_every = 2
  config.training.keep_checkpoints = 3
  return config


def _damage(step_dir, how):
  """Damages a finished checkpoint as an interrupted copy or a full disk would."""
  files = sorted(p for p in step_dir.rglob('*') if p.is_file())
  if how == 'truncated':  # every data file cut in half
    for path in files:
      if 'ocdbt' in str(path) or path.parent.name == 'd':
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  elif how == 'deleted':  # the array data gone
    for path in files:
      if path.parent.name == 'd':
        path.unlink()
  else:  # 'garbled': the metadata no longer parses
    for path in files:
      if path.name.endswith('metadata') or path.suffix == '.json' or 'manifest' in path.name:
        path.write_bytes(b'{"garbled": ')


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """(a run's workdir with checkpoints at 2 and 4, its state at 4, its config)."""
  config = tiny_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  config.training.checkpoint_every, config.training.keep_checkpoints = 2, 3
  workdir = tmp_path_factory.mktemp('finished')
  return workdir, jax.device_get(train.train(config, str(workdir))), config


@pytest.mark.parametrize('how', ['truncated', 'deleted', 'garbled'])
def test_unreadable_latest_checkpoint_falls_back_to_the_newest_intact_one(
    finished_run, tmp_path, how, caplog):
  source, reference, config = finished_run
  run = tmp_path / 'run'
  shutil.copytree(source, run)
  step_4 = run / 'checkpoints' / '4'
  _damage(step_4, how)
  damaged = {p.relative_to(step_4): p.read_bytes() for p in step_4.rglob('*') if p.is_file()}

  with caplog.at_level('WARNING'):
    state = train.train(config, str(run))
  assert 'Checkpoint step 4 cannot be restored' in caplog.text
  assert 'Resuming from checkpoint step 2, the newest intact one' in caplog.text
  moved = run / 'checkpoints_unreadable' / '4'
  assert {p.relative_to(moved): p.read_bytes() for p in moved.rglob('*')
          if p.is_file()} == damaged  # moved aside as it was, not deleted
  # Minibatches 3 and 4 again, from step 2: the same state as never interrupted.
  assert_trees_equal(state, reference)
  assert int(state.step) == 4


def test_a_checkpoint_of_another_model_is_an_error_and_nothing_moves(loop_config, tmp_path):
  loop_config.training.num_steps = 2
  train.train(loop_config, str(tmp_path))
  before = _files(tmp_path)
  loop_config.model.ch = 64
  # The run's config.json names the field before anything is read or compiled.
  with pytest.raises(config_lib.ConfigError, match=r'config\.model\.ch=64: the run in '
                     r'--workdir=.* has model\.ch=32'):
    train.train(loop_config, str(tmp_path))
  assert _files(tmp_path) == before
  # Without it, the checkpoint itself does not restore, and nothing moves either.
  os.remove(tmp_path / 'config.json')
  with pytest.raises(checkpoint.CheckpointError, match='cannot restore checkpoint step 2'):
    train.train(loop_config, str(tmp_path))
  assert _files(tmp_path) == {k: v for k, v in before.items() if k != 'config.json'}


def _files(folder):
  """{relative path: bytes} of every file under `folder`."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob('*') if p.is_file()}


# ------------------------------------------------------------------ non-finite updates


def _checkpointed_states(workdir):
  steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')))
  return {step: _saved_state(str(workdir), step) for step in steps}


def _step_state_and_batch(config):
  """The compiled step of the toy denoiser (the guard is the step's, not the model's), a
  fresh state, clean images in the model's range and a batch builder."""
  mesh, toy = make_mesh(), ToyDenoiser()
  images, labels = data.create_source(config.data).get(np.arange(config.training.batch_size))
  clean = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  batch = lambda x: {'image': x, 'label': jnp.asarray(labels)}
  parts = TrainParts.build(config, toy)
  return (make_train_step(config, mesh, parts), create_train_state(config, mesh, parts),
          clean, batch)


def test_a_poisoned_minibatch_is_skipped_inside_the_step(loop_config):
  """NaN pixels: the update is skipped in the program (params, optimizer, EMA unchanged)
  and counted; the next clean minibatch updates as usual."""
  step, state, clean, batch = _step_state_and_batch(loop_config)
  before = jax.device_get(state)
  poisoned = clean.at[3, 2, 2, 0].set(jnp.nan)
  state, metrics = step(state, batch(poisoned))
  after = jax.device_get(state)
  assert int(metrics['nonfinite']) == 1
  assert int(after.step) == 1 and int(after.opt_step) == 0  # the minibatch counts, no update
  for field in ('params', 'opt_state', 'ema_params', 'objective_state'):
    assert_trees_equal(getattr(after, field), getattr(before, field))
  state, metrics = step(state, batch(clean))
  assert int(metrics['nonfinite']) == 0 and int(state.opt_step) == 1
  assert bool(all_finite(state.params))


def test_free_at_skips_only_its_non_finite_passes(loop_config):
  loop_config.adv.method, loop_config.adv.steps = 'free', 3
  step, state, clean, batch = _step_state_and_batch(loop_config)
  before = jax.device_get(state.params)
  state, metrics = step(state, batch(clean.at[0, 0, 0, 0].set(jnp.inf)))
  assert int(metrics['nonfinite']) == 3 and int(state.opt_step) == 0
  assert_trees_equal(state.params, before)


def test_a_diverging_run_stops_exit_3_and_never_writes_a_non_finite_checkpoint(tmp_path,
                                                                              capsys):
  """lr 1e30 with the divergence guard off: the first update sends the params to ~1e30 and
  every later loss overflows. With stop_after_nonfinite=2 the command stops at minibatch 3
  with exit code 3, naming the last checkpoint; every checkpoint it wrote is finite."""
  args = [a for a in TINY if 'num_steps' not in a and 'checkpoint_every' not in a]
  code = main.cli(['atdiff_jax.main', f'--workdir={tmp_path}', *args,
                   '--config.training.num_steps=6', '--config.training.lr=1e30',
                   '--config.training.checkpoint_every=1', '--config.training.keep_checkpoints=9',
                   '--config.training.stop_after_nonfinite=2',
                   '--config.training.max_update_ratio=0'])
  assert code == 3
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith('error: stopped at minibatch 3: 2 minibatches in a row had a '
                            'non-finite loss or gradient'), err[-1]
  assert 'the last checkpoint is step 2, kept as it was' in err[-1]
  saved = _checkpointed_states(tmp_path)
  assert sorted(saved) == [1, 2]
  assert all(bool(all_finite(state)) for state in saved.values())
  assert int(saved[2].opt_step) == 1  # minibatch 2's update was skipped


@pytest.mark.parametrize('limit,stop_at', [(3, 7), (0, 0)])
def test_the_step_counts_the_non_finite_streak_and_names_where_it_stops(loop_config, limit,
                                                                        stop_at):
  """The guard lives in the state: the host reading it only now still learns that the
  third poisoned minibatch in a row (the 7th) stopped the run; limit 0 never stops."""
  loop_config.training.stop_after_nonfinite = limit
  step, state, clean, batch = _step_state_and_batch(loop_config)
  poisoned = clean.at[1, 0, 0, 0].set(jnp.nan)
  for images in (clean, poisoned, poisoned, clean, poisoned, poisoned, poisoned, poisoned):
    state, _ = step(state, batch(images))
  guard = jax.device_get(state.guard)
  assert int(guard.nonfinite_streak) == 4
  assert int(guard.stop_at) == stop_at
  assert int(guard.stop_reason) == (STOP_NONFINITE if stop_at else 0)


def test_an_update_far_larger_than_the_params_stops_the_run_in_the_step(loop_config):
  """lr 1e30 stays finite for a while; the first update is 1e30 times the params."""
  loop_config.training.lr = 1e30
  step, state, clean, batch = _step_state_and_batch(loop_config)
  state, _ = step(state, batch(clean))
  assert bool(all_finite(state.params))  # finite: the non-finite guard sees nothing
  for _ in range(2):
    state, _ = step(state, batch(clean))
  guard = jax.device_get(state.guard)
  assert (int(guard.stop_at), int(guard.stop_reason)) == (1, STOP_DIVERGED)
  assert not float(guard.update_ratio) <= 1e20


# ------------------------------------------------------------------ the loop on the toy model


@pytest.fixture
def toy_model(monkeypatch):
  """train() with the toy denoiser: the loop compiles in seconds (the guards and saves are
  the loop's, not the model's)."""
  monkeypatch.setattr(train_step, 'create_model', lambda config: ToyDenoiser())


def _toy_state(workdir, step=None):
  """A checkpoint of a toy run (default: the latest), on the host."""
  config = checkpoint.load_config(str(workdir))
  abstract = jax.eval_shape(make_init_fn(config, TrainParts.build(config, ToyDenoiser())),
                            jax.random.key(0))
  ckpt = checkpoint.Checkpointer(str(workdir), keep=100, async_save=False)
  try:
    return jax.device_get(ckpt.restore(abstract, step))
  finally:
    ckpt.close()


def _steps(workdir):
  return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))


@pytest.fixture(scope='module')
def toy_run(tmp_path_factory):
  """(the workdir of a finished toy run with checkpoints 2 and 4, its config)."""
  config = tiny_config()
  config.training.checkpoint_every, config.training.keep_checkpoints = 2, 3
  workdir = tmp_path_factory.mktemp('toy_run')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train_step, 'create_model', lambda config: ToyDenoiser())
    train.train(config, str(workdir))
  return workdir, config


# ------------------------------------------------------------------ resuming as another run


RESUME_CHANGES = [
    ('diffusion.schedule', 'linear',
     r"config\.diffusion\.schedule='linear': the run in --workdir=.* has "
     r"diffusion\.schedule='cosine'; resuming would continue its checkpoints as another run"),
    ('diffusion.num_timesteps', 50,
     r'config\.diffusion\.num_timesteps=50: the run in --workdir=.* has '
     r'diffusion\.num_timesteps=100;'),
    ('objective', 'ct', r"config\.objective='ct': the run in --workdir=.* has objective='dpm';"),
    # Resumable in value, not in switching on or off: the optimizer state would not fit.
    ('training.grad_clip', 1.0,
     r"config\.training\.grad_clip=1\.0: the run in --workdir=.* has training\.grad_clip=0\.0; "
     r"turning it on or off changes the optimizer state"),
    ('training.warmup_steps', 10,
     r"config\.training\.warmup_steps=10: the run in --workdir=.* has "
     r"training\.warmup_steps=0; turning it on or off"),
]


@pytest.mark.parametrize('field,value,message', RESUME_CHANGES, ids=[c[0] for c in RESUME_CHANGES])
def test_resuming_as_another_run_is_refused_and_nothing_changes(toy_run, tmp_path, field, value,
                                                                 message):
  source, config = toy_run
  run = tmp_path / 'run'
  shutil.copytree(source, run)
  before = _files(run)
  config = copy.deepcopy(config)
  block, _, name = field.rpartition('.')
  (config[block] if block else config)[name] = value
  with no_compiles('backend_compile'), pytest.raises(config_lib.ConfigError, match=message):
    train.train(config, str(run))
  assert _files(run) == before  # config.json and the checkpoints as they were


def test_resuming_with_another_lr_and_length_goes_on(toy_model, toy_run, tmp_path, caplog):
  source, config = toy_run
  run = tmp_path / 'run'
  shutil.copytree(source, run)
  config = copy.deepcopy(config)
  config.training.lr, config.training.num_steps = 5e-4, 6
  with caplog.at_level('INFO'):
    state = train.train(config, str(run))
  assert 'Resuming from' in caplog.text and 'starting at minibatch 4' in caplog.text
  assert int(state.step) == 6 and _steps(run) == ['2', '4', '6']
  assert checkpoint.load_config(str(run)).training.lr == 5e-4  # config.json says so now


def test_every_resumable_field_may_change(config):
  """The fields RESUMABLE_FIELDS lets through, and only those, differ from config.json."""
  stored = copy.deepcopy(config)
  config = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
  for field in config_lib.field_paths(config):
    if any(field == p or field.startswith(p + '.') for p in config_lib.RESUMABLE_FIELDS):
      block, _, name = field.rpartition('.')
      node = config
      for part in block.split('.') if block else []:
        node = node[part]
      node[name] = 'changed'
  assert config_lib.resume_differences(config, stored) == []
  config.training.batch_size = 32
  config.model.dropout = 0.1
  assert config_lib.resume_differences(config, stored) == ['model.dropout', 'training.batch_size']


# ------------------------------------------------------------------ divergence


def test_a_diverging_resume_stops_at_the_minibatch_it_names_and_keeps_the_last_good_one(
    toy_model, tmp_path, capsys):
  """Four good minibatches, then lr 1e30: minibatch 5's update is 1e30 times the params. The
  host reads the guard only at minibatch 6's checkpoint (log_every 100), yet the line names
  5, exit code 3; nothing after checkpoint 4 is written, and checkpoint 4 restores finite.
  A resume with a sane lr goes on from 4, which leaves the rotation only then."""
  args = [a for a in TINY if a.split('=')[0] not in (
      '--config.training.num_steps', '--config.training.checkpoint_every',
      '--config.training.log_every')] + ['--config.training.checkpoint_every=2',
                                         '--config.training.log_every=100']
  command = ['atdiff_jax.main', f'--workdir={tmp_path}', *args]
  assert main.cli(command + ['--config.training.num_steps=4']) == 0
  good = _toy_state(tmp_path, 4)
  capsys.readouterr()
  code = main.cli(command + ['--config.training.num_steps=12', '--config.training.lr=1e30'])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 3, err
  assert re.match(r'error: stopped at minibatch 5: the run diverged: the norm of its update over '
                  r'the norm of the params was \S+ \(training\.max_update_ratio=1\.0\)\. '
                  r'Nothing after minibatch 4 was saved; the last good checkpoint is step 4, '
                  r'kept as it was\.', err[-1]), err[-1]
  assert _steps(tmp_path) == ['2', '4']
  kept = _toy_state(tmp_path, 4)
  assert bool(all_finite(kept))
  assert_trees_equal(kept, good)
  assert main.cli(command + ['--config.training.num_steps=8']) == 0
  assert _steps(tmp_path) == ['6', '8']  # keep_checkpoints=2


# ------------------------------------------------------------------ failed saves


def _fail_commit(monkeypatch, step, error):
  """Makes Orbax's background commit of checkpoint `step` raise `error`: its last write,
  commit_success.txt in the step's temporary folder, made in its save thread once the
  arrays are written (so that no write of it is still landing when the test goes on)."""
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top
  write_text = async_path.write_text

  async def failing(path, text):
    if str(path).endswith(f'{os.sep}{step}{checkpoint.PARTIAL_MARK}{os.sep}commit_success.txt'):
      raise error
    return await write_text(path, text)

  monkeypatch.setattr(async_path, 'write_text', failing)


def _fail_start(monkeypatch, step, error):
  """Makes the start of the save of `step` raise `error`, before anything is written."""
  save = checkpoint.ocp.CheckpointManager.save

  def failing(self, at_step, *args, **kwargs):
    if at_step == step:
      raise error
    return save(self, at_step, *args, **kwargs)

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, 'save', failing)


_ENOSPC = lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
FAILED_SAVES = [
    ('disk full in the background', _fail_commit, _ENOSPC,
     r'no space left on device: it needs about [\d,]+ bytes \(the size of step 2\) and '
     r'[\d,]+ bytes are free; the last good checkpoint, step 2, is kept\. Free some space and '
     r'run the same command to resume$'),
    ('disk full at the start', _fail_start, _ENOSPC,
     r'no space left on device: it needs about [\d,]+ bytes \(the size of step 2\)'),
    ('another error in the background', _fail_commit, lambda: RuntimeError('lost the bucket'),
     r'RuntimeError: lost the bucket; the last good checkpoint, step 2, is kept$'),
]


@pytest.mark.parametrize('name,fail,error,message', FAILED_SAVES, ids=[c[0] for c in FAILED_SAVES])
def test_a_failed_save_stops_the_run_keeps_the_last_good_one_and_resumes(
    toy_model, tmp_path, monkeypatch, capsys, name, fail, error, message):
  """Checkpoint 4 fails (keep_checkpoints=1, so a rotation on failure would delete step 2):
  one line naming the path, exit code 3, step 2 intact; the same command then removes the
  partial folder and finishes from step 2."""
  del name
  args = [a for a in TINY if a.split('=')[0] not in (
      '--config.training.num_steps', '--config.training.checkpoint_every',
      '--config.training.keep_checkpoints')]
  command = ['atdiff_jax.main', f'--workdir={tmp_path}', *args, '--config.training.num_steps=8',
             '--config.training.checkpoint_every=2', '--config.training.keep_checkpoints=1']
  with monkeypatch.context() as patch:
    fail(patch, 4, error())
    code = main.cli(command)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 3, err
  assert err[-1].startswith(f'error: cannot write checkpoint step 4 to '
                            f'{tmp_path / "checkpoints" / "4"}: '), err[-1]
  assert re.search(message, err[-1]), err[-1]
  assert not any('Traceback' in line for line in err), err
  assert [s for s in _steps(tmp_path) if checkpoint.PARTIAL_MARK not in s] == ['2']
  assert bool(all_finite(_toy_state(tmp_path, 2)))
  assert main.cli(command) == 0
  assert _steps(tmp_path) == ['8']


def test_partial_saves_are_removed_at_start_and_finished_ones_never(tmp_path):
  """What kill -9 or a full disk leaves of a save in flight goes; checkpoints stay."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3, async_save=False)
  ckpt.save(2, {'x': jnp.arange(4.0)})
  ckpt.close()
  folder = tmp_path / 'checkpoints'
  for partial in ('4.orbax-checkpoint-tmp', '6.orbax-checkpoint-tmp-1733480000'):
    (folder / partial / 'default').mkdir(parents=True)
    (folder / partial / 'default' / 'part').write_bytes(b'half')
  finished = _files(folder / '2')
  checkpoint.Checkpointer(str(tmp_path), keep=3).close()
  assert sorted(os.listdir(folder)) == ['2']
  assert _files(folder / '2') == finished


# ------------------------------------------------------------------ bad input, one line each


QUICK = ['--config=configs/quickstart.py']
# (name, the command line after --workdir, what the one line must say). {tmp} is a folder
# holding the files of _bad_files.
BAD_INPUTS = [
    ('lr nan', ['--config.training.lr=nan'], r'config\.training\.lr=nan: must be a finite'),
    ('lr inf', ['--config.training.lr=inf'], r'config\.training\.lr=inf: must be a finite'),
    ('lr negative', ['--config.training.lr=-1e-3'], r'config\.training\.lr=-0\.001: must be'),
    ('radius nan', ['--config.adv.radius=nan'], r'config\.adv\.radius=nan: must be a finite'),
    ('step size inf', ['--config.adv.step_size=inf'], r'config\.adv\.step_size=inf'),
    ('ema rates text', ["--config.training.ema_rates='0.999'"],
     r"config\.training\.ema_rates=\('0\.999',\): must be a non-empty tuple of rates"),
    ('ema rate 1', ['--config.training.ema_rates=(1.0,)'], r'config\.training\.ema_rates='),
    ('unknown field', ['--config.training.learning_rate=1e-3'],
     r'config\.training\.learning_rate: no such field; did you mean .*config\.training\.lr\b'),
    ('unknown block', ['--config.optim.lr=1'],
     r'config\.optim\.lr: no such field; did you mean config\.training\.lr'),
    ('typo', ['--config.training.batchsize=8'],
     r'config\.training\.batchsize: no such field; did you mean config\.training\.batch_size'),
    ('wrong type', ['--config.training.num_steps=many'],
     r'config\.training\.num_steps=many: must be an int\b'),
    ('batch not divisible', ['--config.training.batch_size=12'],
     r'config\.training\.batch_size=12: must be divisible by the number of devices \(8\)'),
    ('batch zero', ['--config.training.batch_size=0'], r'config\.training\.batch_size=0'),
    ('steps negative', ['--config.training.num_steps=-5'], r'config\.training\.num_steps=-5'),
    ('seed negative', ['--config.seed=-1'], r'config\.seed=-1'),
    ('seed fraction', ['--config.seed=1.5'], r'config\.seed=1\.5: must be an int\b'),
    ('ch', ['--config.model.ch=40'], r'config\.model\.ch=40'),
    ('ch_mult empty', ['--config.model.ch_mult=()'], r'config\.model\.ch_mult=\(\)'),
    ('attention resolution', ['--config.model.attn_resolutions=(3,)'],
     r'config\.model\.attn_resolutions='),
    ('dtype', ['--config.model.dtype=float16'], r'config\.model\.dtype=.float16.: must be one'),
    ('dropout', ['--config.model.dropout=1.0'], r'config\.model\.dropout=1\.0'),
    ('remat', ['--config.model.remat=full'], r'config\.model\.remat=.full.'),
    ('adv method', ['--config.adv.method=freelb'], r'config\.adv\.method=.freelb.'),
    ('adv norm', ['--config.adv.norm=l1'], r'config\.adv\.norm=.l1.'),
    ('adv steps', ['--config.adv.steps=0'], r'config\.adv\.steps=0'),
    ('adv t_range', ['--config.adv.t_range=(5,)'], r'config\.adv\.t_range='),
    ('schedule', ['--config.diffusion.schedule=quadratic'], r'config\.diffusion\.schedule='),
    ('timesteps', ['--config.diffusion.num_timesteps=0'], r'config\.diffusion\.num_timesteps=0'),
    ('timestep sampler', ['--config.training.timestep_sampler=importance'],
     r'config\.training\.timestep_sampler='),
    ('nonfinite limit', ['--config.training.stop_after_nonfinite=-1'],
     r'config\.training\.stop_after_nonfinite=-1'),
    ('update ratio', ['--config.training.max_update_ratio=-1'],
     r'config\.training\.max_update_ratio=-1\.0: must be >= 0'),
    ('objective', ['--config.objective=gan'], r'config\.objective=.gan.'),
    ('cd without teacher', ['--config.objective=cd'], r'config\.teacher'),
    ('cd teacher missing', ['--config.objective=cd', '--config.teacher={tmp}/nowhere'],
     r'config\.teacher=.*nowhere.*: no such directory'),
    ('target ema 1', ['--config.objective=ct', '--config.consistency.target_ema=1.0'],
     r'config\.consistency\.target_ema=1\.0'),
    ('cm points', ['--config.objective=ct', '--config.consistency.pairs=grid',
                   '--config.consistency.num_points=1'], r'config\.consistency\.num_points=1'),
    ('ddim eta', ['--config.eval.sampler_options.ddim.eta=-1'],
     r'config\.eval\.sampler_options\.ddim\.eta=-1\.0: must be a finite number >= 0'),
    ('solver order', ['--config.eval.sampler_options.dpm_solver_pp.order=5'],
     r'config\.eval\.sampler_options\.dpm_solver_pp\.order=5: must be one of 1, 2, 3'),
    ('data name', ['--config.data.name=nope'], r'config\.data\.name'),
    ('image size', ['--config.data.image_size=7'],
     r'config\.data\.image_size=7: must be divisible by 2\*\*1'),
    ('npz missing', ['--config.data.name=npz', '--config.data.path={tmp}/missing.npz'],
     r'config\.data\.path: .*no such file'),
    ('npz single array', ['--config.data.name=npz', '--config.data.path={tmp}/single.npz'],
     r'config\.data\.path: .*single\.npz.* holds a single \.npy array'),
    ('unreadable image', ['--config.data.name=folder', '--config.data.path={tmp}/images',
                          '--config.data.channels=3'],
     r'config\.data\.path: 1 of 3 images .* cannot be read, the first .*bad\.png'),
    ('init_from missing', ['--config.init_from={tmp}/nowhere'], r'config\.init_from=.*nowhere'),
    ('init_from other model', ['--config.init_from={tmp}/wide_run'],
     r'config\.model\.ch=32: the run config\.init_from=.*wide_run.* has model\.ch=128'),
    ('no config file', ['--config={tmp}/nope.py'], r'--config=.*nope\.py: no such file'),
    ('override without config', ['--config=', '--config.training.lr=1'], r'--config'),
    ('workdir under a file', None, r'--workdir=.*a_file/run.*: cannot be a folder here'),
    ('checkpoints a file', ['--workdir={tmp}/file_run'],
     r'file_run/checkpoints is not a folder; the run keeps its checkpoints there'),
]


# The classes of bad input a sweep of ~300 command lines over every command found ending in a
# traceback, a hang, a page of usage or a misleading line, or accepted. {run} is a healthy
# run of configs/quickstart.py, {damaged} / {truncated} copies whose only checkpoint has
# garbled metadata / cut data files, {out} the test's own empty folder.
Q, TINY_EVAL = QUICK, ['--config.eval.num_samples=8', '--config.eval.batch_size=8']
SAMPLE, EVAL, PROBE = ['--mode=sample', '--workdir={run}'], ['--mode=eval', '--workdir={run}'], [
    '--mode=probe', '--workdir={run}']
CD = ['--config=configs/quickstart_cd.py']
IMPORT = ['--config=configs/default.py', '--workdir={out}/imported', '--attention_order=new']
EXPERIMENT = [*Q, '--workdir={out}/experiment', '--regime=short', '--base={run}']
NEW_BAD_INPUTS = [
    # Hangs: folders whose links loop, and K that would unroll for ever.
    ('hang: folder linking to itself', 'main', [
        *Q, '--config.data.name=folder', '--config.data.path={tmp}/loop_self'],
     r'config\.data\.path: 1 of 3 images .* cannot be read'),
    ('hang: folder with two loops', 'main', [
        *Q, '--config.data.name=folder', '--config.data.path={tmp}/loop_two'],
     r'config\.data\.path: 1 of 3 images .* cannot be read'),
    ('hang: subfolder linking to its parent', 'main', [
        *Q, '--config.data.name=folder', '--config.data.path={tmp}/loop_parent'],
     r'config\.data\.path: 1 of 3 images .* cannot be read'),
    ('hang: free K=10000 unrolled', 'main', [
        *Q, '--config.adv.method=free', '--config.adv.steps=10000',
        '--config.adv.replay_loop=unrolled'],
     r"config\.adv\.replay_loop='unrolled': .*adv\.steps=10000 is more than 16; use rolled"),
    ('hang: pgd K=100 unrolled', 'main', [
        *Q, '--config.adv.method=pgd', '--config.adv.steps=100',
        '--config.adv.replay_loop=unrolled'], r'adv\.steps=100 is more than 16'),
    ('hang: bench free:10000 unrolled', 'bench', [
        *Q, '--what=train', '--variants=free:10000@unrolled'], r'adv\.steps=10000 is more'),
    ('hang: bench pgd:40 unrolled', 'bench', [
        *Q, '--what=train', '--variants=none,pgd:40@unrolled'], r'adv\.steps=40 is more'),
    # Tracebacks.
    ('traceback: teacher config.json not JSON', 'main', [
        *CD, '--config.teacher={tmp}/garbled_config'],
     r"config\.teacher='.*garbled_config': .*config\.json cannot be read"),
    ('traceback: teacher config.json a list', 'main', [
        *CD, '--config.teacher={tmp}/list_config'],
     r'config\.teacher=.*config\.json: not a run config \(a JSON list'),
    ('traceback: init_from config.json without blocks', 'main', [
        *Q, '--config.init_from={tmp}/no_blocks'],
     r'config\.init_from=.*no_blocks.*: not a run config \(no model, data, diffusion'),
    ('traceback: init_from config.json not text', 'main', [
        *Q, '--config.init_from={tmp}/binary_config'], r'config\.init_from=.*cannot be read'),
    ('traceback: sample on config.json not JSON', 'main', [
        '--mode=sample', '--workdir={tmp}/garbled_config'], r'config\.json cannot be read'),
    ('traceback: eval on config.json with a bad field', 'main', [
        '--mode=eval', '--workdir={tmp}/bad_field'],
     r"bad_field/config\.json: not a usable run config: config\.model\.ch='wide'"),
    ('traceback: probe on config.json a folder', 'main', [
        '--mode=probe', '--workdir={tmp}/config_folder'], r'config\.json cannot be read'),
    ('traceback: npz object array', 'main', [
        *Q, '--config.data.name=npz', '--config.data.path={tmp}/objects.npz'],
     r"config\.data\.path: cannot read .*objects\.npz.*Object arrays"),
    ('traceback: npz bad CRC', 'main', [
        *Q, '--config.data.name=npz', '--config.data.path={tmp}/bad_crc.npz'],
     r'config\.data\.path: cannot read .*bad_crc\.npz.*CRC'),
    ('traceback: npz labels object array', 'main', [
        *Q, '--config.data.name=npz', '--config.data.path={tmp}/object_labels.npz'],
     r'config\.data\.path: cannot read .*object_labels\.npz'),
    ('traceback: heads do not divide', 'main', [*Q, '--config.model.num_heads=3'],
     r'config\.model\.num_heads=3: must divide the 64 channels of the attention at 4x4'),
    ('traceback: head channels do not divide', 'main', [
        *Q, '--config.model.num_head_channels=24'], r'config\.model\.num_head_channels=24'),
    ('traceback: decoder heads do not divide', 'main', [
        *Q, '--config.model.num_heads_upsample=5'], r'config\.model\.num_heads_upsample=5'),
    ('traceback: one timestep', 'main', [
        *Q, '--config.diffusion.num_timesteps=1', '--config.training.sample_steps=1'],
     r'config\.diffusion\.num_timesteps=1: must be >= 2'),
    ('traceback: seed over 64 bits', 'main', [*Q, '--config.seed=99999999999999999999'],
     r'config\.seed=99999999999999999999: must be an integer in \[0, 2\*\*32\)'),
    ('traceback: seed 2**63', 'main', [*Q, '--config.seed=9223372036854775808'],
     r'config\.seed=9223372036854775808'),
    ('traceback: multi_host without a cluster', 'main', [
        *Q, '--config.training.multi_host=True'],
     r'config\.training\.multi_host=True: cannot join a cluster'),
    ('traceback: half the cluster flags', 'main', [
        *Q, '--config.training.multi_host=True', '--num_processes=2'],
     r'--num_processes given: --coordinator_address, --num_processes and --process_id go'),
    ('traceback: eval.out_dir a file', 'main', [
        *Q, *SAMPLE, *TINY_EVAL, '--config.eval.out_dir={tmp}/a_file'],
     r"config\.eval\.out_dir='.*a_file': cannot be a folder"),
    ('traceback: eval.out_dir under a file', 'main', [
        *Q, *SAMPLE, *TINY_EVAL, '--config.eval.out_dir={tmp}/a_file/samples'],
     r'config\.eval\.out_dir=.*cannot be a folder: .*a_file is a file'),
    ('traceback: broken samples.json', 'main', [
        *Q, *SAMPLE, *TINY_EVAL, '--config.eval.out_dir={tmp}/samples_broken'],
     r'samples_broken/samples\.json cannot be read .* move it away'),
    ('traceback: samples.json a list', 'main', [
        *Q, *SAMPLE, *TINY_EVAL, '--config.eval.out_dir={tmp}/samples_list'],
     r'samples_list/samples\.json cannot be read \(not a JSON object\)'),
    ('traceback: broken results.json', 'main', [
        *Q, '--mode=eval', '--workdir={tmp}/bad_results', *TINY_EVAL],
     r'eval/results\.json cannot be read'),
    ('traceback: garbage Inception weights', 'main', [
        *Q, *EVAL, *TINY_EVAL, '--config.eval.inception_weights={tmp}/garbage.msgpack'],
     r"config\.eval\.inception_weights='.*garbage\.msgpack': cannot be read"),
    ('traceback: garbage reference stats', 'main', [
        *Q, *EVAL, *TINY_EVAL, '--config.eval.inception_weights={tmp}/garbage.msgpack',
        '--config.eval.ref_stats={tmp}/garbage_stats.npz'],
     r'config\.eval\.ref_stats=.*garbage_stats\.npz.*: cannot be read'),
    ('traceback: reference stats of the wrong shape', 'main', [
        *Q, *PROBE, '--config.eval.inception_weights={tmp}/garbage.msgpack',
        '--config.eval.ref_stats={tmp}/wrong_stats.npz'],
     r'config\.eval\.ref_stats=.*: cannot be read: mu \(3,\) and sigma \(2, 2\)'),
    ('traceback: t_start below the default t_end', 'main', [
        *Q, *SAMPLE, *TINY_EVAL, '--config.eval.sampler_options.dpm_solver_pp.t_start=0.0005'],
     r'dpm_solver_pp\.t_start=0\.0005: must be above t_end=0\.001 \(its default, 1/T\)'),
    ('traceback: t_start below the default t_end, training', 'main', [
        *Q, '--config.eval.sampler_options.dpm_solver_pp.t_start=0.0002'],
     r'dpm_solver_pp\.t_start=0\.0002: must be above t_end'),
    ('traceback: t_end below the first noise level', 'main', [
        '--config={tmp}/t_end_config.py', *SAMPLE],
     r'dpm_solver_pp\.t_end=0\.0001: is below the first noise level'),
    ('traceback: import a garbage .npz', 'import', [*IMPORT, '--input={tmp}/garbage_stats.npz'],
     r'garbage_stats\.npz: cannot be read as an \.npz of arrays'),
    ('traceback: import an .npz of object arrays', 'import', [
        *IMPORT, '--input={tmp}/objects.npz'], r'objects\.npz: cannot be read as an \.npz'),
    ('traceback: import with an unknown override', 'import', [
        *IMPORT, '--input={tmp}/objects.npz', '--config.model.chanels=3'],
     r'config\.model\.chanels: no such field'),
    ('traceback: bench --json into a missing folder', 'bench', [
        *Q, '--what=sample', '--json={out}/nowhere/bench.json'],
     r'--json=.*nowhere/bench\.json: cannot be written .*\(see --help\)'),
    ('traceback: bench --json a folder', 'bench', [*Q, '--what=train', '--json={tmp}'],
     r'--json=.*: cannot be written'),
    ('traceback: bench missing Inception weights', 'bench', [
        *Q, '--what=inception', '--inception_weights={tmp}/nope.msgpack'],
     r'--inception_weights: FID Inception weights not found .*convert_inception'),
    ('traceback: bench garbage Inception weights', 'bench', [
        *Q, '--what=fid', '--inception_weights={tmp}/garbage.msgpack'],
     r'--inception_weights: .*garbage\.msgpack.* is not a msgpack'),
    # Accepted but wrong.
    ('accepted: unknown field in the config file', 'main', ['--config={tmp}/typo_config.py'],
     r'--config=.*typo_config\.py sets config\.training\.learning_rate: no such field; did '
     r'you mean .*config\.training\.lr'),
    ('accepted: unknown block in the config file', 'main', ['--config={tmp}/block_config.py'],
     r'sets config\.optim\.lr: no such field; did you mean config\.training\.lr'),
    ('accepted: unknown eval field in the config file, sampling', 'main', [
        '--config={tmp}/eval_typo_config.py', *SAMPLE],
     r'sets config\.eval\.num_sample: no such field; did you mean config\.eval\.num_samples'),
    ('accepted: unknown field in the config file, bench', 'bench', [
        '--config={tmp}/typo_config.py'], r'sets config\.training\.learning_rate'),
    ('accepted: stray word', 'main', [*Q, 'train'],
     r"'train': unexpected argument .*\(see --help\)"),
    ('accepted: stray word, sampling', 'main', [*Q, *SAMPLE, 'now'], r"'now': unexpected"),
    ('accepted: stray word, bench', 'bench', [*Q, 'sample'], r"'sample': unexpected"),
    ('accepted: stray word, experiment', 'experiment', [*EXPERIMENT, 'go'], r"'go': unexpected"),
    ('accepted: stray word, import', 'import', [*IMPORT, '--input={tmp}/objects.npz', 'x'],
     r"'x': unexpected"),
    ('accepted: data.path with digits', 'main', [*Q, '--config.data.path={tmp}/bad_crc.npz'],
     r"config\.data\.path='.*': is read only when data\.name is npz or folder \(data\.name="
     r"'digits'\)"),
    ('accepted: data.tfds_data_dir with npz', 'main', [
        *Q, '--config.data.name=npz', '--config.data.path={tmp}/bad_crc.npz',
        '--config.data.tfds_data_dir={tmp}'], r'config\.data\.tfds_data_dir=.*TFDS'),
    ('accepted: data.split with digits', 'main', [*Q, '--config.data.split=test'],
     r"config\.data\.split='test': is read only for TFDS"),
    ('accepted: skip_unreadable with digits', 'main', [*Q, '--config.data.skip_unreadable=True'],
     r'config\.data\.skip_unreadable=True'),
    ('accepted: teacher with objective dpm', 'main', [*Q, '--config.teacher={run}'],
     r"config\.teacher=.*: is read only by objective=cd \(objective='dpm'\)"),
    ('accepted: teacher with objective ct', 'main', [
        *Q, '--config.objective=ct', '--config.teacher={run}'], r"objective='ct'"),
    ('accepted: eps_scale nan', 'main', [*Q, *SAMPLE, '--config.eval.eps_scale=nan'],
     r'config\.eval\.eps_scale=nan: must be a finite number > 0'),
    ('accepted: eps_scale -inf', 'main', [*Q, *SAMPLE, '--config.eval.eps_scale=-inf'],
     r'config\.eval\.eps_scale=-inf'),
    ('accepted: eps_scale inf, training', 'main', [*Q, '--config.eval.eps_scale=inf'],
     r'config\.eval\.eps_scale=inf'),
    ('accepted: eps_scales 0, training', 'main', [*Q, '--config.eval.eps_scales=(1.0,0.0)'],
     r'config\.eval\.eps_scales=0\.0'),
    ('accepted: negative eval seed', 'main', [*Q, *SAMPLE, '--config.eval.seed=-1'],
     r'config\.eval\.seed=-1: must be an integer in \[0, 2\*\*32\)'),
    ('accepted: negative eval seed, probe', 'main', [*Q, *PROBE, '--config.eval.seed=-7'],
     r'config\.eval\.seed=-7'),
    ('accepted: negative eval seed, training', 'main', [*Q, '--config.eval.seed=-2'],
     r'config\.eval\.seed=-2'),
    ('accepted: negative eval seed, experiment', 'experiment', [
        *EXPERIMENT, '--eval_seed=-5'], r'config\.eval\.seed=-5'),
    ('accepted: unknown eval.sampler, training', 'main', [*Q, '--config.eval.sampler=euler'],
     r"config\.eval\.sampler='euler': must be one of ancestral, ddim, dpm_solver\+\+"),
    ('accepted: unknown sampler in eval.samplers, training', 'main', [
        *Q, "--config.eval.samplers=('ddim','heun')"], r"config\.eval\.samplers='heun'"),
    # Usage dumps: one line and a pointer to --help.
    ('usage: bench unknown part', 'bench', [*Q, '--what=train,speed'],
     r'--what: unknown part\(s\) speed; allowed: .* \(see --help\)$'),
    ('usage: bench unknown flag', 'bench', [*Q, '--variant=free:3'],
     r"Unknown command line flag 'variant'.*\(see --help\)$"),
    ('usage: bench without --config', 'bench', ['--what=train'],
     r'--config is required \(see --help\)$'),
    ('usage: bench bad variant', 'bench', [*Q, '--variants=free'], r'free needs K'),
    ('usage: bench side_by_side with one worker', 'bench', [
        *Q, '--what=side_by_side', '--workers=1'],
     r'--workers=1: the side_by_side part needs 2 or more workers'),
    ('usage: experiment negative workers', 'experiment', [*EXPERIMENT, '--workers=-1'],
     r'--workers=-1: give 0 \(one per CPU core\) or a positive count'),
    ('usage: bench bad sampler', 'bench', [*Q, '--samplers=euler'], r'--samplers: unknown euler'),
    ('usage: bench steps 0', 'bench', [*Q, '--steps=0'], r'--steps=0: .*\(see --help\)$'),
    ('usage: experiment bad probe', 'experiment', [*EXPERIMENT, '--probe=ddim'],
     r"--probe='ddim': expected sampler:NFE"),
    ('usage: experiment seeds not integers', 'experiment', [*EXPERIMENT, '--seeds=a,b'],
     r'--seeds: integers expected'),
    ('usage: experiment unknown regime', 'experiment', [*EXPERIMENT, '--regime=long'],
     r'--regime=long: value should be one of'),
    ('usage: experiment cd without base', 'experiment', [
        *Q, '--workdir={out}/experiment', '--regime=cd'], r'--regime=cd needs --base'),
    ('usage: experiment unknown arm', 'experiment', [*EXPERIMENT, '--arms=standard,nope'],
     r'unknown arm\(s\) nope'),
    ('usage: experiment without --workdir', 'experiment', [*Q], r'--workdir is required'),
    ('usage: import without --input', 'import', IMPORT, r'--input is required \(see --help\)'),
    ('usage: import bad attention order', 'import', [
        *IMPORT, '--input={tmp}/objects.npz', '--attention_order=newest'],
     r'--attention_order=newest: value should be one of'),
    ('usage: main unknown mode', 'main', [*Q, '--mode=serve'], r'--mode=serve: value should'),
    # Misleading lines: a damaged checkpoint is named as damaged, and kept.
    ('misleading: resume from a garbled only checkpoint', 'main', [*Q, '--workdir={damaged}'],
     r'cannot restore checkpoint step 1 from .*damaged/checkpoints: the checkpoint is '
     r'damaged: its metadata .* It was kept as it was'),
    ('misleading: resume from a truncated only checkpoint', 'main', [
        *Q, '--workdir={truncated}'],
     r'checkpoint step 1 .*truncated/checkpoints: the checkpoint is damaged.* kept as it was'),
    ('misleading: resume a CD run from a garbled only checkpoint', 'main', [
        *CD, '--config.teacher={run}', '--workdir={tmp}/cd_damaged'],
     r'cannot restore checkpoint step 1 from .*cd_damaged/checkpoints: the checkpoint is '
     r'damaged'),
    ('misleading: sample from a garbled checkpoint', 'main', [
        *Q, *TINY_EVAL, '--mode=sample', '--workdir={damaged}'],
     r'cannot read the checkpoint in .*damaged/checkpoints/1: the checkpoint is damaged.* '
     r'left as it was'),
    ('misleading: sample from a checkpoint whose JSON metadata is cut', 'main', [
        *Q, *TINY_EVAL, '--mode=sample', '--workdir={tmp}/json_damaged'],
     r'the checkpoint is damaged: its metadata cannot be read \(_METADATA: '),
    ('misleading: eval of a garbled checkpoint', 'main', [
        *Q, *TINY_EVAL, '--mode=eval', '--workdir={damaged}'], r'the checkpoint is damaged'),
    ('misleading: probe of a garbled checkpoint', 'main', [
        *Q, *TINY_EVAL, '--mode=probe', '--workdir={damaged}'], r'the checkpoint is damaged'),
    ('misleading: init_from a garbled checkpoint', 'main', [
        *Q, '--config.init_from={damaged}'],
     r"config\.init_from='.*damaged': .*the checkpoint is damaged"),
    ('misleading: CD teacher with a garbled checkpoint', 'main', [
        *CD, '--config.teacher={damaged}'],
     r"config\.teacher='.*damaged': .*the checkpoint is damaged"),
    ('misleading: experiment base with a garbled checkpoint', 'experiment', [
        *Q, '--workdir={out}/experiment', '--regime=short', '--base={damaged}'],
     r'the checkpoint is damaged'),
    # Compiles before the error: probe options, a CD teacher of another network.
    ('compiles: probe radius', 'main', [*Q, *PROBE, '--config.probe.radii=(-1.0,)'],
     r'config\.probe\.radii=\(-1\.0,\): must be one or more numbers > 0'),
    ('compiles: probe attack step', 'main', [*Q, *PROBE, '--config.probe.attack_at=(99,)'],
     r'config\.probe\.attack_at=\(99,\)'),
    ('compiles: probe unknown probe', 'main', [*Q, *PROBE, "--config.probe.run=('speed',)"],
     r'config\.probe\.run='),
    ('compiles: probe samples 0', 'main', [*Q, *PROBE, '--config.probe.num_samples=0'],
     r'config\.probe\.num_samples=0'),
    ('compiles: CD teacher of another network', 'main', [
        *CD, '--config.teacher={tmp}/wide_run_ckpt'],
     r'config\.model\.ch=32: the run config\.teacher=.*wide_run_ckpt.* has model\.ch=128'),
    ('compiles: CD teacher that is a CD run', 'main', [
        *CD, '--config.teacher={tmp}/cd_run'], r'a teacher must be a DPM run'),
]
_CLASSES = ('hang', 'traceback', 'accepted', 'usage', 'misleading', 'compiles')
_COMMANDS = {'main': 'atdiff_jax.main', 'bench': 'atdiff_jax.bench.__main__',
             'import': 'atdiff_jax.tools.import_adm',
             'experiment': 'atdiff_jax.experiments.at_vs_standard'}
# The first table: training command lines, the quickstart config unless they name one.
ALL_BAD_INPUTS = [
    (name, 'main', args if args is None or any(a.startswith('--config=') for a in args)
     else QUICK + args, message) for name, args, message in BAD_INPUTS] + NEW_BAD_INPUTS


def _write_run(workdir, config):
  """A run as training leaves it (config.json and checkpoint 1, all zeros), written without
  compiling a train step."""
  state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                       abstract_state(config, TrainParts.build(config)))
  ckpt = checkpoint.Checkpointer(str(workdir), keep=1, async_save=False)
  ckpt.save(1, state)
  ckpt.close()
  checkpoint.save_config(str(workdir), config)


@pytest.fixture(scope='module')
def bad_files(tmp_path_factory):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from atdiff_jax.command_line import load_config_file  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp('bad_inputs')
  with open(tmp / 'single.npz', 'wb') as f:  # np.save'd, then renamed
    np.save(f, np.zeros((4, 8, 8, 1), np.uint8))
  png = lambda path, value: Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
  for folder in ('images', 'loop_self', 'loop_two', 'loop_parent'):
    (tmp / folder).mkdir()
    png(tmp / folder / 'ok0.png', 0)
    (tmp / folder / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
  png(tmp / 'images' / 'ok1.png', 60)
  png(tmp / 'loop_self' / 'ok1.png', 60)
  png(tmp / 'loop_two' / 'ok1.png', 60)
  (tmp / 'loop_parent' / 'sub').mkdir()
  png(tmp / 'loop_parent' / 'sub' / 'ok1.png', 60)
  os.symlink('.', tmp / 'loop_self' / 'a')
  os.symlink('.', tmp / 'loop_two' / 'a')
  os.symlink('.', tmp / 'loop_two' / 'b')
  os.symlink('..', tmp / 'loop_parent' / 'sub' / 'up')
  with open(tmp / 'objects.npz', 'wb') as f:
    np.savez(f, images=np.array([np.zeros((8, 8)), 'x'], dtype=object))
  with open(tmp / 'object_labels.npz', 'wb') as f:
    np.savez(f, images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.array([1, 'a'], object))
  np.savez(tmp / 'bad_crc.npz', images=np.zeros((40, 8, 8, 1), np.uint8))
  crc = bytearray((tmp / 'bad_crc.npz').read_bytes())
  crc[200] ^= 0xFF  # inside the array data: the zip's CRC no longer matches
  (tmp / 'bad_crc.npz').write_bytes(bytes(crc))
  (tmp / 'garbage_stats.npz').write_bytes(b'PK not a zip')
  np.savez(tmp / 'wrong_stats.npz', mu=np.zeros(3), sigma=np.eye(2))
  (tmp / 'garbage.msgpack').write_bytes(b'\x00\x01 not msgpack')
  (tmp / 'a_file').write_text('not a folder')
  (tmp / 'file_run').mkdir()
  (tmp / 'file_run' / 'checkpoints').write_text('not a folder')
  for name, text in [('samples_broken', '{oops'), ('samples_list', '[]')]:
    (tmp / name).mkdir()
    (tmp / name / 'samples.json').write_text(text)
  for name, text in [('garbled_config', 'not json{'), ('list_config', '[1, 2]'),
                     ('no_blocks', '{"model": 3}'), ('binary_config', '\udcff')]:
    (tmp / name / 'checkpoints').mkdir(parents=True)
    (tmp / name / 'config.json').write_bytes(text.encode('utf-8', 'surrogateescape'))
  (tmp / 'config_folder' / 'config.json').mkdir(parents=True)
  quick = load_config_file('configs/quickstart.py')
  bad_field = json.loads(quick.to_json_best_effort())
  bad_field['model']['ch'] = 'wide'
  (tmp / 'bad_field').mkdir()
  (tmp / 'bad_field' / 'config.json').write_text(json.dumps(bad_field))
  for name, body in [('typo_config', 'config.training.learning_rate = 1e-3'),
                     ('block_config', 'config.optim = ml_collections.ConfigDict({"lr": 1.0})'),
                     ('eval_typo_config', 'config.eval.num_sample = 8'),
                     ('t_end_config', 'config.eval.sampler_options.dpm_solver_pp.t_end = 1e-4')]:
    (tmp / f'{name}.py').write_text(
        'import ml_collections\nfrom configs import quickstart\n\n\ndef get_config():\n'
        f'  config = quickstart.get_config()\n  {body}\n  return config\n')
  wide = tiny_config()
  wide.model.ch = 128
  (tmp / 'wide_run').mkdir()
  checkpoint.save_config(str(tmp / 'wide_run'), wide)
  wide_quick = quick.copy_and_resolve_references()
  wide_quick.model.ch = 128
  _write_run(tmp / 'wide_run_ckpt', wide_quick)
  cd_run = load_config_file('configs/quickstart_cd.py')
  (tmp / 'cd_run' / 'checkpoints').mkdir(parents=True)
  checkpoint.save_config(str(tmp / 'cd_run'), cd_run)
  _write_run(tmp / 'run', quick)
  for name, how in [('damaged', 'garbled'), ('truncated', 'truncated')]:
    shutil.copytree(tmp / 'run', tmp / name)
    _damage(tmp / name / 'checkpoints' / '1', how)
  cd_damaged = copy.deepcopy(cd_run)
  cd_damaged.teacher = str(tmp / 'run')  # as the command resumes it: the same run
  _write_run(tmp / 'cd_damaged', cd_damaged)
  _damage(tmp / 'cd_damaged' / 'checkpoints' / '1', 'garbled')
  shutil.copytree(tmp / 'run', tmp / 'json_damaged')
  (tmp / 'json_damaged' / 'checkpoints' / '1' / 'default' / '_METADATA').write_text('{"tree')
  shutil.copytree(tmp / 'run', tmp / 'bad_results')
  (tmp / 'bad_results' / 'eval').mkdir()
  (tmp / 'bad_results' / 'eval' / 'results.json').write_text('{"rows": ')
  return tmp


def _tree(root):
  """Every path under `root` with its size and modification time (links not followed)."""
  found = {}
  for directory, subdirs, files in os.walk(root):
    for name in subdirs + files:
      path = os.path.join(directory, name)
      stat = os.lstat(path)
      found[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
  return found


def test_the_table_has_every_class_of_the_sweep():
  assert len(BAD_INPUTS) >= 40
  counts = {c: sum(name.startswith(f'{c}:') for name, *_ in NEW_BAD_INPUTS) for c in _CLASSES}
  assert all(n >= 4 for n in counts.values()), counts
  assert {command for _, command, _, _ in NEW_BAD_INPUTS} == set(_COMMANDS)


@pytest.mark.parametrize('name,command,args,message', ALL_BAD_INPUTS,
                         ids=[c[0] for c in ALL_BAD_INPUTS])
def test_bad_input_is_one_line_before_anything_compiles(name, command, args, message,
                                                       bad_files, tmp_path, capsys):
  """Exit code 2, one line `error: ...` that says what is wrong, nothing compiled, nothing
  written to a new workdir and no file of an existing run (or any input) changed."""
  tmp = str(bad_files)
  if args is None:  # the workdir itself is the problem
    args = [*QUICK, f'--workdir={tmp}/a_file/run']
  workdir = str(tmp_path / 'run')
  places = {'{tmp}': tmp, '{run}': f'{tmp}/run', '{damaged}': f'{tmp}/damaged',
            '{truncated}': f'{tmp}/truncated', '{out}': str(tmp_path)}
  for key, value in places.items():
    args = [a.replace(key, value) for a in args]
  if command == 'main' and not any(a.startswith('--workdir=') for a in args):
    args.append(f'--workdir={workdir}')
  module = importlib.import_module(_COMMANDS[command])
  before = _tree(tmp)
  with no_compiles('backend_compile'):
    code = module.cli([_COMMANDS[command], *args])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2, err
  assert len(err) == 1 and err[0].startswith('error: '), err
  assert re.search(message, err[0]), err[0]
  written = os.path.join(workdir, 'checkpoints')
  assert not os.path.isdir(written) or not os.listdir(written), name
  assert not os.path.exists(os.path.join(workdir, 'config.json')), name
  assert _tree(tmp) == before, name  # no checkpoint moved, deleted or overwritten

