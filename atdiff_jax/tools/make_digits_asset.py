"""Regenerates `atdiff_jax/assets/digits.npz` from scikit-learn's `load_digits`.

One-off maintenance script: scikit-learn is needed only here, not by the package.

  python -m atdiff_jax.tools.make_digits_asset [--out PATH]

The stored arrays are `images` uint8 (1797, 8, 8, 1), the 0..16 grey levels
scaled to 0..255 as round(v * 255 / 16), and `labels` int32 (1797,) in 0..9.
"""
import argparse
import pathlib

import numpy as np

_DEFAULT_OUT = pathlib.Path(__file__).resolve().parent.parent / 'assets' / 'digits.npz'


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 NHWC in 0..255, labels int32) from scikit-learn."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  levels = np.asarray(digits.images, dtype=np.float64)  # (N, 8, 8) in 0..16
  if levels.min() < 0 or levels.max() > 16:
    raise ValueError(f'unexpected grey levels {levels.min()}..{levels.max()}')
  images = np.round(levels * 255.0 / 16.0).astype(np.uint8)[..., None]
  labels = np.asarray(digits.target, dtype=np.int32)
  return images, labels


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=pathlib.Path, default=_DEFAULT_OUT)
  args = parser.parse_args()
  images, labels = digits_arrays()
  args.out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(args.out, images=images, labels=labels)
  print(f'wrote {args.out}: images {images.shape} {images.dtype}, '
        f'labels {labels.shape} {labels.dtype}')


if __name__ == '__main__':
  main()
