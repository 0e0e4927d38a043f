"""The ADM U-Net (guided-diffusion's UNetModel) in Flax linen, NHWC.

Submodules are named by role so the parameter tree reads like the network:
`down_{level}_res_{i}`, `down_{level}_attn_{i}`, `down_{level}_downsample`,
`mid_res_0`, `mid_attn`, `mid_res_1`, `up_{level}_res_{i}`, `up_{level}_attn_{i}`,
`up_{level}_upsample`, plus `time_embed_0/1`, `label_emb`, `conv_in`, `out_norm`,
`out_conv`. Level 0 is the full resolution.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from atdiff_jax.config import REMAT_MODES
from atdiff_jax.models.layers import (AttentionBlock, Downsample, ResBlock, Upsample,
                                      conv, dense, group_norm32, timestep_embedding)

Dtype = Any

# Recomputed in the backward pass instead of storing activations (`UNet.remat`). The
# parameter tree is unchanged: the blocks keep their names. ResBlock's `train` (argument 3,
# counting self) is static, as it decides dropout at trace time.
_RematResBlock = nn.remat(ResBlock, static_argnums=(3,))
_RematAttentionBlock = nn.remat(AttentionBlock)


def count_params(tree: Any) -> int:
  """Total number of scalars in a pytree of arrays or jax.ShapeDtypeStruct."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


class UNet(nn.Module):
  """ADM U-Net predicting `out_channels` channels (2C when sigma is learned).

  attn_resolutions are feature-map heights in pixels (e.g. (16, 8) for 32x32
  inputs); the middle block always has attention. With `dtype` bfloat16 the
  convolutions and attention run in bfloat16 while the norms, the timestep and
  label embeddings and the output head stay in float32, like ADM's fp16 mode.

  The network sees timesteps t * timestep_scale (improved-diffusion's rescale_timesteps
  is 1000 / T). remat ('none' | 'attention' | 'blocks') recomputes the attention blocks,
  or every residual and attention block, in the backward pass: less memory, same values
  (guided-diffusion's use_checkpoint is 'blocks').
  """
  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  out_channels: int
  resblock_updown: bool
  use_scale_shift_norm: bool
  num_heads: int = 4
  num_head_channels: int = -1
  num_heads_upsample: int = -1  # heads of the decoder's attention; -1: num_heads
  dropout: float = 0.0
  num_classes: int = 0
  timestep_scale: float = 1.0
  remat: str = 'none'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array | None) -> None:
    """Shape and argument checks with messages in the user's words (trace time)."""
    if self.remat not in REMAT_MODES:
      raise ValueError(f"remat must be one of {', '.join(REMAT_MODES)}, got {self.remat!r}")
    if x.ndim != 4:
      raise ValueError(f"x must be NHWC, got shape {x.shape}")
    factor = 2 ** (len(self.ch_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not divisible by {factor}, "
                       f"which {len(self.ch_mult)} levels (ch_mult={self.ch_mult}) need")
    sizes = {x.shape[1] // 2 ** level for level in range(len(self.ch_mult))}
    unused = sorted(set(self.attn_resolutions) - sizes)
    if unused:
      raise ValueError(f"attn_resolutions {unused} match no feature-map size for "
                       f"{x.shape[1]}x{x.shape[2]} inputs (sizes: {sorted(sizes)})")
    if t.shape != (x.shape[0],):
      raise ValueError(f"t must have shape ({x.shape[0]},), got {t.shape}")
    if self.num_classes > 0 and y is None:
      raise ValueError(f"the model is class-conditional ({self.num_classes} classes) "
                       "but no labels y were given")
    if self.num_classes == 0 and y is not None:
      raise ValueError("labels y were given to an unconditional model (num_classes=0)")
    if y is not None and y.shape != (x.shape[0],):
      raise ValueError(f"y must have shape ({x.shape[0]},), got {y.shape}")

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
               train: bool) -> jax.Array:
    t = jnp.asarray(t)
    self._check_inputs(x, t, y)
    pd = self.param_dtype
    kw = dict(dtype=self.dtype, param_dtype=pd)
    res_kw = dict(dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm, **kw)
    attn_kw = dict(num_heads=self.num_heads, num_head_channels=self.num_head_channels, **kw)
    heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
    up_attn_kw = dict(attn_kw, num_heads=heads_up)
    res_block = _RematResBlock if self.remat == 'blocks' else ResBlock
    attn_block = AttentionBlock if self.remat == 'none' else _RematAttentionBlock
    last = len(self.ch_mult) - 1

    # Timestep (and label) embedding, in float32 as in ADM.
    if self.timestep_scale != 1.0:
      t = t.astype(jnp.float32) * self.timestep_scale
    emb = timestep_embedding(t, self.ch)
    emb = dense(emb, 4 * self.ch, name="time_embed_0", param_dtype=pd)
    emb = dense(nn.silu(emb), 4 * self.ch, name="time_embed_1", param_dtype=pd)
    if self.num_classes > 0:
      emb = emb + nn.Embed(self.num_classes, 4 * self.ch, param_dtype=pd,
                           embedding_init=nn.initializers.normal(1.0),  # as nn.Embedding
                           name="label_emb")(y)

    h = conv(x.astype(self.dtype), self.ch * self.ch_mult[0], 3, name="conv_in", **kw)
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = res_block(self.ch * mult, name=f"down_{level}_res_{i}", **res_kw)(h, emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(name=f"down_{level}_attn_{i}", **attn_kw)(h)
        skips.append(h)
      if level != last:
        if self.resblock_updown:
          h = res_block(h.shape[-1], down=True, name=f"down_{level}_downsample",
                        **res_kw)(h, emb, train)
        else:
          h = Downsample(name=f"down_{level}_downsample", **kw)(h)
        skips.append(h)

    h = res_block(h.shape[-1], name="mid_res_0", **res_kw)(h, emb, train)
    h = attn_block(name="mid_attn", **attn_kw)(h)
    h = res_block(h.shape[-1], name="mid_res_1", **res_kw)(h, emb, train)

    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)  # ADM's order: [h, skip]
        h = res_block(self.ch * mult, name=f"up_{level}_res_{i}", **res_kw)(h, emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(name=f"up_{level}_attn_{i}", **up_attn_kw)(h)
      if level != 0:
        if self.resblock_updown:
          h = res_block(h.shape[-1], up=True, name=f"up_{level}_upsample",
                        **res_kw)(h, emb, train)
        else:
          h = Upsample(name=f"up_{level}_upsample", **kw)(h)

    # Output head in float32 (ADM casts back before `out`); zero-initialised conv.
    h = nn.silu(group_norm32(h, name="out_norm", param_dtype=pd))
    return conv(h, self.out_channels, 3, name="out_conv", zero_init=True,
                dtype=jnp.float32, param_dtype=pd).astype(jnp.float32)
