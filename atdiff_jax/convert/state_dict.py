"""PyTorch state dicts as numpy: `.pt` files through torch (an optional extra), or `.npz`.

`.pt` files are read with `torch.load(..., weights_only=True)`: tensors only, no pickled code
runs. torch is imported only for them; `.npz` files of the same keys need nothing but numpy.
Floating-point tensors come back as float32 (fp16 and bf16 checkpoints included).
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from atdiff_jax.convert.errors import ConversionError

StateDict = dict[str, np.ndarray]


def read_state_dict(path: str) -> StateDict:
  """The tensors of the state dict in `path` (.pt, .pth or .npz), in file order."""
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: no such file')
  if path.endswith('.npz'):
    try:
      with np.load(path, allow_pickle=False) as arrays:
        return {key: _float32(arrays[key]) for key in arrays.files}
    except Exception as e:  # not a zip, a bad CRC, object arrays: name the file either way
      raise ConversionError(f'{path}: cannot be read as an .npz of arrays: '
                            f'{" ".join(str(e).split()) or type(e).__name__}') from e
  return _read_torch(path)


def write_npz(path: str, state: Mapping[str, np.ndarray]) -> None:
  """`state` as an .npz that `read_state_dict` reads back (and torch-free tests can use)."""
  np.savez(path, **{key: np.asarray(value) for key, value in state.items()})


def _read_torch(path: str) -> StateDict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError(f"reading {os.path.basename(path)} needs torch: "
                          "pip install -e '.[convert]' (or give the state dict as .npz)") from None
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises many types for a damaged or non-tensor file
    raise ConversionError(f'{path}: torch cannot load it as a state dict of tensors: '
                          f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from e
  if not isinstance(loaded, Mapping):
    raise ConversionError(f'{path} holds a {type(loaded).__name__}, not a state dict '
                          '(a dict of tensors, as torch.save(model.state_dict()) writes)')
  others = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
  if others:
    raise ConversionError(f'{path} is not a plain state dict: {others[0]!r} is a '
                          f'{type(loaded[others[0]]).__name__}, not a tensor (top-level keys: '
                          f'{", ".join(map(repr, list(loaded)[:5]))}...)')
  # numpy has no bfloat16: go through float32 in torch.
  return {key: (value.detach().float() if value.is_floating_point() else value).numpy()
          for key, value in loaded.items()}


def _float32(array: np.ndarray) -> np.ndarray:
  return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array
