"""Importing guided-diffusion / improved-diffusion checkpoints (atdiff_jax.convert).

State dicts are built here from random params with the exporter (the real key names, both
attention orders), so no torch is needed. With ATDIFF_GD_FIXTURE=DIR the importer is also
checked against outputs of guided-diffusion itself (see test_reproduces_gd_fixture).
"""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from atdiff_jax import checkpoint, convert, evaluation
from atdiff_jax.convert import adm_params, adm_run
from atdiff_jax.models import create_model
from atdiff_jax.models.layers import AttentionBlock
from atdiff_jax.models.unet import count_params
from conftest import assert_trees_equal, tiny_config

from configs import imagenet64_adm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_ENV = 'ATDIFF_GD_FIXTURE'
# guided-diffusion's README flags of 64x64_diffusion.pt (ImageNet 64, class-conditional).
IMAGENET64_FLAGS = (
    '--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 '
    '--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 '
    '--num_head_channels 64 --num_res_blocks 3 --resblock_updown True '
    '--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True')
# improved-diffusion's README flags of cifar10_uncond_50M_500K.pt.
CIFAR10_FLAGS = ('--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True '
                 '--dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine')


def cond_new_config():
  """Class-conditional, learned sigma, resblock up/down, FiLM norm: the 64x64 model's kind."""
  config = tiny_config()
  config.data.channels = 3
  config.model.num_classes = 5
  return config


def uncond_legacy_config():
  """Unconditional, fixed sigma, conv resampling, additive embedding, num_heads with more
  heads in the decoder; attention at 8 and 2 pixels but not 4, so one upsampler follows an
  attention block and one does not."""
  config = tiny_config()
  config.data.channels = 3
  m = config.model
  m.ch_mult = (1, 2, 2)
  m.attn_resolutions = (8, 2)
  m.num_head_channels = -1
  m.num_heads = 2
  m.num_heads_upsample = 4
  m.learn_sigma = False
  m.resblock_updown = False
  m.use_scale_shift_norm = False
  return config


CASES = {'cond_new': (cond_new_config, 'new'), 'uncond_legacy': (uncond_legacy_config, 'legacy')}


def random_params(config, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: 0.3 * rng.standard_normal(a.shape).astype(np.float32),
                      adm_params.abstract_params(config))


@functools.lru_cache(maxsize=None)
def _exported(case_name: str, seed: int):
  make_config, order = CASES[case_name]
  params = random_params(make_config(), seed)
  return params, convert.export_params(params, make_config(), order)


def exported(case_name: str, seed: int = 0):
  """(random params, their guided-diffusion state dict) of a case; the dict is a copy."""
  params, state = _exported(case_name, seed)
  return params, dict(state)


@pytest.fixture(params=sorted(CASES))
def case(request):
  make_config, order = CASES[request.param]
  return (make_config(), order) + exported(request.param)


# ------------------------------------------------------------------ the mapping


def test_export_then_import_gives_the_same_params(case):
  config, order, params, state = case
  assert len(state) == len(jax.tree.leaves(params))
  assert_trees_equal(convert.import_params(state, config, order), params)


def test_exported_keys_are_guided_diffusion_names():
  _, state = exported('cond_new')
  shapes = {key: value.shape for key, value in state.items()}
  assert list(state)[:3] == ['time_embed.0.weight', 'time_embed.0.bias', 'time_embed.2.weight']
  assert shapes['label_emb.weight'] == (5, 128)
  assert shapes['input_blocks.0.0.weight'] == (32, 3, 3, 3)                # OIHW
  assert shapes['input_blocks.1.0.emb_layers.1.weight'] == (64, 128)       # (out, in), FiLM
  assert shapes['input_blocks.2.0.in_layers.2.weight'] == (32, 32, 3, 3)   # ResBlock down
  assert shapes['input_blocks.3.1.qkv.weight'] == (192, 64, 1)             # conv1d
  assert shapes['middle_block.1.proj_out.weight'] == (64, 64, 1)
  assert shapes['output_blocks.1.2.out_layers.3.weight'] == (64, 64, 3, 3)  # ResBlock up
  assert shapes['out.2.weight'] == (6, 32, 3, 3)
  assert list(state)[-1] == 'out.2.bias'

  keys = set(exported('uncond_legacy')[1])
  assert {'input_blocks.2.0.op.weight', 'input_blocks.4.0.op.weight'} <= keys  # conv down
  # Upsamplers close their level's last output block, after its attention if it has one.
  assert {'output_blocks.1.1.qkv.weight', 'output_blocks.1.2.conv.weight',
          'output_blocks.3.1.conv.weight'} <= keys
  assert not any(key.startswith(('label_emb', 'output_blocks.3.1.qkv')) for key in keys)


def _layer_norm_groups(x, scale, bias):
  b, c, t = x.shape
  g = x.reshape(b, 32, -1)
  g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
  return g.reshape(b, c, t) * scale[:, None] + bias[:, None]


def gd_attention(x, state, prefix, heads, legacy):
  """guided-diffusion's AttentionBlock in NumPy (N, C, T), from its state dict tensors."""
  get = lambda name: state[f'{prefix}.{name}'].astype(np.float64)
  b, c, t = x.shape
  h = _layer_norm_groups(x, get('norm.weight'), get('norm.bias'))
  qkv = np.einsum('oc,bct->bot', get('qkv.weight')[:, :, 0], h) + get('qkv.bias')[:, None]
  d = c // heads
  if legacy:  # heads first, then q, k, v inside each head
    q, k, v = np.split(qkv.reshape(b * heads, 3 * d, t), 3, axis=1)
  else:       # q, k, v first, then heads
    q, k, v = (a.reshape(b * heads, d, t) for a in np.split(qkv, 3, axis=1))
  logits = np.einsum('bct,bcs->bts', q * d ** -0.25, k * d ** -0.25)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  a = np.einsum('bts,bcs->bct', weights, v).reshape(b, c, t)
  out = np.einsum('oc,bct->bot', get('proj_out.weight')[:, :, 0], a)
  return x + out + get('proj_out.bias')[:, None]


@pytest.mark.parametrize('case_name,block,prefix,heads', [
    ('uncond_legacy', 'down_0_attn_0', 'input_blocks.1.1', 2),
    ('uncond_legacy', 'mid_attn', 'middle_block.1', 2),
    ('uncond_legacy', 'up_0_attn_0', 'output_blocks.4.1', 4),  # num_heads_upsample
    ('cond_new', 'mid_attn', 'middle_block.1', 4),               # num_head_channels 16
])
def test_imported_attention_computes_guided_diffusions_attention(case_name, block, prefix,
                                                                  heads):
  """The qkv reordering is checked against the attention itself, not only by a round trip
  (which any permutation would pass)."""
  make_config, order = CASES[case_name]
  config = make_config()
  _, state = exported(case_name, seed=3)
  params = convert.import_params(state, config, order)[block]
  channels = params['norm']['scale'].shape[0]
  x = np.random.default_rng(4).standard_normal((2, 4, 4, channels)).astype(np.float32)
  ours = AttentionBlock(num_heads=heads).apply({'params': params}, x)
  ref = gd_attention(x.reshape(2, 16, channels).transpose(0, 2, 1).astype(np.float64), state,
                     prefix, heads, legacy=order == 'legacy')
  np.testing.assert_allclose(np.asarray(ours).reshape(2, 16, channels).transpose(0, 2, 1), ref,
                             atol=2e-5)
  if order == 'legacy':  # the other order's reading of the same tensors is far off
    wrong = gd_attention(x.reshape(2, 16, channels).transpose(0, 2, 1).astype(np.float64),
                         state, prefix, heads, legacy=False)
    assert np.abs(wrong - ref).max() > 1e-2


def _import_error(state, config, order='new'):
  with pytest.raises(convert.ConversionError) as info:
    convert.import_params(state, config, order)
  return str(info.value)


def test_every_key_must_be_used_and_every_param_filled():
  config = cond_new_config()
  _, state = exported('cond_new')
  message = _import_error(dict(state, **{'input_blocks.1.0.extra.weight': np.zeros(3)}), config)
  assert message.startswith('the checkpoint does not fit the config: 1 checkpoint keys the '
                            'config does not use (input_blocks.1.0.extra.weight)')
  missing = {k: v for k, v in state.items() if k != 'middle_block.1.qkv.bias'}
  assert '1 keys the config needs that the checkpoint lacks (middle_block.1.qkv.bias)' in (
      _import_error(missing, config))


@pytest.mark.parametrize('field,value,hint', [
    ('model.num_classes', 0, 'model.num_classes'),
    ('model.learn_sigma', False, 'model.learn_sigma'),
    ('model.resblock_updown', False, 'model.resblock_updown'),
    ('model.attn_resolutions', (8, 4), 'model.attn_resolutions'),
    ('model.use_scale_shift_norm', False, 'model.use_scale_shift_norm'),
    ('data.channels', 1, 'data.channels'),
    ('model.num_res_blocks', 2, 'model.ch_mult or model.num_res_blocks'),
])
def test_a_config_that_differs_names_the_field(field, value, hint):
  _, state = exported('cond_new')
  config = cond_new_config()
  block, name = field.split('.')
  config[block][name] = value
  message = _import_error(state, config)
  assert f'does {hint}' in message and '\n' not in message


def test_a_wrong_shape_names_the_key_and_both_shapes():
  config = cond_new_config()
  _, state = exported('cond_new')
  config.model.ch = 64
  config.model.num_head_channels = 32
  assert _import_error(state, config) == (
      'time_embed.0.weight: the checkpoint has shape (128, 32), the config needs (256, 64) '
      '(param time_embed_0/kernel); does model.ch differ?')
  state['label_emb.weight'] = np.zeros((7, 128), np.float32)
  assert _import_error(state, cond_new_config()).startswith(
      'label_emb.weight: the checkpoint has shape (7, 128), the config needs (5, 128)')


# ------------------------------------------------------------------ flags and readers


def _fake_state(classes=1000, ch=192, channels=3):
  """The two tensors the flag translation reads from a checkpoint."""
  state = {'input_blocks.0.0.weight': np.zeros((ch, channels, 3, 3), np.float32)}
  if classes:
    state['label_emb.weight'] = np.zeros((classes, 4 * ch), np.float32)
  return state


def test_imagenet64_readme_flags_give_the_imagenet64_recipe():
  recipe = imagenet64_adm.get_config()
  config, order = convert.run_config(recipe, _fake_state(),
                                     convert.parse_flags(IMAGENET64_FLAGS), None)
  assert order == 'new'
  for field in ('ch', 'ch_mult', 'num_res_blocks', 'attn_resolutions', 'num_head_channels',
                'dropout', 'learn_sigma', 'num_classes', 'resblock_updown',
                'use_scale_shift_norm', 'dtype'):
    assert config.model[field] == recipe.model[field], field
  assert (config.model.remat, config.model.timestep_scale) == ('none', 1.0)
  assert (config.diffusion.num_timesteps, config.diffusion.schedule) == (1000, 'cosine')
  assert count_params(adm_params.abstract_params(config)) == 295_904_454


def test_improved_diffusion_cifar10_flags_with_its_defaults():
  options = convert.parse_flags(CIFAR10_FLAGS, defaults='improved')
  config, order = convert.run_config(tiny_config(), _fake_state(classes=0, ch=128), options,
                                     None)
  m = config.model
  assert order == 'legacy'
  assert (m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions) == (128, (1, 2, 2, 2), 3,
                                                                       (16, 8))
  assert (m.num_heads, m.num_head_channels, m.resblock_updown, m.num_classes) == (4, -1,
                                                                                   False, 0)
  # improved-diffusion fed its network t * 1000 / T.
  assert m.timestep_scale == 0.25 and config.diffusion.num_timesteps == 4000
  assert (config.data.image_size, config.data.channels) == (32, 3)
  # guided-diffusion's defaults do not rescale.
  guided = convert.translate(convert.parse_flags(CIFAR10_FLAGS), _fake_state(0, 128))
  assert guided.fields['model.timestep_scale'] == 1.0


def test_flag_translation_details():
  options = convert.parse_flags('--image_size=64 --attention_resolutions 24,16,3 '
                                '--class_cond true --use_checkpoint 1 --sigma_small True '
                                '--timestep_respacing 250 --channel_mult 1,2,2,2')
  result = convert.translate(options, _fake_state(classes=10, ch=128, channels=1))
  fields = result.fields
  # 24 -> factor 64 // 24 = 2 -> 32 pixels; 3 -> factor 21 matches no level.
  assert fields['model.attn_resolutions'] == (32, 16)
  assert (fields['model.num_classes'], fields['data.channels']) == (10, 1)
  assert fields['model.remat'] == 'blocks' and fields['model.ch_mult'] == (1, 2, 2, 2)
  assert fields['eval.sampler_options.ancestral.fixed_variance'] == 'small'
  assert any('matches no level' in note for note in result.notes)
  assert any('--config.eval.nfe' in note for note in result.notes)


@pytest.mark.parametrize('flags,state,message', [
    ('--num_chanels 3', None, '--num_chanels: not a guided-diffusion model or diffusion flag'),
    ('--class_cond maybe', None, '--class_cond=maybe: expected a boolean'),
    ('--num_channels', None, '--gd_flags: --num_channels has no value'),
    ('--predict_xstart True', None, 'predict the noise'),
    ('--large_size 256', None, 'super-resolution models'),
    ('--image_size 512', None, 'no default --channel_mult'),
    ('--channel_mult 0.5,1,2', None, 'only positive integer multipliers'),
    ('--class_cond True', _fake_state(classes=0), 'has no label_emb.weight'),
    ('', _fake_state(classes=10), 'pass --class_cond True'),
])
def test_bad_flags_give_one_line(flags, state, message):
  with pytest.raises(convert.ConversionError, match=message):
    convert.translate(convert.parse_flags(flags), _fake_state(0) if state is None else state)


def test_npz_reader_casts_to_float32_and_torch_is_optional(tmp_path, monkeypatch):
  path = str(tmp_path / 'model.npz')
  convert.write_npz(path, {'a.weight': np.arange(6, dtype=np.float16).reshape(2, 3)})
  state = convert.read_state_dict(path)
  assert state['a.weight'].dtype == np.float32 and state['a.weight'][1, 2] == 5.0
  (tmp_path / 'model.pt').write_bytes(b'')
  monkeypatch.setitem(sys.modules, 'torch', None)  # as if torch were not installed
  with pytest.raises(convert.ConversionError, match=r"pip install -e '\.\[convert\]'"):
    convert.read_state_dict(str(tmp_path / 'model.pt'))


def test_pt_reader_loads_fp16_state_dicts(tmp_path):
  torch = pytest.importorskip('torch')
  path = str(tmp_path / 'model.pt')
  torch.save({'a.weight': torch.ones(2, 3, dtype=torch.float16)}, path)
  state = convert.read_state_dict(path)
  assert state['a.weight'].dtype == np.float32 and state['a.weight'].sum() == 6.0
  torch.save({'model': {'a.weight': torch.ones(1)}}, path)
  with pytest.raises(convert.ConversionError, match='not a plain state dict'):
    convert.read_state_dict(path)


# ------------------------------------------------------------------ runs


def test_import_writes_nothing_unless_it_succeeds(tmp_path):
  config = cond_new_config()
  npz = str(tmp_path / 'model.npz')
  convert.write_npz(npz, exported('cond_new')[1])
  busy = tmp_path / 'busy'
  busy.mkdir()
  (busy / 'notes.txt').write_text('mine')
  with pytest.raises(convert.ConversionError, match='exists and is not empty'):
    convert.import_run(npz, str(busy), config, attention_order='new')
  assert os.listdir(busy) == ['notes.txt']

  other = cond_new_config()
  other.model.ch_mult = (1, 1)
  with pytest.raises(convert.ConversionError, match='does not fit the config'):
    convert.import_run(npz, str(tmp_path / 'run'), other, attention_order='new')
  with pytest.raises(convert.ConversionError, match='attention order cannot be read'):
    convert.import_run(npz, str(tmp_path / 'run'), config)
  assert sorted(os.listdir(tmp_path)) == ['busy', 'model.npz']  # no run, no staging folder


def test_cli_writes_a_run_that_loads_samples_and_fine_tunes(tmp_path):
  params, state = exported('cond_new')
  npz = str(tmp_path / 'model.npz')
  convert.write_npz(npz, state)
  workdir = str(tmp_path / 'run')
  gd_flags = ('--image_size 8 --num_channels 32 --channel_mult 1,2 --num_res_blocks 1 '
              '--attention_resolutions 4 --num_head_channels 16 --class_cond True '
              '--learn_sigma True --resblock_updown True --use_new_attention_order True '
              '--diffusion_steps 100 --noise_schedule cosine --use_fp16 True')
  command = [sys.executable, '-m', 'atdiff_jax.tools.import_adm', f'--input={npz}',
             '--config=configs/default.py', f'--workdir={workdir}', f'--gd_flags={gd_flags}',
             '--config.model.dtype=float32', '--config.eval.batch_size=8']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(tmp_path)) == ['model.npz', 'run']

  run = evaluation.load_run(workdir)
  assert run.step == 0
  assert (run.config.model.dtype, run.config.model.num_classes) == ('float32', 5)  # kept
  assert_trees_equal(run.params, params)
  assert_trees_equal(evaluation.load_run(workdir, use_ema=False).params, params)
  images = evaluation.generate(run, 8, sampler='ddim', nfe=2, batch_size=8)
  assert images.shape == (8, 8, 8, 3) and images.dtype == np.uint8
  # What --config.init_from=RUN reads.
  abstract = adm_params.abstract_params(run.config)
  restored, ema = checkpoint.restore_weights(workdir, abstract, (abstract,))
  assert_trees_equal(restored, params)
  assert_trees_equal(ema[0], params)
  with open(os.path.join(workdir, checkpoint.CONFIG_FILE)) as f:
    assert json.load(f)['model']['attn_resolutions'] == [4]

  again = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                         env=env)
  assert again.returncode == 2
  assert again.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'exists and is not empty' in again.stderr


def test_state_is_what_training_initialises():
  config = uncond_legacy_config()
  config.training.ema_rates = (0.999, 0.9999)
  params, _ = exported('uncond_legacy')
  state = adm_run.build_state(config, params)
  assert int(state.step) == 0 and int(state.opt_step) == 0
  assert len(state.ema_params) == 2
  for tree in (state.params, *state.ema_params):
    assert_trees_equal(tree, params)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state)
             if np.ndim(x) and np.issubdtype(np.asarray(x).dtype, np.floating))


# ------------------------------------------------------------------ guided-diffusion itself


def _fixture_names():
  directory = os.environ.get(FIXTURE_ENV)
  if not directory:
    return [None]
  names = sorted(name[:-3] for name in os.listdir(directory) if name.endswith('.pt'))
  assert names, f'{FIXTURE_ENV}={directory} holds no .pt fixtures'
  return names


@pytest.mark.parametrize('name', _fixture_names())
def test_reproduces_gd_fixture(name, tmp_path):
  """For each X in $ATDIFF_GD_FIXTURE: X.pt (a guided-diffusion UNetModel state dict), X.json
  ({"create_model_and_diffusion_options": its flags as a dict}) and X_io.npz (x: N,C,H,W
  float32; t: the integer timesteps the network was called with; y: labels, if
  class-conditional; out: the network's output model(x, t, y), N,C,H,W). Needs torch."""
  if name is None:
    pytest.skip(f'set {FIXTURE_ENV} to a folder of guided-diffusion fixtures (X.pt, X.json, '
                'X_io.npz; see this test\'s docstring) to compare with guided-diffusion')
  directory = os.environ[FIXTURE_ENV]
  with open(os.path.join(directory, f'{name}.json')) as f:
    options = convert.complete_options(json.load(f)['create_model_and_diffusion_options'])
  workdir = str(tmp_path / 'run')
  convert.import_run(os.path.join(directory, f'{name}.pt'), workdir, tiny_config(),
                     options=options)
  run = evaluation.load_run(workdir)
  io = np.load(os.path.join(directory, f'{name}_io.npz'))
  # The network itself, in float32, called with the timesteps it was given there.
  model = create_model(run.config).clone(dtype=jnp.float32, timestep_scale=1.0)
  y = jnp.asarray(io['y']) if 'y' in io.files else None
  out = model.apply({'params': run.params}, jnp.asarray(io['x'].transpose(0, 2, 3, 1)),
                    jnp.asarray(io['t']), y, train=False)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), io['out'], atol=1e-4,
                             rtol=1e-4)


def test_flattened_slots_cover_the_params():
  config = uncond_legacy_config()
  slots = adm_params.param_slots(config, 'legacy')
  flat = traverse_util.flatten_dict(adm_params.abstract_params(config))
  assert {slot.path for slot in slots} == set(flat)
  assert len({slot.key for slot in slots}) == len(slots)
  assert {slot.legacy_heads for slot in slots if slot.path[-2] == 'qkv'} == {2, 4}
