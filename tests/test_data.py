"""Tests for atdiff_jax.data: sources, stateless batch indexing, sharded stream."""
import os
import re

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from atdiff_jax import data
from atdiff_jax.config import ConfigError


def _config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      name='digits', path='', tfds_data_dir='', split='train', image_size=8,
      channels=1, random_flip=True))
  config.update(overrides)
  return config


def _mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.array(jax.devices()), ('data',))


def _random_npz(path, n=40, size=4, channels=3, seed=0, **extra):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
  labels = rng.integers(0, 5, n).astype(np.int64)
  np.savez(path, images=images, labels=labels, **extra)
  return images, labels


# ------------------------------------------------------------------- sources


def test_digits_asset_shape_dtype_and_labels():
  source = data.create_source(_config())
  assert len(source) == 1797
  assert source.image_shape == (8, 8, 1)
  assert source.num_classes == 10
  images, labels = source.get(np.arange(len(source)))
  assert images.dtype == np.uint8 and images.shape == (1797, 8, 8, 1)
  assert labels.dtype == np.int32
  assert set(np.unique(labels)) == set(range(10))
  assert np.bincount(labels).min() >= 170  # roughly balanced classes
  # 17 grey levels 0..16 scaled by 255/16 and rounded.
  expected_levels = np.round(np.arange(17) * 255 / 16).astype(np.uint8)
  assert np.array_equal(np.unique(images), expected_levels)


def test_npz_source_reads_images_and_labels(tmp_path):
  images, labels = _random_npz(tmp_path / 'd.npz', n=6)
  source = data.create_source(_config(name='npz', path=str(tmp_path / 'd.npz'),
                                      image_size=4, channels=3))
  assert len(source) == 6 and source.image_shape == (4, 4, 3)
  assert source.num_classes == labels.max() + 1
  got_images, got_labels = source.get(np.array([5, 0, 2]))
  np.testing.assert_array_equal(got_images, images[[5, 0, 2]])
  np.testing.assert_array_equal(got_labels, labels[[5, 0, 2]])
  assert got_labels.dtype == np.int32


def test_npz_source_alternative_key_grey_and_unlabeled(tmp_path):
  grey = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
  np.savez(tmp_path / 'g.npz', arr_0=grey)
  source = data.create_source(_config(name='npz', path=str(tmp_path / 'g.npz'),
                                      image_size=4, channels=1))
  assert source.num_classes == 0 and source.image_shape == (4, 4, 1)
  images, labels = source.get(np.array([1]))
  np.testing.assert_array_equal(images[0, ..., 0], grey[1])
  np.testing.assert_array_equal(labels, [0])


def _write_image(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def test_folder_source_labels_crop_and_resize(tmp_path):
  # 4 rows x 6 columns: the center crop drops columns 0 and 5.
  wide = np.zeros((4, 6, 3), np.uint8)
  wide[:, 1:3] = 200  # left half of the crop
  wide[:, 0] = 255  # outside the crop: must not leak into the result
  _write_image(str(tmp_path / 'b_dog' / 'x.png'), wide)
  _write_image(str(tmp_path / 'a_cat' / 'nested' / 'y.png'), np.full((2, 2, 3), 7, np.uint8))
  _write_image(str(tmp_path / 'a_cat' / 'z.jpg'), np.full((8, 8, 3), 128, np.uint8))
  (tmp_path / 'a_cat' / 'notes.txt').write_text('not an image')

  source = data.create_source(_config(name='folder', path=str(tmp_path), image_size=2,
                                      channels=3))
  assert len(source) == 3 and source.num_classes == 2
  assert source.image_shape == (2, 2, 3)
  images, labels = source.get(np.arange(3))
  assert images.dtype == np.uint8 and images.shape == (3, 2, 2, 3)
  # Sorted relative paths: a_cat/nested/y.png, a_cat/z.jpg, b_dog/x.png.
  np.testing.assert_array_equal(labels, [0, 0, 1])
  np.testing.assert_array_equal(images[0], np.full((2, 2, 3), 7))  # upsampled, constant
  assert np.all(np.abs(images[1].astype(int) - 128) <= 2)  # JPEG is lossy
  np.testing.assert_array_equal(images[2][:, 0], np.full((2, 3), 200))  # area average
  np.testing.assert_array_equal(images[2][:, 1], np.zeros((2, 3)))


def test_unreadable_images_are_named_before_training_or_skipped_and_counted(tmp_path,
                                                                           caplog):
  for i in range(3):
    _write_image(str(tmp_path / f'good{i}.png'), np.full((8, 8, 3), 40 * i, np.uint8))
  whole = (tmp_path / 'good0.png').read_bytes()
  (tmp_path / 'truncated.png').write_bytes(whole[:len(whole) // 2])
  (tmp_path / 'zero.png').write_bytes(b'')
  folder = _config(name='folder', path=str(tmp_path), image_size=8, channels=3)
  with pytest.raises(ConfigError, match=r"config.data.path: 2 of 5 images under .* "
                     r"cannot be read, the first .*truncated\.png.*skip_unreadable=True"):
    data.create_source(folder)
  folder.skip_unreadable = True
  with caplog.at_level('WARNING'):
    source = data.create_source(folder)
  assert len(source) == 3
  assert 'Skipped 2 unreadable images' in caplog.text
  images, _ = source.get(np.arange(3))
  np.testing.assert_array_equal(images[:, 0, 0, 0], [0, 40, 80])


def test_folder_source_flat_is_unlabeled_and_grey(tmp_path):
  for i in range(3):
    _write_image(str(tmp_path / f'{i}.png'), np.full((4, 4, 3), 50 * i, np.uint8))
  source = data.create_source(_config(name='folder', path=str(tmp_path), image_size=4,
                                      channels=1))
  assert source.num_classes == 0 and source.image_shape == (4, 4, 1)
  images, labels = source.get(np.array([2, 1]))
  assert images.shape == (2, 4, 4, 1)
  np.testing.assert_array_equal(images[:, 0, 0, 0], [100, 50])
  np.testing.assert_array_equal(labels, [0, 0])


def test_folder_links_are_followed_each_real_folder_once(tmp_path):
  """`a -> .` listed every file again at each depth (41 times); two such links never ended.
  A link to a folder elsewhere is still followed."""
  (tmp_path / 'data' / 'sub').mkdir(parents=True)
  (tmp_path / 'elsewhere').mkdir()
  for i, folder in enumerate(('data', 'data/sub', 'elsewhere')):
    _write_image(str(tmp_path / folder / f'{i}.png'), np.full((4, 4, 3), 50 * i, np.uint8))
  os.symlink('.', tmp_path / 'data' / 'a')
  os.symlink('.', tmp_path / 'data' / 'b')
  os.symlink('..', tmp_path / 'data' / 'sub' / 'up')
  os.symlink(tmp_path / 'elsewhere', tmp_path / 'data' / 'linked')
  source = data.create_source(_config(name='folder', path=str(tmp_path / 'data'),
                                      image_size=4, channels=1))
  assert len(source) == 3
  np.testing.assert_array_equal(np.sort(source.get(np.arange(3))[0][:, 0, 0, 0]), [0, 50, 100])


# ----------------------------------------------------------------------- TFDS

_TFDS_SIZE = 4


def _tiny_builder_class():
  """A TFDS builder defined on demand so importing this module stays cheap."""
  tfds = pytest.importorskip('tensorflow_datasets')

  class AtdiffTinyImages(tfds.core.GeneratorBasedBuilder):
    """12 constant 4x4 RGB images, labels i % 3."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Tensor(shape=(_TFDS_SIZE, _TFDS_SIZE, 3),
                                            dtype=np.uint8),
              'label': tfds.features.ClassLabel(num_classes=3),
          }),
          supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(12), 'test': self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {'image': np.full((_TFDS_SIZE, _TFDS_SIZE, 3), 10 * i, np.uint8),
                  'label': i % 3}

  return AtdiffTinyImages


@pytest.fixture(scope='module')
def tiny_tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builder = _tiny_builder_class()(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  return data_dir


def test_tfds_source_reads_custom_builder_offline(tiny_tfds_dir):
  source = data.create_source(_config(name='atdiff_tiny_images', tfds_data_dir=tiny_tfds_dir,
                                      image_size=_TFDS_SIZE, channels=3))
  assert len(source) == 12
  assert source.image_shape == (_TFDS_SIZE, _TFDS_SIZE, 3) and source.num_classes == 3
  images, labels = source.get(np.arange(12)[::-1])
  assert images.dtype == np.uint8 and labels.dtype == np.int32
  assert images.shape == (12, _TFDS_SIZE, _TFDS_SIZE, 3)
  # TFDS shuffles on write: check the pairing, not the order.
  example_ids = images[:, 0, 0, 0] // 10
  assert sorted(example_ids) == list(range(12))
  np.testing.assert_array_equal(labels, example_ids % 3)
  np.testing.assert_array_equal(source.get(np.array([3]))[0][0], images[8])
  test_split = data.create_source(_config(name='atdiff_tiny_images', split='test',
                                          tfds_data_dir=tiny_tfds_dir,
                                          image_size=_TFDS_SIZE, channels=3))
  assert len(test_split) == 3


def test_tfds_unlabeled_variable_size_images_are_cropped_and_resized(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')

  class AtdiffTinyVarSize(tfds.core.GeneratorBasedBuilder):
    """Unlabeled constant images of growing height."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8,
                                        encoding='zlib')}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i in range(4):
        yield i, {'image': np.full((4 + 2 * i, 6, 3), 9 * i, np.uint8)}

  AtdiffTinyVarSize(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  source = data.create_source(_config(name='atdiff_tiny_var_size', tfds_data_dir=str(tmp_path),
                                      image_size=2, channels=3))
  assert source.num_classes == 0 and source.image_shape == (2, 2, 3)
  images, labels = source.get(np.arange(4))
  assert images.shape == (4, 2, 2, 3) and images.dtype == np.uint8
  assert sorted(images[:, 1, 1, 2]) == [0, 9, 18, 27]
  np.testing.assert_array_equal(labels, np.zeros(4))


def test_tfds_errors(tiny_tfds_dir, tmp_path):
  tfds_config = dict(name='atdiff_tiny_images', tfds_data_dir=tiny_tfds_dir,
                     image_size=_TFDS_SIZE, channels=3)
  with pytest.raises(ValueError, match=r"^config\.data\.split: 'valid'"):
    data.create_source(_config(**{**tfds_config, 'split': 'valid'}))
  with pytest.raises(ValueError, match=r'^config\.data\.image_size: 8 .*set data\.image_size=4'):
    data.create_source(_config(**{**tfds_config, 'image_size': 8}))
  with pytest.raises(ValueError, match=r'^config\.data\.channels: 1 '):
    data.create_source(_config(**{**tfds_config, 'channels': 1}))
  # Registered but not prepared in this directory: says how to prepare it.
  with pytest.raises(ValueError, match=r'^config\.data\.name: .*not prepared.*tfds build '
                     r'atdiff_tiny_images --file_format=array_record'):
    data.create_source(_config(**{**tfds_config, 'tfds_data_dir': str(tmp_path)}))
  with pytest.raises(ValueError, match=r"^config\.data\.name: unknown dataset 'no_such_data_set_xyz'"):
    data.create_source(_config(name='no_such_data_set_xyz', tfds_data_dir=str(tmp_path)))


# ------------------------------------------------------------------ bad input


def _bad_inputs(tmp_path):
  np.savez(tmp_path / 'float.npz', images=np.zeros((4, 8, 8, 1), np.float32))
  np.savez(tmp_path / 'rank2.npz', images=np.zeros((4, 8), np.uint8))
  np.savez(tmp_path / 'nokey.npz', pictures=np.zeros((4, 8, 8, 1), np.uint8))
  np.savez(tmp_path / 'rgb.npz', images=np.zeros((4, 8, 8, 3), np.uint8))
  np.savez(tmp_path / 'rect.npz', images=np.zeros((4, 8, 6, 1), np.uint8))
  np.savez(tmp_path / 'badlabels.npz', images=np.zeros((4, 8, 8, 1), np.uint8),
           labels=np.zeros(3, np.int64))
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'readme.txt').write_text('no images here')
  (tmp_path / 'broken').mkdir()
  (tmp_path / 'broken' / 'a.png').write_bytes(b'not a png')
  with open(tmp_path / 'single.npz', 'wb') as f:  # np.save'd, then renamed
    np.save(f, np.zeros((2, 8, 8, 1), np.uint8))
  return [
      (dict(name=''), 'name', 'required'),
      (dict(image_size=0), 'image_size', 'positive integer'),
      (dict(channels=2), 'channels', '1 .grey. or 3'),
      (dict(image_size=32), 'image_size', r'32 but .*8x8.*set data\.image_size=8'),
      (dict(channels=3), 'channels', r'3 but .*1-channel'),
      (dict(name='npz'), 'path', 'required'),
      (dict(name='npz', path=str(tmp_path / 'missing.npz')), 'path', 'no such file'),
      (dict(name='npz', path=str(tmp_path / 'float.npz')), 'path', 'dtype float32'),
      (dict(name='npz', path=str(tmp_path / 'rank2.npz')), 'path', 'rank 4'),
      (dict(name='npz', path=str(tmp_path / 'nokey.npz')), 'path', 'no image array'),
      (dict(name='npz', path=str(tmp_path / 'rgb.npz')), 'channels', '3-channel'),
      (dict(name='npz', path=str(tmp_path / 'rect.npz')), 'image_size', 'non-square 8x6'),
      (dict(name='npz', path=str(tmp_path / 'badlabels.npz')), 'path', 'labels'),
      (dict(name='folder'), 'path', 'required'),
      (dict(name='folder', path=str(tmp_path / 'float.npz')), 'path', 'no such directory'),
      (dict(name='folder', path=str(tmp_path / 'empty')), 'path', 'no .* images found'),
      (dict(name='folder', path=str(tmp_path / 'broken')), 'path',
       r'1 of 1 images .* cannot be read, the first .*a\.png'),
      (dict(name='npz', path=str(tmp_path / 'single.npz')), 'path', 'a single .npy array'),
  ]


def test_create_source_rejects_bad_input_with_one_clear_line(tmp_path):
  for overrides, field, problem in _bad_inputs(tmp_path):
    with pytest.raises(ValueError) as info:
      data.create_source(_config(**overrides))
    message = str(info.value)
    assert '\n' not in message, message
    assert message.startswith(f'config.data.{field}: '), (overrides, message)
    assert re.search(problem, message), (overrides, message)


# ------------------------------------------------------------------ indexing


def test_global_batch_indices_cover_each_example_once_per_epoch():
  n, batch, seed = 10, 3, 5
  assert data.steps_per_epoch(n, batch) == 3
  epochs = []
  for epoch in range(3):
    rows = [data.global_batch_indices(n, batch, seed, epoch * 3 + s) for s in range(3)]
    seen = np.concatenate(rows)
    assert len(seen) == 9 and len(np.unique(seen)) == 9 and seen.max() < n
    epochs.append(seen)
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
  again = data.global_batch_indices(n, batch, seed, 4)
  np.testing.assert_array_equal(again, epochs[1][3:6])
  assert not np.array_equal(data.global_batch_indices(n, batch, seed + 1, 0), epochs[0][:3])
  with pytest.raises(ValueError, match='exceeds'):
    data.global_batch_indices(2, 3, seed, 0)


def test_two_process_split_partitions_the_global_batch():
  source = data.create_source(_config())
  batch, seed, step = 16, 3, 7
  whole = data.load_host_batch(source, batch, seed, step)
  parts = [data.load_host_batch(source, batch, seed, step, process_index=p, process_count=2)
           for p in range(2)]
  assert [data.process_batch_slice(batch, p, 2) for p in range(2)] == [slice(0, 8),
                                                                       slice(8, 16)]
  for k in range(2):
    assert parts[0][k].shape[0] == parts[1][k].shape[0] == 8
    np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), whole[k])
  with pytest.raises(ValueError, match='not divisible'):
    data.process_batch_slice(15, 0, 2)


def test_flip_is_deterministic_and_flips_some_images():
  source = data.create_source(_config())
  batch, seed = 32, 1
  np.testing.assert_array_equal(data.flip_mask(batch, seed, 4), data.flip_mask(batch, seed, 4))
  mask = data.flip_mask(batch, seed, 4)
  assert 0 < mask.sum() < batch
  assert not np.array_equal(mask, data.flip_mask(batch, seed, 5))
  plain, _ = data.load_host_batch(source, batch, seed, 4, random_flip=False)
  flipped, _ = data.load_host_batch(source, batch, seed, 4, random_flip=True)
  np.testing.assert_array_equal(flipped[mask], plain[mask][:, :, ::-1])
  np.testing.assert_array_equal(flipped[~mask], plain[~mask])
  assert not np.array_equal(flipped, plain)  # digits are not mirror-symmetric


def test_flip_never_writes_the_sources_storage():
  """A source may hand out views of its own arrays: flipping must copy first."""
  stored = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8, 1)
  kept = stored.copy()

  class ViewSource:
    def __len__(self):
      return 4

    def get(self, indices):
      del indices
      return stored, np.zeros(4, np.int32)  # the storage itself, not a copy

  images, _ = data.load_host_batch(ViewSource(), 4, 1, 0, random_flip=True)
  np.testing.assert_array_equal(stored, kept)
  assert not np.array_equal(images, kept)


def test_to_uint8_inverts_the_model_range():
  values = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(data.to_uint8(values / 127.5 - 1.0), values)
  np.testing.assert_array_equal(data.to_uint8(np.array([-3.0, 3.0, np.nan])), [0, 255, 0])


# -------------------------------------------------------------------- stream


def _as_numpy(batch):
  return {k: np.asarray(v) for k, v in batch.items()}


def test_stream_sharding_shape_and_range():
  mesh = _mesh()
  assert len(jax.devices()) == 8
  source = data.create_source(_config())
  with data.BatchStream(source, 16, seed=0, mesh=mesh) as stream:
    batch = next(stream)
    assert stream.step == 1
    expected_images, expected_labels = stream.host_batch(0)
  sharding = NamedSharding(mesh, P('data'))
  for key, shape, dtype in [('image', (16, 8, 8, 1), np.float32), ('label', (16,), np.int32)]:
    array = batch[key]
    assert array.shape == shape and array.dtype == dtype
    assert array.sharding.is_equivalent_to(sharding, array.ndim)
    assert len(array.addressable_shards) == 8
    assert {s.data.shape[0] for s in array.addressable_shards} == {2}
  images = np.asarray(batch['image'])
  assert images.min() == -1.0 and images.max() == 1.0
  np.testing.assert_allclose(images, expected_images / 127.5 - 1.0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(batch['label']), expected_labels)


def test_chunked_stream_stacks_the_same_batches_as_the_plain_one():
  """With chunk_size, items stack consecutive batches (each split over 'data') and the
  stream's step moves by the chunk; the batches are the plain stream's."""
  mesh = _mesh()
  source = data.create_source(_config())
  with data.BatchStream(source, 16, seed=3, mesh=mesh, start_step=1) as stream:
    plain = [_as_numpy(next(stream)) for _ in range(6)]
  sizes = {1: 3, 4: 1, 5: 2}
  with data.BatchStream(source, 16, seed=3, mesh=mesh, start_step=1,
                        chunk_size=sizes.__getitem__) as stream:
    chunks = [next(stream) for _ in range(3)]
    assert stream.step == 7
  assert [c['image'].shape for c in chunks] == [(3, 16, 8, 8, 1), (1, 16, 8, 8, 1),
                                               (2, 16, 8, 8, 1)]
  stacked = NamedSharding(mesh, P(None, 'data'))
  assert all(c['label'].sharding.is_equivalent_to(stacked, 2) for c in chunks)
  for key in ('image', 'label'):
    np.testing.assert_array_equal(np.concatenate([np.asarray(c[key]) for c in chunks]),
                                  np.stack([b[key] for b in plain]))


def test_stream_resume_reproduces_uninterrupted_batches(tmp_path):
  _random_npz(tmp_path / 'd.npz', n=40, size=4)  # 2 steps per epoch at batch 16
  source = data.create_source(_config(name='npz', path=str(tmp_path / 'd.npz'),
                                      image_size=4, channels=3))
  mesh = _mesh()
  with data.BatchStream(source, 16, seed=9, mesh=mesh) as stream:
    full = [_as_numpy(next(stream)) for _ in range(5)]
  with data.BatchStream(source, 16, seed=9, mesh=mesh, start_step=3) as stream:
    assert stream.step == 3
    resumed = [_as_numpy(next(stream)) for _ in range(2)]
    assert stream.step == 5
  for expected, got in zip(full[3:], resumed):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(got[key], expected[key])
  assert not np.array_equal(full[0]['image'], full[2]['image'])  # new epoch order


class _FailingSource:
  """Serves two good batches, then fails like a corrupt file would."""

  def __init__(self, base):
    self.base, self.calls = base, 0
    self.image_shape, self.num_classes = base.image_shape, base.num_classes

  def __len__(self):
    return len(self.base)

  def get(self, indices):
    self.calls += 1
    if self.calls > 2:
      raise OSError('disk on fire')
    return self.base.get(indices)


def test_stream_surfaces_loader_errors_and_closes():
  mesh = _mesh()
  stream = data.BatchStream(_FailingSource(data.create_source(_config())), 8, seed=0,
                            mesh=mesh, prefetch=1)
  next(stream)
  next(stream)
  with pytest.raises(RuntimeError, match='loading batch 2 failed: OSError: disk on fire'):
    next(stream)
  with pytest.raises(RuntimeError):
    next(stream)  # stays failed
  assert not stream._thread.is_alive()  # pylint: disable=protected-access

  with data.BatchStream(data.create_source(_config()), 8, seed=0, mesh=mesh) as stream:
    next(stream)
  assert not stream._thread.is_alive()  # pylint: disable=protected-access
  with pytest.raises(RuntimeError, match='closed'):
    next(stream)


def test_stream_rejects_bad_batch_sizes():
  mesh, source = _mesh(), data.create_source(_config())
  with pytest.raises(ValueError, match='not divisible by the 8 devices'):
    data.BatchStream(source, 12, seed=0, mesh=mesh)
  with pytest.raises(ValueError, match='exceeds'):
    data.BatchStream(source, 8 * 300, seed=0, mesh=mesh)
