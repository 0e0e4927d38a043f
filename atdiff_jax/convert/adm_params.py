"""guided-diffusion's UNetModel state dict <-> this project's U-Net params, both ways.

The two are the same network (ADM); they differ in names and layouts only:
- names: guided-diffusion numbers its blocks (`input_blocks.4.1.qkv.weight`), this project
  names them by role (`down_1_attn_0/qkv/kernel`);
- layouts: conv weights OIHW become HWIO kernels, linear weights (out, in) become (in, out),
  and the attention's qkv and proj_out, 1-D convs with kernel 1 there, become dense kernels;
  GroupNorm's weight is the norm's scale;
- the attention order: guided-diffusion's legacy attention (QKVAttentionLegacy, its default,
  and improved-diffusion's only one) reads the qkv channels per head, [q_h | k_h | v_h] for
  each head h; this project, like the new order (QKVAttention), reads [q | k | v] and splits
  each into heads. Legacy weights have their qkv rows permuted on the way in (and out).

improved-diffusion's UNetModel has the same key names as guided-diffusion's with the legacy
order, conv resampling and `num_heads` only, so one mapping covers both.

The mapping is built from this project's parameter tree for a config: every param has one
checkpoint key, and importing checks that every key is used and every shape fits. Shapes
cannot tell the number of attention heads (model.num_heads / num_head_channels /
num_heads_upsample): those must come from the checkpoint's flags.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from atdiff_jax.convert.errors import ConversionError
from atdiff_jax.models import create_model, init_params

ATTENTION_ORDERS = ('legacy', 'new')

# This project's top-level layers and blocks with a fixed guided-diffusion name.
_FIXED_PREFIXES = {
    'time_embed_0': 'time_embed.0', 'time_embed_1': 'time_embed.2', 'label_emb': 'label_emb',
    'conv_in': 'input_blocks.0.0', 'out_norm': 'out.0', 'out_conv': 'out.2',
    'mid_res_0': 'middle_block.0', 'mid_attn': 'middle_block.1', 'mid_res_1': 'middle_block.2',
}
_BLOCK = re.compile(r'(down|up)_(\d+)_(res|attn)_(\d+)$')
_RESAMPLE = re.compile(r'(down|up)_(\d+)_(downsample|upsample)$')
# Layers inside a block: ResBlock, AttentionBlock, Downsample (op) and Upsample (conv).
_BLOCK_LAYERS = {
    'in_norm': 'in_layers.0', 'in_conv': 'in_layers.2', 'emb_proj': 'emb_layers.1',
    'out_norm': 'out_layers.0', 'out_conv': 'out_layers.3', 'skip': 'skip_connection',
    'norm': 'norm', 'qkv': 'qkv', 'proj_out': 'proj_out', 'op': 'op', 'conv': 'conv',
}
# Keys of conv resampling layers, and of attention blocks, inside the numbered blocks.
_CONV_RESAMPLING = re.compile(r'^(input_blocks\.\d+\.0\.op|output_blocks\.\d+\.[12]\.conv)\.')
_ATTENTION = re.compile(r'^(input|output)_blocks\.\d+\.1\.(norm|qkv|proj_out)\.')
_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}
_CONV1D_LAYERS = ('qkv', 'proj_out')

# Module registration order of guided-diffusion, so exported dicts (and the lists in error
# messages) follow the network as torch's state_dict() does.
_TORCH_ORDER = {name: rank for rank, name in enumerate((
    'time_embed', 'label_emb', 'input_blocks', 'middle_block', 'output_blocks', 'out'))}
_TORCH_ORDER.update({name: rank for rank, name in enumerate((
    'in_layers', 'emb_layers', 'out_layers', 'skip_connection'))})
_TORCH_ORDER.update(norm=0, qkv=1, proj_out=2, op=0, conv=0, weight=0, bias=1)


@dataclasses.dataclass(frozen=True)
class Slot:
  """One param and its checkpoint key."""
  path: tuple[str, ...]    # e.g. ('down_1_attn_0', 'qkv', 'kernel')
  key: str                 # e.g. 'input_blocks.4.1.qkv.weight'
  shape: tuple[int, ...]   # this project's shape
  layout: str              # conv | conv1d | linear | same: how the torch tensor is laid out
  legacy_heads: int = 0    # qkv of a legacy-order checkpoint: its heads (rows are permuted)

  @property
  def torch_shape(self) -> tuple[int, ...]:
    if self.layout == 'conv':  # HWIO -> OIHW
      h, w, i, o = self.shape
      return (o, i, h, w)
    if self.layout == 'conv1d':
      return (self.shape[1], self.shape[0], 1)
    if self.layout == 'linear':
      return self.shape[::-1]
    return self.shape

  def to_params(self, tensor: np.ndarray) -> np.ndarray:
    """The checkpoint's tensor in this project's layout."""
    tensor = np.asarray(tensor, np.float32)
    if self.legacy_heads:
      tensor = _qkv_rows(tensor, self.legacy_heads, to_legacy=False)
    if self.layout == 'conv':
      tensor = tensor.transpose(2, 3, 1, 0)
    elif self.layout == 'conv1d':
      tensor = tensor[:, :, 0].T
    elif self.layout == 'linear':
      tensor = tensor.T
    return np.ascontiguousarray(tensor)

  def to_torch(self, param: np.ndarray) -> np.ndarray:
    """A param in the checkpoint's layout: the inverse of `to_params`."""
    tensor = np.asarray(param, np.float32)
    if self.layout == 'conv':
      tensor = tensor.transpose(3, 2, 0, 1)
    elif self.layout == 'conv1d':
      tensor = tensor.T[:, :, None]
    elif self.layout == 'linear':
      tensor = tensor.T
    if self.legacy_heads:
      tensor = _qkv_rows(tensor, self.legacy_heads, to_legacy=True)
    return np.ascontiguousarray(tensor)


def _qkv_rows(tensor: np.ndarray, heads: int, to_legacy: bool) -> np.ndarray:
  """qkv rows (3C, ...) from [q | k | v] (each heads x d) to per-head [q_h | k_h | v_h]
  (heads x 3 x d), or back."""
  rows, rest = tensor.shape[0], tensor.shape[1:]
  head_ch = rows // (3 * heads)
  split = (3, heads, head_ch) if to_legacy else (heads, 3, head_ch)
  return tensor.reshape(split + rest).swapaxes(0, 1).reshape((rows,) + rest)


def abstract_params(config: ml_collections.ConfigDict) -> Any:
  """ShapeDtypeStructs of the U-Net params `config` describes."""
  model = create_model(config)
  return jax.eval_shape(lambda: init_params(model, config, jax.random.key(0)))


def attention_heads(model_config: ml_collections.ConfigDict, block: str, channels: int) -> int:
  """Heads of attention block `block` (e.g. 'up_2_attn_0'), as the U-Net computes them."""
  if model_config.num_head_channels != -1:
    return channels // model_config.num_head_channels
  upsample_heads = model_config.get('num_heads_upsample', -1)
  if block.startswith('up_') and upsample_heads != -1:
    return upsample_heads
  return model_config.num_heads


def _block_prefix(block: str, blocks: set[str], num_res_blocks: int, last_level: int) -> str:
  """guided-diffusion's name of one of this project's top-level modules."""
  if block in _FIXED_PREFIXES:
    return _FIXED_PREFIXES[block]
  per_level = num_res_blocks + 1  # guided-diffusion's blocks per level (resampling included)
  match = _BLOCK.match(block)
  if match:
    side, level, kind, i = match[1], int(match[2]), match[3], int(match[4])
    sub = 0 if kind == 'res' else 1
    if side == 'down':  # input block 0 is conv_in
      return f'input_blocks.{1 + level * per_level + i}.{sub}'
    return f'output_blocks.{(last_level - level) * per_level + i}.{sub}'
  match = _RESAMPLE.match(block)
  if match:
    side, level = match[1], int(match[2])
    if side == 'down':
      return f'input_blocks.{1 + level * per_level + num_res_blocks}.0'
    # The upsampler closes the level's last output block, after its attention if any.
    sub = 2 if f'up_{level}_attn_{num_res_blocks}' in blocks else 1
    return f'output_blocks.{(last_level - level) * per_level + num_res_blocks}.{sub}'
  raise ValueError(f'no guided-diffusion name for the U-Net module {block!r}')


def param_slots(config: ml_collections.ConfigDict, attention_order: str) -> list[Slot]:
  """Every param of the U-Net `config` describes with its key, in the checkpoint's order."""
  if attention_order not in ATTENTION_ORDERS:
    raise ConversionError(f'attention order {attention_order!r}: must be one of '
                          f'{", ".join(ATTENTION_ORDERS)}')
  flat = traverse_util.flatten_dict(abstract_params(config))
  blocks = {path[0] for path in flat}
  num_res_blocks, last_level = config.model.num_res_blocks, len(config.model.ch_mult) - 1
  slots = []
  for path, leaf in flat.items():
    block, *layer, leaf_name = path
    names = [_block_prefix(block, blocks, num_res_blocks, last_level)]
    names += [_BLOCK_LAYERS[name] for name in layer] + [_LEAVES[leaf_name]]
    layer_name = layer[-1] if layer else block
    shape = tuple(leaf.shape)
    if leaf_name != 'kernel':
      layout = 'same'
    elif len(shape) == 4:
      layout = 'conv'
    else:
      layout = 'conv1d' if layer_name in _CONV1D_LAYERS else 'linear'
    legacy_heads = 0
    if attention_order == 'legacy' and layer_name == 'qkv':
      legacy_heads = attention_heads(config.model, block, shape[-1] // 3)
    slots.append(Slot(path, '.'.join(names), shape, layout, legacy_heads))
  return sorted(slots, key=lambda slot: torch_order(slot.key))


def torch_order(key: str) -> tuple:
  """Sort key: guided-diffusion's module order (block numbers as numbers)."""
  return tuple((0, int(part)) if part.isdigit() else (1, _TORCH_ORDER.get(part, 99))
               for part in key.split('.'))


def import_params(state: Mapping[str, np.ndarray], config: ml_collections.ConfigDict,
                  attention_order: str) -> dict:
  """The U-Net params (float32 numpy, nested dicts) from a guided-diffusion state dict.

  Raises ConversionError, naming the first key that does not fit, when the checkpoint has
  keys the config does not use, lacks keys it needs, or has another shape somewhere.
  """
  slots = param_slots(config, attention_order)
  by_key = {slot.key: slot for slot in slots}
  unused = sorted((key for key in state if key not in by_key), key=torch_order)
  missing = [slot.key for slot in slots if slot.key not in state]
  if unused or missing:
    raise ConversionError(_structure_message(unused, missing))
  for key in sorted(state, key=torch_order):  # the first mismatch in the network's order
    slot, have = by_key[key], tuple(state[key].shape)
    if have != slot.torch_shape:
      raise ConversionError(
          f'{key}: the checkpoint has shape {have}, the config needs {slot.torch_shape} '
          f'(param {"/".join(slot.path)}); does {_shape_hint(key, have, slot.torch_shape)} '
          'differ?')
  return traverse_util.unflatten_dict({slot.path: slot.to_params(state[slot.key])
                                       for slot in slots})


def export_params(params: Any, config: ml_collections.ConfigDict,
                  attention_order: str) -> dict[str, np.ndarray]:
  """The guided-diffusion state dict (float32 numpy, in its order) of U-Net params."""
  flat = traverse_util.flatten_dict(jax.device_get(params))
  slots = param_slots(config, attention_order)
  if set(flat) != {slot.path for slot in slots}:
    raise ConversionError('the params do not belong to the U-Net the config describes')
  return {slot.key: slot.to_torch(flat[slot.path]) for slot in slots}


def _listing(keys: list[str], what: str) -> str:
  shown = ', '.join(keys[:3]) + (', ...' if len(keys) > 3 else '')
  return f'{len(keys)} {what} ({shown})'


def _structure_message(unused: list[str], missing: list[str]) -> str:
  parts = []
  if unused:
    parts.append(_listing(unused, 'checkpoint keys the config does not use'))
  if missing:
    parts.append(_listing(missing, 'keys the config needs that the checkpoint lacks'))
  return (f'the checkpoint does not fit the config: {"; ".join(parts)}; does '
          f'{_structure_hint(unused + missing)} differ?')


def _structure_hint(keys: list[str]) -> str:
  """The config field most likely behind keys present on one side only."""
  if any(key.startswith('label_emb.') for key in keys):
    return 'model.num_classes (guided-diffusion: --class_cond)'
  # A resampling block that is a conv on one side and a ResBlock on the other.
  block = lambda key: '.'.join(key.split('.')[:3])  # e.g. input_blocks.3.0
  conv_resampling = {block(key) for key in keys if _CONV_RESAMPLING.match(key)}
  if any(block(key) in conv_resampling for key in keys if '.in_layers.' in key):
    return 'model.resblock_updown'
  if all(_ATTENTION.match(key) for key in keys):
    return 'model.attn_resolutions (guided-diffusion: --attention_resolutions)'
  return 'model.ch_mult or model.num_res_blocks'


def _shape_hint(key: str, have: tuple[int, ...], want: tuple[int, ...]) -> str:
  """The config field most likely behind a shape mismatch of `key` (checkpoint order: the
  layers before it fit)."""
  if key.startswith('label_emb.') and have[0] != want[0]:
    return 'model.num_classes'
  if key == 'input_blocks.0.0.weight' and have[1] != want[1]:
    return 'data.channels'
  if key.startswith('out.2.') and have[0] != want[0]:
    doubled = max(have[0], want[0]) == 2 * min(have[0], want[0])
    return 'model.learn_sigma' if doubled else 'data.channels'
  if '.emb_layers.' in key:  # the block's convs fit, so only the FiLM doubling is left
    return 'model.use_scale_shift_norm'
  if key.startswith('time_embed.'):
    return 'model.ch'
  return 'model.ch or model.ch_mult'
