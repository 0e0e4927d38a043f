"""The host loop: learning, exact resume, init_from, clean stop, checkpoint errors."""
import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atdiff_jax import checkpoint, config as config_lib, train
from atdiff_jax.objectives import dpm
from atdiff_jax.models import create_model, make_apply_fn
from atdiff_jax.diffusion import diffusion_of as make_diffusion
from atdiff_jax.parallel import make_mesh
from atdiff_jax.train_step import TrainParts, create_train_state
from conftest import assert_trees_equal


@pytest.fixture
def config(config):
  """The loop's plumbing needs neither attention nor a second resolution: quicker compiles."""
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = ()
  return config



def _fixed_eval_loss(config, params):
  """The hybrid loss on a fixed draw of (x0, t, eps): comparable across params."""
  from atdiff_jax import data  # pylint: disable=g-import-not-at-top
  images, _ = data.create_source(config.data).get(np.arange(256))
  x0 = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  rng = np.random.default_rng(0)
  batch = {
      'x0': x0,
      't': jnp.asarray(rng.integers(0, config.diffusion.num_timesteps, 256), jnp.int32),
      'noise': jnp.asarray(rng.standard_normal(x0.shape), jnp.float32),
      'weights': jnp.ones((256,)),
  }
  loss_fn = dpm.make_loss_fn(make_apply_fn(create_model(config)), make_diffusion(config),
                             learn_sigma=True, rescale_vb=True, train=False)
  return float(loss_fn(params, batch, None, None)[0])


def test_short_run_lowers_the_loss(config, tmp_path):
  config.training.num_steps = 40
  config.training.log_every = 20
  config.training.checkpoint_every = 40
  config.training.lr = 2e-3
  initial = create_train_state(config, make_mesh(), TrainParts.build(config))
  state = train.train(config, str(tmp_path))
  before = _fixed_eval_loss(config, initial.params)
  after = _fixed_eval_loss(config, state.params)
  assert after < 0.7 * before, (before, after)
  assert int(state.step) == 40
  assert os.path.isdir(tmp_path / 'checkpoints' / '40')
  assert os.listdir(tmp_path / 'tensorboard')


def test_resume_reaches_the_same_state(config, tmp_path):
  """Stopped at step 2 and restarted, a run ends where an uninterrupted one does."""
  config.training.timestep_sampler = 'loss_second_moment'
  config.data.random_flip = True
  config.training.num_steps = 4
  straight = train.train(config, str(tmp_path / 'straight'))

  config.training.num_steps = 2
  train.train(config, str(tmp_path / 'resumed'))
  config.training.num_steps = 4
  resumed = train.train(config, str(tmp_path / 'resumed'))
  assert_trees_equal(straight, resumed)


def test_checkpoint_of_the_old_layout_resumes(config, tmp_path):
  """Checkpoints written when the objective's state was the train state's sampler_state
  resume, and the run continues exactly as an uninterrupted one."""
  import flax  # pylint: disable=g-import-not-at-top
  from typing import Any  # pylint: disable=g-import-not-at-top

  @flax.struct.dataclass
  class OldTrainState:  # TrainState as its first checkpoints stored it
    step: Any
    opt_step: Any
    params: Any
    opt_state: Any
    ema_params: tuple
    sampler_state: Any

  config.training.timestep_sampler = 'loss_second_moment'
  config.training.num_steps = 4
  straight = train.train(config, str(tmp_path / 'straight'))
  config.training.num_steps = 2
  at_two = train.train(config, str(tmp_path / 'new'))
  old = OldTrainState(at_two.step, at_two.opt_step, at_two.params, at_two.opt_state,
                      at_two.ema_params, at_two.objective_state)
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'old'), keep=2, async_save=False)
  ckpt.save(2, old)
  ckpt.close()
  config.training.num_steps = 4
  resumed = train.train(config, str(tmp_path / 'old'))
  assert int(np.sum(resumed.objective_state.counts)) == 4 * config.training.batch_size
  assert_trees_equal(straight, resumed)


def test_stop_request_checkpoints_and_resumes(config, tmp_path, monkeypatch):
  config.training.num_steps = 6
  config.training.checkpoint_every = 100

  class StopAfterTwo(train.StopRequest):
    checks = 0

    @property
    def requested(self):
      StopAfterTwo.checks += 1
      return StopAfterTwo.checks >= 2

    @requested.setter
    def requested(self, value):
      pass

  monkeypatch.setattr(train, 'StopRequest', StopAfterTwo)
  stopped = train.train(config, str(tmp_path))
  assert int(stopped.step) == 2
  assert checkpoint.Checkpointer(str(tmp_path), 3).latest_step() == 2
  monkeypatch.undo()
  finished = train.train(config, str(tmp_path))
  assert int(finished.step) == 6


def test_checkpoint_round_trip(config, tmp_path):
  mesh = make_mesh()
  state = create_train_state(config, mesh, TrainParts.build(config))
  state = state.replace(step=state.step + 7)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(7, state)
  ckpt.wait()
  restored = ckpt.restore(jax.eval_shape(lambda: state))
  ckpt.close()
  assert_trees_equal(state, restored)


def test_init_from_takes_weights_and_a_fresh_optimizer(config, tmp_path):
  config.training.num_steps = 2
  source = train.train(config, str(tmp_path / 'source'))
  config.init_from = str(tmp_path / 'source')
  config.training.ema_rates = (0.9, 0.99)  # more rates than the source kept
  mesh = make_mesh()
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'target'), keep=2)
  parts = TrainParts.build(config)
  state = train._initial_state(config, mesh, parts, ckpt)  # pylint: disable=protected-access
  ckpt.close()
  assert_trees_equal(state.params, source.params)
  assert_trees_equal(state.ema_params[0], source.ema_params[0])
  assert_trees_equal(state.ema_params[1], source.ema_params[0])
  assert int(state.step) == 0 and int(state.opt_step) == 0
  assert_trees_equal(state.opt_state, parts.tx.init(source.params))


def test_corrupt_checkpoint_is_a_clear_error_and_is_kept(config, tmp_path):
  config.training.num_steps = 2
  train.train(config, str(tmp_path))
  step_dir = tmp_path / 'checkpoints' / '2'
  files = sorted(str(p) for p in step_dir.rglob('*') if p.is_file())
  for path in files:
    if path.endswith('.json') or 'manifest' in path or 'ocdbt' in path:
      with open(path, 'wb') as f:
        f.write(b'garbage')
  snapshot = {p: open(p, 'rb').read() for p in files}
  config.training.num_steps = 4
  with pytest.raises(checkpoint.CheckpointError, match='cannot restore checkpoint step 2'):
    train.train(config, str(tmp_path))
  assert {p: open(p, 'rb').read() for p in files} == snapshot


def test_missing_init_from_is_a_clear_error(config, tmp_path):
  config.init_from = str(tmp_path / 'nowhere')
  with pytest.raises(checkpoint.CheckpointError, match='does not exist'):
    train.train(config, str(tmp_path / 'run'))


def test_init_from_a_run_of_another_network_names_the_field(config, tmp_path):
  """Same shapes, other network: an imported improved-diffusion run sees t * 1000 / T, and
  fine-tuning it with timestep_scale 1 would load without a shape error."""
  other = copy.deepcopy(config)
  other.model.timestep_scale = 0.25
  source = tmp_path / 'source'
  os.makedirs(source)
  checkpoint.save_config(str(source), other)
  config.init_from = str(source)
  with pytest.raises(config_lib.ConfigError,
                     match=r'config.model.timestep_scale=1.0: the run config.init_from=.*'
                           r'has model.timestep_scale=0.25; fine-tuning starts'):
    train.train(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints' / '0')


def test_profile_traces_the_chosen_minibatches_only(config, tmp_path, monkeypatch):
  """training.profile = (first, count): one trace, started before minibatch `first` and
  stopped after minibatch first + count - 1, into WORKDIR/profile."""
  calls = []
  monkeypatch.setattr(jax.profiler, 'start_trace', lambda d: calls.append(('start', d)))
  monkeypatch.setattr(jax.profiler, 'stop_trace', lambda: calls.append(('stop',)))
  steps = []
  real_step = train.make_train_step

  def counting_step(*args):
    step = real_step(*args)
    return lambda state, batch, frozen: (steps.append(len(calls)), step(state, batch,
                                                                         frozen))[1]

  monkeypatch.setattr(train, 'make_train_step', counting_step)
  config.training.profile = (1, 2)
  train.train(config, str(tmp_path))
  assert calls == [('start', os.path.join(str(tmp_path), 'profile')), ('stop',)]
  assert steps == [0, 1, 1, 2]  # minibatches 1 and 2 ran inside the trace, 0 and 3 outside


def test_call_sizes_stop_at_every_point_the_loop_acts_on(config):
  """Calls of up to M minibatches, cut short at log, save, sample, profile and end points."""
  training = config.training
  training.log_every, training.checkpoint_every, training.sample_every = 6, 9, 0
  training.num_steps, training.profile = 20, (13, 2)
  size = train.call_sizes(training, 4)
  step, ends = 0, []
  while step < training.num_steps:
    step += size(step)
    ends.append(step)
  assert ends == [4, 6, 9, 12, 13, 15, 18, 20]
  assert all(size(s) <= 4 for s in range(40))
  aligned = train.call_sizes(training.copy_and_resolve_references(), 3)
  assert [aligned(s) for s in (0, 3, 6)] == [3, 3, 3]


def test_several_minibatches_per_call_train_as_one_per_call(config, tmp_path):
  """training.minibatches_per_call = 3 runs the same minibatches with the same draws as one
  call per minibatch, through a resume at a point that is not a multiple of 3 (calls of 3,
  1, 1, then 3). The loss history (one entry per minibatch's losses) agrees to float
  rounding; Adam's first updates, near sign(g), turn rounding into a few percent of the
  params' movement (test_train_step checks the stacked step tightly with SGD), where
  another minibatch order or draw would move them as much as training does."""
  config.adv.method, config.adv.steps = 'free', 2
  config.training.timestep_sampler = 'loss_second_moment'
  config.data.random_flip = True
  config.training.num_steps, config.training.log_every = 8, 4
  config.training.checkpoint_every = 100
  straight = train.train(config, str(tmp_path / 'one'))

  config.training.minibatches_per_call = 3
  config.training.num_steps = 5
  train.train(config, str(tmp_path / 'three'))
  config.training.num_steps = 8
  stacked = train.train(config, str(tmp_path / 'three'))
  assert int(stacked.step) == 8 and int(stacked.opt_step) == int(straight.opt_step)
  assert_trees_equal(straight.objective_state, stacked.objective_state, rtol=1e-5)
  initial = create_train_state(config, make_mesh(), TrainParts.build(config))
  gap = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(
      jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))))
  assert gap(straight.params, stacked.params) < 0.1 * gap(straight.params, initial.params)
