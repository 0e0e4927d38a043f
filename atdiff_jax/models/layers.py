"""Building blocks of the ADM U-Net (guided-diffusion), NHWC, in Flax linen.

Mixed precision follows ADM's fp16 recipe: convolutions (including the 1x1
attention projections) run in the compute `dtype`; group norms, the
timestep-embedding projections and the softmax run in float32; parameters are
always stored in `param_dtype`.
"""
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

# PyTorch's default Conv/Linear init: weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps: [cos | sin], float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def upsample_nearest(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling of an NHWC tensor."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 average pooling with stride 2 of an NHWC tensor."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).astype(x.dtype)


def conv(x: jax.Array, features: int, kernel: int, *, name: str, stride: int = 1,
         zero_init: bool = False, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32) -> jax.Array:
  """ADM's conv_nd: PyTorch-initialised 2D conv with symmetric padding.

  Call inside a compact method; the conv becomes a submodule named `name`.
  """
  pad = kernel // 2
  fan_in = x.shape[-1] * kernel * kernel
  zeros = nn.initializers.zeros
  return nn.Conv(
      features, (kernel, kernel), strides=stride,
      padding=((pad, pad), (pad, pad)),  # explicit: 'SAME' with stride 2 pads (0, 1)
      kernel_init=zeros if zero_init else torch_kernel_init,
      bias_init=zeros if zero_init else torch_bias_init(fan_in),
      dtype=dtype, param_dtype=param_dtype, name=name)(x)


def dense(x: jax.Array, features: int, *, name: str, zero_init: bool = False,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> jax.Array:
  """ADM's linear (and 1x1 conv over tokens), PyTorch-initialised; call inside compact."""
  zeros = nn.initializers.zeros
  return nn.Dense(
      features,
      kernel_init=zeros if zero_init else torch_kernel_init,
      bias_init=zeros if zero_init else torch_bias_init(x.shape[-1]),
      dtype=dtype, param_dtype=param_dtype, name=name)(x)


def group_norm32(x: jax.Array, *, name: str, param_dtype: Dtype = jnp.float32) -> jax.Array:
  """ADM's GroupNorm32: 32 groups, eps 1e-5, in float32; returns float32."""
  return nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=jnp.float32,
                      param_dtype=param_dtype, name=name)(x.astype(jnp.float32))


class ResBlock(nn.Module):
  """ADM residual block with timestep conditioning and optional 2x up/down."""
  out_ch: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  up: bool = False
  down: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  # `train` may be passed by position: nn.remat can only treat positional arguments as static.
  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pd = self.param_dtype
    h = nn.silu(group_norm32(x, name="in_norm", param_dtype=pd)).astype(self.dtype)
    # Resampling sits between the activation and the conv, for h and skip alike.
    if self.up:
      h, x = upsample_nearest(h), upsample_nearest(x)
    elif self.down:
      h, x = avg_pool_2x2(h), avg_pool_2x2(x)
    h = conv(h, self.out_ch, 3, name="in_conv", **kw)

    # ADM keeps the embedding projection (a Linear) in float32.
    emb_dim = 2 * self.out_ch if self.use_scale_shift_norm else self.out_ch
    emb_out = dense(nn.silu(emb), emb_dim, name="emb_proj", param_dtype=pd)
    emb_out = emb_out[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = group_norm32(h, name="out_norm", param_dtype=pd) * (1.0 + scale) + shift
    else:
      h = group_norm32(h + emb_out.astype(h.dtype), name="out_norm", param_dtype=pd)
    h = nn.silu(h).astype(self.dtype)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(h, self.out_ch, 3, name="out_conv", zero_init=True, **kw)

    if x.shape[-1] != self.out_ch:
      x = conv(x, self.out_ch, 1, name="skip", **kw)
    return x.astype(self.dtype) + h


class AttentionBlock(nn.Module):
  """ADM self-attention over spatial positions, "new" order (QKVAttention).

  The qkv projection's channels are laid out [q | k | v], each split into heads
  afterwards; q and k are each scaled by head_ch ** -0.25 before the product.
  """
  num_heads: int = 1
  num_head_channels: int = -1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    if self.num_head_channels == -1:
      heads = self.num_heads
    else:
      if c % self.num_head_channels:
        raise ValueError(f"attention channels {c} are not divisible by "
                         f"num_head_channels {self.num_head_channels}")
      heads = c // self.num_head_channels
    if c % heads:
      raise ValueError(f"attention channels {c} are not divisible by num_heads {heads}")
    head_ch = c // heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    h = group_norm32(x, name="norm", param_dtype=self.param_dtype).astype(self.dtype)
    qkv = dense(h.reshape(b, hgt * wid, c), 3 * c, name="qkv", **kw)
    q, k, v = (a.reshape(b, hgt * wid, heads, head_ch) for a in jnp.split(qkv, 3, axis=-1))
    scale = 1.0 / math.sqrt(math.sqrt(head_ch))  # on q and k each: gentler in low precision
    logits = jnp.einsum("bthc,bshc->bhts", q * scale, k * scale)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    a = jnp.einsum("bhts,bshc->bthc", weights, v).reshape(b, hgt * wid, c)
    a = dense(a, c, name="proj_out", zero_init=True, **kw)
    return x.astype(self.dtype) + a.reshape(b, hgt, wid, c)


class Downsample(nn.Module):
  """Stride-2 3x3 conv (ADM's Downsample with conv_resample=True)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return conv(x, x.shape[-1], 3, stride=2, name="op", dtype=self.dtype,
                param_dtype=self.param_dtype)


class Upsample(nn.Module):
  """Nearest 2x upsampling then a 3x3 conv (ADM's Upsample, conv_resample=True)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return conv(upsample_nearest(x), x.shape[-1], 3, name="conv", dtype=self.dtype,
                param_dtype=self.param_dtype)
