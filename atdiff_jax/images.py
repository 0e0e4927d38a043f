"""Image grids as PNG files."""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from atdiff_jax.data import to_uint8


def make_grid(images, ncols: int | None = None, pad: int = 1, min_cell: int = 32) -> np.ndarray:
  """Tiles N images into one HWC uint8 array; tiny images are upscaled (nearest) to be seen."""
  images = np.asarray(images)
  images = images if images.dtype == np.uint8 else to_uint8(images)
  n, h, w, c = images.shape
  scale = max(1, math.ceil(min_cell / max(h, w)))
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
  ncols = ncols or math.ceil(math.sqrt(n))
  nrows = math.ceil(n / ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, ncols)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = image
  return grid


def save_grid(images, path: str, ncols: int | None = None) -> str:
  grid = make_grid(images, ncols)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  return path
