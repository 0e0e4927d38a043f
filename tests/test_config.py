"""Bad configs stop before anything compiles, with one line naming the field."""
import copy
import importlib
import os

import pytest

import conftest
from atdiff_jax import config as config_lib
from atdiff_jax import train


def _set(config, field, value):
  *parents, leaf = field.split('.')
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


BAD_CASES = [
    ('training.batch_size', 12, r'training.batch_size=12: must be divisible by the number of devices \(8\)'),
    ('diffusion.schedule', 'quadratic', r'diffusion.schedule=.quadratic.: must be one of linear, cosine'),
    ('data.image_size', 9, r'data.image_size=9: must be divisible by 2\*\*1'),
    ('model.attn_resolutions', (3,), r'model.attn_resolutions=\(3,\): 3 is not a feature-map size'),
    ('training.lr', -1e-4, r'training.lr=-0.0001: must be > 0'),
    ('training.ema_rates', (1.5,), r'training.ema_rates=\(1.5,\): must be a non-empty tuple of rates'),
    ('training.warmup_steps', -5, r'training.warmup_steps=-5: must be >= 0'),
    ('training.timestep_sampler', 'importance', r'must be one of uniform, loss_second_moment'),
    ('model.ch', 40, r'model.ch=40: times every ch_mult must be a multiple of 32'),
    ('model.dtype', 'float16', r'model.dtype=.float16.: must be one of float32, bfloat16'),
    ('model.dropout', 1.0, r'model.dropout=1.0: must be in \[0, 1\)'),
    ('model.remat', 'full', r'model.remat=.full.: must be one of none, attention, blocks'),
    ('model.timestep_scale', 0.0, r'model.timestep_scale=0.0: must be > 0'),
    ('model.num_heads_upsample', 0, r'model.num_heads_upsample=0: must be > 0'),
    ('adv.method', 'freelb', r'adv.method=.freelb.: must be one of none, free, pgd, fgsm'),
    ('adv.norm', 'l1', r'adv.norm=.l1.: must be one of l2, linf'),
    ('adv.target', 'x0', r'adv.target=.x0.: must be one of original, delta, delta_detach'),
    ('adv.radius', -0.1, r'adv.radius=-0.1: must be >= 0'),
    ('adv.steps', 0, r'adv.steps=0: must be > 0'),
    ('adv.t_range', (50, 10), r'adv.t_range=\(50, 10\): must satisfy 0 <= t_min <= t_max'),
    ('training.profile', (3,), r'training.profile=\(3,\): must be \(first minibatch, count\)'),
    ('training.profile', (-1, 2), r'training.profile=\(-1, 2\): must be'),
    ('training.minibatches_per_call', 0, r'training.minibatches_per_call=0: must be > 0'),
    ('training.minibatches_per_call', -2, r'training.minibatches_per_call=-2: must be > 0'),
    ('adv.radius_scale', 'per_pixel', r'must be one of per_dim, absolute'),
    ('adv.init', 'gaussian', r'must be one of zero, uniform'),
    ('adv.radius_schedule', 'linear', r'adv.radius_schedule=.linear.: must be one of constant, '
     'sigma'),
    ('adv.replay_loop', 'scan', r'adv.replay_loop=.scan.: must be one of auto, unrolled, rolled'),
    ('input_perturbation.gamma', -0.1, r'input_perturbation.gamma=-0.1: must be >= 0'),
    ('training.sample_steps', 500, r'training.sample_steps=500: must be <= diffusion.num_timesteps'),
]


@pytest.mark.parametrize('field,value,message', BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_value_names_the_field(config, field, value, message):
  _set(config, field, value)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate_training(config, num_devices=8)


def test_every_shipped_config_is_valid():
  for name in sorted(os.listdir('configs')):
    if (name.endswith('.py') and not name.endswith('_recipe.py')
        and name not in ('__init__.py', 'default.py')):
      config = importlib.import_module(f'configs.{name[:-3]}').get_config()
      devices = 8 if config.training.batch_size % 8 == 0 else 1
      config_lib.validate_training(config, num_devices=devices)


@pytest.mark.parametrize('field,value,message', [
    ('data.path', '/no/such/file.npz', r'config.data.path: no such file'),
    ('data.name', 'no_such_dataset_xyz', r'config.data.name'),
    ('data.image_size', 16, r'config.data.image_size'),
])
def test_bad_data_stops_training_before_compiling(config, tmp_path, field, value, message):
  if field == 'data.path':
    config.data.name = 'npz'
  _set(config, field, value)
  if field == 'data.image_size':
    config.model.attn_resolutions = (8,)
  with conftest.no_compiles(), pytest.raises(config_lib.ConfigError, match=message):
    train.train(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_class_conditional_model_needs_labels(config, tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  np.savez(tmp_path / 'x.npz', images=np.zeros((32, 8, 8, 1), np.uint8))
  config.data.name, config.data.path = 'npz', str(tmp_path / 'x.npz')
  config.model.num_classes = 10
  with pytest.raises(config_lib.ConfigError, match='has no labels'):
    train.train(config, str(tmp_path / 'run'))


def test_paper_at_recipe():
  from configs import cifar10_adm_at  # pylint: disable=g-import-not-at-top
  config = cifar10_adm_at.get_config()
  adv = config.adv
  assert (adv.method, adv.norm, adv.steps, adv.step_size, adv.radius, adv.radius_scale,
          adv.init, adv.target) == ('free', 'l2', 3, 0.1, 0.1, 'per_dim', 'zero', 'delta_detach')
  assert config.training.timestep_sampler == 'loss_second_moment'
  assert config.model.ch == 128 and config.data.image_size == 32


def test_runs_from_before_the_later_model_fields_still_load(config, tmp_path):
  """A config.json without num_heads_upsample, timestep_scale and remat builds the network it
  trained, and equals a config that spells their defaults out."""
  from atdiff_jax import checkpoint, models  # pylint: disable=g-import-not-at-top
  from atdiff_jax.evaluation import settings as eval_settings  # pylint: disable=g-import-not-at-top
  from atdiff_jax.objectives import cm as consistency  # pylint: disable=g-import-not-at-top
  old = copy.deepcopy(config)
  for field in config_lib.LATER_MODEL_FIELDS:
    del old.model[field]
  config_lib.validate_training(old, num_devices=8)
  model = models.create_model(old)
  assert (model.num_heads_upsample, model.timestep_scale, model.remat) == (-1, 1.0, 'none')
  checkpoint.save_config(str(tmp_path), old)
  eval_settings.resolve_config(str(tmp_path), override=config)  # no "another model" error
  config.objective, config.teacher = 'cd', str(tmp_path)
  config.model.remat = 'blocks'  # how the student computes, not what
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoint found'):  # models match
    consistency.teacher_problems(config)
