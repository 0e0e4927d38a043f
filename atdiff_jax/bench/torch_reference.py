"""A reference row for the train benchmark: OpenAI's guided-diffusion in PyTorch.

`python -m atdiff_jax.bench --what=train --reference=torch` also times guided-diffusion's
own UNetModel and training loss (its `GaussianDiffusion.training_losses`: MSE on eps, plus
the VLB term when the config learns sigma, rescaled by T/1000 as `rescale_learned_sigmas`:
improved-diffusion's hybrid loss) for the same config, with torch.optim.AdamW at the
config's lr and weight decay (as `train_state.make_optimizer`), the config's gradient clip
and one EMA update per rate, one optimizer update per call on the same batch size. Its
rounds are interleaved with the AT variants', so the ratio of this project's `none` step to
it says how this implementation compares with the PyTorch code ADM was released with, on
the same machine at the same moment. On a CPU, torch uses its own thread count
(torch.set_num_threads, OMP_NUM_THREADS), shown in the table's note.

Both networks must have the same number of parameters (checked before anything compiles).
The reference computes in float32 (guided-diffusion's use_fp16 is a float16 scheme with
loss scaling, not comparable with bfloat16 here), so the bench asks for
--config.model.dtype=float32 when the config has another dtype.

torch and guided_diffusion (PyPI: guided-diffusion-sdk, `pip install -e '.[bench]'`) are
imported only inside these functions; of guided_diffusion only the modules that need neither
mpi4py nor blobfile are imported (unet, script_util, nn).
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any

import ml_collections

from atdiff_jax.bench.train import Reference

NAME = 'PyTorch guided-diffusion (reference)'
INSTALL = "pip install -e '.[bench]'"
_MODULES = ('torch', 'guided_diffusion.script_util')  # what build() imports


def missing_packages() -> list[str]:
  """The packages of the reference that cannot be imported here (empty: it can run)."""
  missing = []
  for module in _MODULES:
    try:
      _import(module)
    except ImportError:
      missing.append(module.split('.')[0])
  return missing


def _import(module: str):
  with warnings.catch_warnings():  # guided_diffusion.nn's torch.cuda.amp decorators
    warnings.simplefilter('ignore', FutureWarning)
    return importlib.import_module(module)


def missing_message(missing: list[str]) -> str:
  """One line: what is missing and how to install it."""
  return (f'--reference=torch needs torch and guided_diffusion (PyPI: guided-diffusion-sdk); '
          f'missing: {", ".join(missing)}. Install them with: {INSTALL}')


def gd_args(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """guided-diffusion's arguments for `config`: {'model': UNetModel's keyword arguments,
  'diffusion': create_gaussian_diffusion's}. Pure Python (no torch)."""
  m, size = config.model, config.data.image_size
  channels = config.data.channels
  return {
      'model': dict(
          image_size=size,
          in_channels=channels,
          model_channels=m.ch,
          out_channels=2 * channels if m.learn_sigma else channels,
          num_res_blocks=m.num_res_blocks,
          # Heights here, downsampling factors there.
          attention_resolutions=tuple(sorted(size // r for r in m.attn_resolutions)),
          dropout=m.dropout,
          channel_mult=tuple(m.ch_mult),
          num_classes=m.num_classes or None,
          # guided-diffusion recomputes residual and attention blocks together or nothing.
          use_checkpoint=m.remat == 'blocks',
          use_fp16=False,
          num_heads=m.num_heads,
          num_head_channels=m.num_head_channels,
          num_heads_upsample=m.num_heads_upsample,
          use_scale_shift_norm=m.use_scale_shift_norm,
          resblock_updown=m.resblock_updown,
          use_new_attention_order=True,  # this project's AttentionBlock (layers.py)
      ),
      'diffusion': dict(
          steps=config.diffusion.num_timesteps,
          learn_sigma=m.learn_sigma,
          noise_schedule=config.diffusion.schedule,
          use_kl=False,
          predict_xstart=False,
          rescale_timesteps=m.timestep_scale != 1.0,
          rescale_learned_sigmas=config.diffusion.rescale_vb,
          timestep_respacing='',
      ),
  }


def make_step(config: ml_collections.ConfigDict, device: str = 'cpu'):
  """(guided-diffusion's UNetModel for `config` on a torch `device`, a call making one train
  step on a fixed synthetic batch and returning its loss)."""
  # pylint: disable=g-import-not-at-top
  import torch
  gd_nn, script_util, unet = (_import(f'guided_diffusion.{m}')
                              for m in ('nn', 'script_util', 'unet'))

  args = gd_args(config)
  torch.manual_seed(config.seed)
  model = unet.UNetModel(**args['model']).to(device).train()  # train(): dropout on
  diffusion = script_util.create_gaussian_diffusion(**args['diffusion'])
  training = config.training
  params = list(model.parameters())
  optimizer = torch.optim.AdamW(params, lr=training.lr, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=training.weight_decay)
  ema = [[p.detach().clone() for p in params] for _ in training.ema_rates]

  b, size = training.batch_size, config.data.image_size
  images = torch.rand((b, config.data.channels, size, size), device=device) * 2 - 1
  kwargs = ({'y': torch.randint(0, config.model.num_classes, (b,), device=device)}
            if config.model.num_classes else {})

  def call() -> float:
    t = torch.randint(0, diffusion.num_timesteps, (b,), device=device)  # uniform, as here
    loss = diffusion.training_losses(model, images, t, model_kwargs=kwargs)['loss'].mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if training.grad_clip:
      torch.nn.utils.clip_grad_norm_(params, training.grad_clip)
    optimizer.step()
    for rate, ema_params in zip(training.ema_rates, ema):
      gd_nn.update_ema(ema_params, params, rate)
    return loss.item()  # waits for the step (a GPU's queue too)

  return model, call


def build(config: ml_collections.ConfigDict, device: str | None = None) -> Reference:
  """The reference for `config`, ready to time; `device` None: the GPU when JAX's backend is
  one and torch sees it, else the CPU."""
  # pylint: disable=g-import-not-at-top
  import jax
  import torch
  if device is None:
    device = 'cuda' if jax.default_backend() == 'gpu' and torch.cuda.is_available() else 'cpu'
  model, call = make_step(config, device)
  # torch's CPU threads: torch.set_num_threads or OMP_NUM_THREADS (XLA's pool ignores it).
  threads = torch.get_num_threads()
  where = f'{device}, {threads} thread{"s" if threads > 1 else ""}' if device == 'cpu' else device
  return Reference(name=NAME, num_params=sum(p.numel() for p in model.parameters()),
                   start=lambda: call, device=where)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The reference's own demands on the config, as one-line UsageErrors."""
  # pylint: disable=g-import-not-at-top
  from atdiff_jax.command_line import UsageError
  missing = missing_packages()
  if missing:
    raise UsageError(missing_message(missing))
  if str(config.model.dtype) != 'float32':
    raise UsageError(f'--reference=torch compares float32 steps (guided-diffusion computes in '
                     f'float32 here): pass --config.model.dtype=float32 (the config has '
                     f'{config.model.dtype})')
