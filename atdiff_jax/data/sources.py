"""Image sources: random access to uint8 NHWC images and int32 labels.

Every source has `len(source)`, `image_shape` (H, W, C), `num_classes` (0 when
unlabeled) and `get(indices) -> (images uint8 (n, H, W, C), labels int32 (n,))`.
`create_source` builds one from the `data` config block and checks it against
`data.image_size` / `data.channels` before anything is compiled.
"""
from __future__ import annotations

import concurrent.futures
import importlib.resources
import logging
import os
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image

from atdiff_jax.config import ConfigError

log = logging.getLogger(__name__)

BUILTIN_NAMES = ('digits', 'npz', 'folder')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
_NPZ_IMAGE_KEYS = ('images', 'arr_0', 'x')


class ImageSource(Protocol):
  """What the batching code needs from a data set."""

  image_shape: tuple[int, int, int]
  num_classes: int

  def __len__(self) -> int:
    ...

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ...


def _config_error(field: str, problem: str) -> ConfigError:
  return ConfigError(f'config.data.{field}: {problem}')


def _field(config: Any, name: str, default: Any = None) -> Any:
  """Reads `config.name`, tolerating a ConfigDict or a plain mapping without it."""
  if hasattr(config, 'get'):
    value = config.get(name, default)
  else:
    value = getattr(config, name, default)
  return default if value is None else value


# ------------------------------------------------------------------ in memory


class ArraySource:
  """Images and labels held in memory (the embedded digits, an .npz file)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray | None = None,
               num_classes: int | None = None):
    self._images = images
    self._labels = (np.zeros(len(images), np.int32) if labels is None
                    else np.asarray(labels, np.int32))
    if num_classes is None:
      num_classes = 0 if labels is None or not len(labels) else int(self._labels.max()) + 1
    self.num_classes = num_classes
    self.image_shape = tuple(int(d) for d in images.shape[1:])

  def __len__(self) -> int:
    return len(self._images)

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    return np.asarray(self._images[indices]), self._labels[indices]


def load_digits_source() -> ArraySource:
  """The embedded handwritten digits: 1797 images, 8x8x1, labels 0..9."""
  asset = importlib.resources.files('atdiff_jax') / 'assets' / 'digits.npz'
  with asset.open('rb') as f, np.load(f) as arrays:
    images = np.asarray(arrays['images'], np.uint8)
    labels = np.asarray(arrays['labels'], np.int32)
  return ArraySource(images, labels, num_classes=10)


def load_npz_source(path: str) -> ArraySource:
  """Images (uint8 NHWC, or NHW for grey) under `images`/`arr_0`/`x`; optional `labels`."""
  if not path:
    raise _config_error('path', "is required when data.name='npz'")
  if not os.path.isfile(path):
    raise _config_error('path', f'no such file: {path!r}')
  try:
    arrays = np.load(path, allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    raise _config_error('path', f'cannot read {path!r} as .npz: {e}') from e
  if not hasattr(arrays, 'files'):  # np.load gives a bare array for .npy content
    raise _config_error('path', f'{path!r} holds a single .npy array; expected an .npz '
                        "archive with the images under 'images' (np.savez(path, images=...))")
  with arrays:
    key = next((k for k in _NPZ_IMAGE_KEYS if k in arrays.files), None)
    if key is None:
      raise _config_error('path', f'{path!r} has no image array under any of '
                          f'{list(_NPZ_IMAGE_KEYS)} (keys: {arrays.files})')
    try:  # members are read here: object arrays, a bad CRC or a cut file raise now
      images = arrays[key]
      labels = arrays['labels'] if 'labels' in arrays.files else None
    except Exception as e:  # pylint: disable=broad-except
      raise _config_error('path', f'cannot read {path!r}: {" ".join(str(e).split())}') from e
  if images.dtype != np.uint8:
    raise _config_error('path', f'{path!r}[{key!r}] has dtype {images.dtype}, expected uint8 in 0..255')
  if images.ndim == 3:  # (N, H, W): grey images without a channel axis
    images = images[..., None]
  if images.ndim != 4:
    raise _config_error('path', f'{path!r}[{key!r}] has shape {images.shape}, '
                        'expected rank 4 (N, H, W, C)')
  if labels is not None:
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
      raise _config_error('path', f"{path!r}['labels'] must be integers of shape "
                          f'({len(images)},), got {labels.dtype} {labels.shape}')
    if len(labels) and labels.min() < 0:
      raise _config_error('path', f"{path!r}['labels'] has negative values")
  return ArraySource(images, labels)


# --------------------------------------------------------------- image folder


def fit_image(image: Image.Image, image_size: int, channels: int) -> np.ndarray:
  """Converts to RGB/L, center-crops to square and area-resizes to image_size."""
  image = image.convert('L' if channels == 1 else 'RGB')
  width, height = image.size
  if width != height:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
  if image.size != (image_size, image_size):
    image = image.resize((image_size, image_size), Image.Resampling.BOX)
  array = np.asarray(image, np.uint8)
  return array[..., None] if channels == 1 else array


def _is_hidden(name: str) -> bool:
  return name.startswith('.')


def _find_images(root: str) -> list[str]:
  """Relative paths of all images under root, sorted so the order is stable.

  Linked folders are followed, each real folder once: a link to a folder above it (`a ->
  .`) would otherwise list its files again at every depth, or never end.
  """
  found, seen = [], {os.path.realpath(root)}
  for directory, subdirs, files in os.walk(root, followlinks=True):
    kept = []
    for d in sorted(subdirs):
      real = os.path.realpath(os.path.join(directory, d))
      if not _is_hidden(d) and real not in seen:
        seen.add(real)
        kept.append(d)
    subdirs[:] = kept
    for name in files:
      if not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS):
        found.append(os.path.relpath(os.path.join(directory, name), root))
  return sorted(found)


class FolderSource:
  """PNG/JPEG files under a folder, decoded lazily by index.

  When every image sits below an immediate subdirectory, its label is the index
  of that subdirectory among the sorted subdirectory names; otherwise unlabeled.
  `unreadable()` decodes every file once; `drop(paths)` leaves some out.
  """

  _INLINE_BELOW = 16  # smaller reads are not worth a thread hop

  def __init__(self, root: str, image_size: int, channels: int, num_threads: int | None = None):
    self.root = root
    self._paths = _find_images(root)
    labeled = bool(self._paths) and all(os.sep in p for p in self._paths)
    if labeled:
      self.class_names = sorted(
          d for d in os.listdir(root)
          if not _is_hidden(d) and os.path.isdir(os.path.join(root, d)))
      index = {name: i for i, name in enumerate(self.class_names)}
      self._labels = np.array([index[p.split(os.sep, 1)[0]] for p in self._paths], np.int32)
    else:
      self.class_names = []
      self._labels = np.zeros(len(self._paths), np.int32)
    self.num_classes = len(self.class_names)
    self.image_size, self.channels = image_size, channels
    self.image_shape = (image_size, image_size, channels)
    self._num_threads = num_threads or min(16, os.cpu_count() or 1)
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None

  def __len__(self) -> int:
    return len(self._paths)

  def read(self, index: int) -> np.ndarray:
    path = os.path.join(self.root, self._paths[index])
    try:
      with Image.open(path) as image:
        return fit_image(image, self.image_size, self.channels)
    except Exception as e:  # pylint: disable=broad-except
      raise OSError(f'cannot read image {path!r}: {e}') from e

  def _map(self, fn, indices: list[int]) -> list:
    if len(indices) < self._INLINE_BELOW or self._num_threads <= 1:
      return [fn(i) for i in indices]
    if self._pool is None:  # PIL decodes outside the GIL, so threads help
      self._pool = concurrent.futures.ThreadPoolExecutor(self._num_threads, 'image-decode')
    return list(self._pool.map(fn, indices))

  def unreadable(self) -> list[tuple[str, str]]:
    """(path, reason) of every file that does not decode, in order."""

    def problem(index: int) -> tuple[str, str] | None:
      try:
        self.read(index)
        return None
      except OSError as e:
        return self._paths[index], str(e.__cause__ or e)

    return [p for p in self._map(problem, list(range(len(self)))) if p is not None]

  def drop(self, paths: set[str]) -> None:
    """Leaves the files `paths` (as `unreadable` names them) out of the source."""
    keep = [i for i, p in enumerate(self._paths) if p not in paths]
    self._paths = [self._paths[i] for i in keep]
    self._labels = self._labels[keep]

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    indices = [int(i) for i in np.asarray(indices).reshape(-1)]
    images = self._map(self.read, indices)
    stacked = np.stack(images) if images else np.zeros((0, *self.image_shape), np.uint8)
    return stacked, self._labels[indices]


def load_folder_source(path: str, image_size: int, channels: int, verify: bool = True,
                       skip_unreadable: bool = False) -> FolderSource:
  """The images under `path`; with `verify`, every file is decoded once now, so that an
  unreadable one is named before training starts (and left out with `skip_unreadable`)."""
  if not path:
    raise _config_error('path', "is required when data.name='folder'")
  if not os.path.isdir(path):
    raise _config_error('path', f'no such directory: {path!r}')
  source = FolderSource(path, image_size, channels)
  if not len(source):
    raise _config_error('path', f'no {"/".join(IMAGE_EXTENSIONS)} images found under {path!r}')
  if not verify:
    try:  # fail now, not mid-training, when the files are not images at all
      source.read(0)
    except OSError as e:
      raise _config_error('path', str(e)) from e
    return source
  log.info('Decoding the %d images under %s once, to find unreadable ones '
           '(data.verify_images=False skips this).', len(source), path)
  bad = source.unreadable()
  if bad and not skip_unreadable:
    first, reason = bad[0]
    raise _config_error('path', f'{len(bad)} of {len(source)} images under {path!r} cannot be '
                        f'read, the first {first!r}: {reason}; set data.skip_unreadable=True '
                        'to train without them')
  if bad:
    source.drop({p for p, _ in bad})
    log.warning('Skipped %d unreadable images under %s (the first: %s); %d remain.',
                len(bad), path, bad[0][0], len(source))
    if not len(source):
      raise _config_error('path', f'none of the images under {path!r} can be read')
  return source


# ----------------------------------------------------------------------- TFDS


class TfdsSource:
  """A prepared TFDS dataset read with random access (array_record, no TensorFlow)."""

  def __init__(self, data_source: Sequence[Any], image_key: str, label_key: str | None,
               image_shape: tuple[int, int, int], num_classes: int, resize: bool):
    self._data_source = data_source
    self._image_key, self._label_key = image_key, label_key
    self.image_shape, self.num_classes = image_shape, num_classes
    self._resize = resize  # dataset images vary in size: crop and resize each one

  def __len__(self) -> int:
    return len(self._data_source)

  def _image(self, example: dict[str, Any]) -> np.ndarray:
    image = np.asarray(example[self._image_key])
    if image.ndim == 2:
      image = image[..., None]
    if self._resize:
      pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
      image = fit_image(pil, self.image_shape[0], self.image_shape[2])
    return image.astype(np.uint8, copy=False)

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keys = [int(i) for i in np.asarray(indices).reshape(-1)]
    if hasattr(self._data_source, '__getitems__'):
      examples = self._data_source.__getitems__(keys)
    else:
      examples = [self._data_source[k] for k in keys]
    images = np.stack([self._image(e) for e in examples]) if examples else (
        np.zeros((0, *self.image_shape), np.uint8))
    if self._label_key is None:
      labels = np.zeros(len(keys), np.int32)
    else:
      labels = np.array([e[self._label_key] for e in examples], np.int32)
    return images, labels


def _prepare_hint(name: str, data_dir: str | None) -> str:
  target = data_dir or 'DIR'
  return (f'on a machine with internet access and TensorFlow installed run '
          f'`tfds build {name} --file_format=array_record --data_dir={target}`, '
          f'copy that folder here and set data.tfds_data_dir to it')


def load_tfds_source(name: str, split: str, data_dir: str | None, image_size: int,
                     channels: int) -> TfdsSource:
  """Opens a prepared TFDS dataset by name; never downloads."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise _config_error('name', f'{name!r} is read through TFDS, but tensorflow-datasets '
                        f'is not importable: {e}') from e
  where = data_dir or 'the TFDS default data dir'
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise _config_error('name', f'unknown dataset {name!r}: not one of {list(BUILTIN_NAMES)} '
                        f'nor a TFDS dataset (registered or prepared in {where})') from e
  if not builder.is_prepared():
    raise _config_error('name', f'TFDS dataset {name!r} is not prepared in {where}; '
                        + _prepare_hint(name, data_dir))

  features = builder.info.features
  image_key, label_key = 'image', 'label'
  if builder.info.supervised_keys and len(builder.info.supervised_keys) == 2:
    keys = builder.info.supervised_keys
    if all(isinstance(k, str) for k in keys):
      image_key, label_key = keys
  if image_key not in features:
    raise _config_error('name', f'TFDS dataset {name!r} has no {image_key!r} feature '
                        f'(features: {list(features.keys())})')
  image_feature = features[image_key]
  shape = tuple(image_feature.shape)
  if np.dtype(image_feature.np_dtype) != np.uint8 or len(shape) not in (2, 3):
    raise _config_error('name', f'TFDS dataset {name!r}: feature {image_key!r} is '
                        f'{image_feature.np_dtype} {shape}, expected uint8 (H, W, C) images')
  if len(shape) == 2:
    shape = (*shape, 1)
  resize = shape[0] is None or shape[1] is None
  if shape[2] is not None and shape[2] != channels:
    raise _config_error('channels', f'{channels} but TFDS dataset {name!r} has '
                        f'{shape[2]}-channel images; set data.channels={shape[2]}')
  if not resize:
    _check_size(shape, image_size, f'TFDS dataset {name!r}')

  num_classes = 0
  if label_key in features and hasattr(features[label_key], 'num_classes'):
    num_classes = int(features[label_key].num_classes)
  else:
    label_key = None

  try:
    data_source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except NotImplementedError as e:  # prepared, but as tfrecord: no random access
    raise _config_error('name', f'TFDS dataset {name!r} in {where} is not stored as '
                        'array_record, which random access needs; '
                        + _prepare_hint(name, data_dir)) from e
  except (ValueError, KeyError) as e:
    raise _config_error('split', f'{split!r} is not a split of TFDS dataset {name!r} '
                        f'(splits: {list(builder.info.splits.keys())}): {e}') from e
  return TfdsSource(data_source, image_key, label_key,
                    (image_size, image_size, channels), num_classes, resize)


# -------------------------------------------------------------------- factory


def _check_size(shape: Sequence[int], image_size: int, what: str) -> None:
  height, width = shape[0], shape[1]
  if height != width:
    raise _config_error('image_size', f'{what} has non-square {height}x{width} images; '
                        'use data.name=\'folder\' (center-crops) or crop them first')
  if height != image_size:
    raise _config_error('image_size', f'{image_size} but {what} has {height}x{width} '
                        f'images; set data.image_size={height}')


def _check_shape(source: ImageSource, image_size: int, channels: int, what: str) -> None:
  _check_size(source.image_shape, image_size, what)
  if source.image_shape[2] != channels:
    raise _config_error('channels', f'{channels} but {what} has {source.image_shape[2]}-'
                        f'channel images; set data.channels={source.image_shape[2]}')


def create_source(data_config: Any) -> ImageSource:
  """Builds and validates the source named by `data_config.name`.

  Raises ValueError with one line naming the offending `data.<field>`.
  """
  name = _field(data_config, 'name')
  if not name or not isinstance(name, str):
    raise _config_error('name', f"is required: one of {list(BUILTIN_NAMES)} or a TFDS "
                        "name such as 'cifar10'")
  image_size = _field(data_config, 'image_size')
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size <= 0:
    raise _config_error('image_size', f'must be a positive integer, got {image_size!r}')
  channels = _field(data_config, 'channels')
  if channels not in (1, 3) or isinstance(channels, bool):
    raise _config_error('channels', f'must be 1 (grey) or 3 (RGB), got {channels!r}')
  image_size, channels = int(image_size), int(channels)
  path = _field(data_config, 'path', '')
  if path:
    path = os.path.expanduser(str(path))

  if name == 'digits':
    source = load_digits_source()
    _check_shape(source, image_size, channels, "the embedded 'digits' data set")
  elif name == 'npz':
    source = load_npz_source(path)
    _check_shape(source, image_size, channels, repr(path))
  elif name == 'folder':
    source = load_folder_source(path, image_size, channels,
                                bool(_field(data_config, 'verify_images', True)),
                                bool(_field(data_config, 'skip_unreadable', False)))
  else:
    split = _field(data_config, 'split', 'train') or 'train'
    data_dir = _field(data_config, 'tfds_data_dir') or None
    if data_dir:
      data_dir = os.path.expanduser(str(data_dir))
    source = load_tfds_source(name, split, data_dir, image_size, channels)

  if not len(source):
    raise _config_error('name', f'data set {name!r} has no examples')
  return source
