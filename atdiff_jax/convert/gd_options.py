"""guided-diffusion's model and diffusion flags -> this project's config fields.

The flags are the ones guided-diffusion's scripts take (and print in its README), e.g.
`--attention_resolutions 32,16,8 --class_cond True --num_channels 192 ...`; missing ones
take guided-diffusion's defaults, or improved-diffusion's (`defaults='improved'`), which
differ in rescale_timesteps and rescale_learned_sigmas. A checkpoint's saved options dict
(`create_model_and_diffusion_options`, the same names) goes through the same code.

The flags of its training loss (use_kl, rescale_learned_sigmas) and of its sampling
(timestep_respacing) describe no part of the network: training and sampling here follow the
config (config.diffusion, config.eval). sigma_small (improved-diffusion, fixed-variance
models) becomes the ancestral sampler's fixed_variance='small'.

Two facts come from the checkpoint rather than the flags: the number of classes (the rows of
label_emb.weight; guided-diffusion hard-codes 1000, other forks do not) and the image
channels (input_blocks.0.0.weight).
"""
from __future__ import annotations

import dataclasses
import shlex
from typing import Any, Mapping

import numpy as np

from atdiff_jax.convert.errors import ConversionError

GUIDED_DEFAULTS = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    num_head_channels=-1, attention_resolutions='16,8', channel_mult='', dropout=0.0,
    class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
    use_fp16=False, use_new_attention_order=False,
    learn_sigma=False, sigma_small=False, diffusion_steps=1000, noise_schedule='linear',
    timestep_respacing='', use_kl=False, predict_xstart=False, rescale_timesteps=False,
    rescale_learned_sigmas=False)
IMPROVED_DEFAULTS = dict(GUIDED_DEFAULTS, rescale_timesteps=True, rescale_learned_sigmas=True)
DEFAULTS = {'guided': GUIDED_DEFAULTS, 'improved': IMPROVED_DEFAULTS}

# channel_mult when the flag is empty, by image size (32: improved-diffusion's CIFAR-10).
_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4),
                 32: (1, 2, 2, 2)}
_TRUE, _FALSE = ('yes', 'true', 't', 'y', '1'), ('no', 'false', 'f', 'n', '0')
_SUPER_RES = ('large_size', 'small_size')


@dataclasses.dataclass(frozen=True)
class Translation:
  """What a checkpoint's flags mean here."""
  fields: dict[str, Any]     # dotted config field -> value, e.g. {'model.ch': 192}
  attention_order: str       # legacy | new
  notes: tuple[str, ...]     # flags with no exact counterpart, and what was done about them


def parse_flags(text: str, defaults: str = 'guided') -> dict[str, Any]:
  """`--name value` / `--name=value` flags, typed and completed with the defaults."""
  tokens = shlex.split(text)
  given: dict[str, str] = {}
  i = 0
  while i < len(tokens):
    token = tokens[i]
    if not token.startswith('--') or len(token) == 2:
      raise ConversionError(f'--gd_flags: expected --name value, got {token!r}')
    name, has_value, value = token[2:].partition('=')
    if not has_value:
      if i + 1 == len(tokens) or tokens[i + 1].startswith('--'):
        raise ConversionError(f'--gd_flags: --{name} has no value')
      i += 1
      value = tokens[i]
    given[name] = value
    i += 1
  return complete_options(given, defaults)


def complete_options(given: Mapping[str, Any], defaults: str = 'guided') -> dict[str, Any]:
  """Options (flag strings or JSON values) typed as the defaults, the missing ones added."""
  if defaults not in DEFAULTS:
    raise ConversionError(f'defaults {defaults!r}: must be one of {", ".join(DEFAULTS)}')
  table = DEFAULTS[defaults]
  options = dict(table)
  for name, value in given.items():
    if name in _SUPER_RES:
      raise ConversionError(f'--{name}: super-resolution models (SuperResModel) are not '
                            'supported, only the UNetModel of image_sample.py')
    if name not in table:
      raise ConversionError(f'--{name}: not a guided-diffusion model or diffusion flag '
                            f'(known: {", ".join(sorted(table))})')
    options[name] = _typed(name, value, table[name])
  return options


def _typed(name: str, value: Any, default: Any) -> Any:
  kind = type(default)
  if isinstance(value, str) and kind is not str:
    if kind is bool:
      if value.lower() not in _TRUE + _FALSE:
        raise ConversionError(f'--{name}={value}: expected a boolean (True or False)')
      return value.lower() in _TRUE
    try:
      return kind(value)
    except ValueError:
      raise ConversionError(f'--{name}={value}: expected {kind.__name__}') from None
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if type(value) is not kind:
    raise ConversionError(f'--{name}={value!r}: expected {kind.__name__}')
  return value


def translate(options: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> Translation:
  """This project's config fields for a checkpoint with complete `options` and tensors
  `state`."""
  o = options
  notes = []
  if o['predict_xstart']:
    raise ConversionError('--predict_xstart True: the model predicts x0; this project\'s '
                          'models predict the noise (eps) only')
  size = o['image_size']
  ch_mult = _channel_mult(o['channel_mult'], size)
  resolutions = _attention_heights(o['attention_resolutions'], size, len(ch_mult), notes)
  if o['noise_schedule'] not in ('linear', 'cosine'):
    raise ConversionError(f'--noise_schedule {o["noise_schedule"]}: must be linear or cosine')

  num_classes = 0
  if o['class_cond']:
    if 'label_emb.weight' not in state:
      raise ConversionError('--class_cond True, but the checkpoint has no label_emb.weight '
                            '(an unconditional model?)')
    num_classes = int(state['label_emb.weight'].shape[0])
  elif 'label_emb.weight' in state:
    raise ConversionError(f'the checkpoint is class-conditional (label_emb.weight, '
                          f'{state["label_emb.weight"].shape[0]} classes): pass --class_cond '
                          'True')

  steps = o['diffusion_steps']
  fields = {
      'data.image_size': size,
      'model.ch': o['num_channels'],
      'model.ch_mult': ch_mult,
      'model.num_res_blocks': o['num_res_blocks'],
      'model.attn_resolutions': resolutions,
      'model.num_heads': o['num_heads'],
      'model.num_head_channels': o['num_head_channels'],
      'model.num_heads_upsample': o['num_heads_upsample'],
      'model.dropout': float(o['dropout']),
      'model.learn_sigma': o['learn_sigma'],
      'model.resblock_updown': o['resblock_updown'],
      'model.use_scale_shift_norm': o['use_scale_shift_norm'],
      'model.num_classes': num_classes,
      'model.dtype': 'bfloat16' if o['use_fp16'] else 'float32',
      'model.remat': 'blocks' if o['use_checkpoint'] else 'none',
      # The network saw t * 1000 / T when its diffusion rescaled timesteps.
      'model.timestep_scale': 1000.0 / steps if o['rescale_timesteps'] else 1.0,
      'diffusion.num_timesteps': steps,
      'diffusion.schedule': o['noise_schedule'],
  }
  if 'input_blocks.0.0.weight' in state:
    fields['data.channels'] = int(state['input_blocks.0.0.weight'].shape[1])
  if o['use_fp16']:
    notes.append('--use_fp16 True: computing in bfloat16 (model.dtype=bfloat16, as this '
                 'project\'s mixed precision); the params stay float32')
  if o['sigma_small'] and not o['learn_sigma']:
    fields['eval.sampler_options.ancestral.fixed_variance'] = 'small'
  if o['use_kl']:
    notes.append('--use_kl True: a training loss; fine-tuning here uses the config\'s '
                 'objective and config.diffusion.rescale_vb')
  if o['timestep_respacing']:
    notes.append(f'--timestep_respacing {o["timestep_respacing"]} is a sampling setting; '
                 'choose the steps with --config.eval.nfe')
  order = 'new' if o['use_new_attention_order'] else 'legacy'
  return Translation(fields, order, tuple(notes))


def _channel_mult(text: str, size: int) -> tuple[int, ...]:
  if not text:
    if size not in _CHANNEL_MULT:
      raise ConversionError(f'--image_size {size}: no default --channel_mult for this size '
                            f'(defaults exist for {sorted(_CHANNEL_MULT)}); pass --channel_mult')
    return _CHANNEL_MULT[size]
  try:
    mults = tuple(float(m) for m in text.split(','))
  except ValueError:
    raise ConversionError(f'--channel_mult {text}: expected comma-separated numbers') from None
  if any(m != int(m) or m <= 0 for m in mults):
    raise ConversionError(f'--channel_mult {text}: only positive integer multipliers are '
                          'supported (guided-diffusion\'s 512x512 model starts at 0.5)')
  return tuple(int(m) for m in mults)


def _attention_heights(text: str, size: int, levels: int, notes: list) -> tuple[int, ...]:
  """Feature-map heights with attention (this project's attn_resolutions).

  guided-diffusion turns each resolution r into the downsampling factor size // r and puts
  attention where the U-Net's factor (1, 2, 4, ...) equals it; the height there is
  size // factor, which is r only when r divides size.
  """
  if not text.strip():
    return ()
  try:
    resolutions = [int(r) for r in text.split(',')]
  except ValueError:
    raise ConversionError(f'--attention_resolutions {text}: expected comma-separated '
                          'integers') from None
  factors = {2 ** level for level in range(levels)}
  heights = []
  for res in resolutions:
    if res <= 0:
      raise ConversionError(f'--attention_resolutions {text}: {res} is not a resolution')
    factor = size // res
    if factor in factors:
      heights.append(size // factor)
    else:
      notes.append(f'--attention_resolutions: {res} (downsampling factor {factor}) matches '
                   'no level of the U-Net, so guided-diffusion put no attention there either')
  return tuple(sorted(set(heights), reverse=True))
