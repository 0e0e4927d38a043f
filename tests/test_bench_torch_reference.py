"""The bench's PyTorch reference (atdiff_jax.bench.torch_reference): the config -> guided-
diffusion mapping and the error lines need no torch; the network itself needs torch and
guided_diffusion (`pip install -e '.[bench]'`) and is skipped without them."""
import re
import sys
import types

import pytest

from atdiff_jax.bench import Variant, bench_train, format_train_table, torch_reference
from atdiff_jax.bench.__main__ import cli
from atdiff_jax.bench.train import Reference, ReferenceMismatch
from atdiff_jax.models import abstract_params
from atdiff_jax.models.unet import count_params
from configs import cifar10_adm, quickstart
from conftest import ToyDenoiser, no_compiles, tiny_config

ADM_CIFAR10_PARAMS = 57_094_662  # guided-diffusion's count for these flags, learn_sigma


def test_gd_args_cifar10_adm():
  args = torch_reference.gd_args(cifar10_adm.get_config())
  assert args['model'] == dict(
      image_size=32, in_channels=3, model_channels=128, out_channels=6, num_res_blocks=3,
      attention_resolutions=(2, 4), dropout=0.3, channel_mult=(1, 2, 2, 2), num_classes=None,
      use_checkpoint=False, use_fp16=False, num_heads=4, num_head_channels=32,
      num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True,
      use_new_attention_order=True)
  assert args['diffusion'] == dict(
      steps=1000, learn_sigma=True, noise_schedule='cosine', use_kl=False,
      predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=True,
      timestep_respacing='')


def test_gd_args_quickstart_and_variations():
  config = quickstart.get_config()
  args = torch_reference.gd_args(config)
  model = args['model']
  assert (model['image_size'], model['in_channels'], model['out_channels']) == (8, 1, 2)
  assert (model['model_channels'], model['channel_mult'], model['num_res_blocks']) == (
      32, (1, 2), 1)
  assert model['attention_resolutions'] == (2,)  # 4-pixel maps of 8x8 images: factor 2
  assert (model['num_heads'], model['num_head_channels']) == (4, -1)
  assert args['diffusion']['learn_sigma'] and args['diffusion']['rescale_learned_sigmas']

  config.model.learn_sigma = False
  config.model.num_classes = 10
  config.model.remat = 'blocks'
  config.model.timestep_scale = 1000 / 250
  config.diffusion.num_timesteps = 250
  config.diffusion.rescale_vb = False
  args = torch_reference.gd_args(config)
  assert (args['model']['out_channels'], args['model']['num_classes']) == (1, 10)
  assert args['model']['use_checkpoint']
  assert args['diffusion'] == dict(
      steps=250, learn_sigma=False, noise_schedule='cosine', use_kl=False,
      predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=False,
      timestep_respacing='')


def _hide(monkeypatch, *modules):
  for module in modules:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError


def test_missing_packages_are_named(monkeypatch):
  _hide(monkeypatch, 'torch', 'guided_diffusion.script_util')
  assert torch_reference.missing_packages() == ['torch', 'guided_diffusion']
  monkeypatch.setitem(sys.modules, 'torch', types.ModuleType('torch'))
  assert torch_reference.missing_packages() == ['guided_diffusion']
  message = torch_reference.missing_message(['guided_diffusion'])
  assert 'missing: guided_diffusion' in message and "pip install -e '.[bench]'" in message
  assert '\n' not in message


BENCH = ['atdiff_jax.bench.__main__', '--what=train', '--steps=1', '--repeats=1',
         '--variants=none']


@pytest.mark.parametrize('config_args, hidden, message', [
    (['--config=configs/quickstart.py'], ('torch', 'guided_diffusion.script_util'),
     r"missing: torch, guided_diffusion\. Install them with: pip install -e '\.\[bench\]'"),
    (['--config=configs/quickstart.py'], ('guided_diffusion.script_util',),
     r'missing: guided_diffusion\.'),
    (['--config=configs/cifar10_adm.py'], (),
     r'pass --config\.model\.dtype=float32 \(the config has bfloat16\)'),
    (['--config=configs/quickstart.py', '--what=sample'], (),
     r'--reference=torch is a row of the train part'),
])
def test_reference_errors_are_one_line_before_compiling(config_args, hidden, message,
                                                         monkeypatch, capsys):
  # Present unless hidden: stand-ins, so that the check runs without the real packages.
  for module in ('torch', 'guided_diffusion', 'guided_diffusion.script_util'):
    monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
  _hide(monkeypatch, *hidden)
  with no_compiles('backend_compile'):
    code = cli(BENCH + config_args + ['--reference=torch'])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2, err
  assert len(err) == 1 and err[0].startswith('error: '), err
  assert re.search(message, err[0]), err[0]


def _fake_reference(num_params):
  calls = []

  def start():
    return lambda: calls.append(1) or 0.5

  return Reference('fake', num_params, start), calls


def test_bench_train_times_the_reference_in_the_same_rounds():
  config = tiny_config()
  model = ToyDenoiser()
  params = count_params(abstract_params(config, model))
  reference, calls = _fake_reference(params)
  result = bench_train(config, (Variant('none'),), steps=2, warmup=1, repeats=3, model=model,
                       reference=reference)
  ref, none = result['reference'], result['variants'][0]
  assert len(calls) == 1 + 3 * 2  # warm-up, then 3 rounds of 2 calls
  assert ref['num_params'] == result['num_params'] == params
  assert len(ref['round_s_per_call']) == 3 and ref['s_per_call'] == min(
      ref['round_s_per_call'])
  assert ref['none_over_reference'] == pytest.approx(none['s_per_update'] /
                                                     ref['s_per_update'])
  assert ref['ratio_to_none']['s_per_call'] == pytest.approx(1 / ref['none_over_reference'])
  table = format_train_table(result)
  rows = [line for line in table.splitlines() if line.startswith('| fake |')]
  assert len(rows) == 1 and rows[0].count('|') == table.splitlines()[0].count('|')
  assert 'the reference is' in table.splitlines()[-1]  # a no-op is faster than any step
  assert f'{params:,} params' in table


def test_a_reference_of_another_size_fails_before_compiling():
  config = tiny_config()
  model = ToyDenoiser()
  params = count_params(abstract_params(config, model))
  reference, calls = _fake_reference(params + 1)
  with no_compiles('backend_compile'), pytest.raises(ReferenceMismatch) as error:
    bench_train(config, (Variant('none'),), steps=1, warmup=1, repeats=1, model=model,
                reference=reference)
  assert f'{params + 1:,} parameters' in str(error.value)
  assert f'network {params:,}' in str(error.value)
  assert not calls


@pytest.fixture(name='torch')
def torch_one_thread():
  """torch, computing on one thread: its threads wait for each other by spinning, which
  costs seconds per call on a loaded 2-core machine."""
  torch = pytest.importorskip('torch')
  pytest.importorskip('guided_diffusion.script_util')
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield torch
  torch.set_num_threads(threads)


def test_adm_cifar10_has_guided_diffusions_parameter_count(torch):
  from guided_diffusion import unet  # pylint: disable=g-import-not-at-top
  config = cifar10_adm.get_config()
  with torch.device('meta'):  # shapes only: no memory, no init
    model = unet.UNetModel(**torch_reference.gd_args(config)['model'])
  assert sum(p.numel() for p in model.parameters()) == ADM_CIFAR10_PARAMS
  assert count_params(abstract_params(config)) == ADM_CIFAR10_PARAMS


@pytest.mark.parametrize('name', ['quickstart', 'tiny', 'tiny_class_cond'])
def test_reference_matches_the_parameter_count_and_runs(name, torch):
  config = quickstart.get_config() if name == 'quickstart' else tiny_config()
  config.training.batch_size = 4
  if name == 'tiny_class_cond':
    config.model.num_classes = 10
    config.training.weight_decay = 0.01
    config.training.grad_clip = 1.0
  reference = torch_reference.build(config, device='cpu')
  assert reference.num_params == count_params(abstract_params(config))
  assert isinstance(reference.start()(), float)

  model, call = torch_reference.make_step(config)
  assert model.training  # dropout on, as in training
  before = [p.detach().clone() for p in model.parameters()]
  losses = [call() for _ in range(3)]
  assert all(0 < loss < 100 for loss in losses)  # eps MSE ~1 plus the VB term
  changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
  # Every parameter is trained: guided-diffusion's zero-initialised layers (the output conv,
  # each residual block's last conv, attention's proj_out) pass gradients on one layer
  # deeper per update, so it takes three.
  assert all(changed), f'{sum(changed)} of {len(changed)} parameters changed'
