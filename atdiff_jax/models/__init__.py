"""Model construction from the config's `model` block."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from atdiff_jax.config import image_shape, model_field


def create_model(config: ml_collections.ConfigDict):
  """The ADM U-Net described by `config.model` for images of `config.data`."""
  from atdiff_jax.models.unet import UNet  # pylint: disable=g-import-not-at-top
  m = config.model
  channels = config.data.channels
  return UNet(
      ch=m.ch,
      ch_mult=tuple(m.ch_mult),
      num_res_blocks=m.num_res_blocks,
      attn_resolutions=tuple(m.attn_resolutions),
      num_heads=m.num_heads,
      num_head_channels=m.num_head_channels,
      dropout=m.dropout,
      out_channels=2 * channels if m.learn_sigma else channels,
      num_classes=m.num_classes,
      resblock_updown=m.resblock_updown,
      use_scale_shift_norm=m.use_scale_shift_norm,
      dtype=jnp.dtype(m.dtype),
      num_heads_upsample=model_field(m, 'num_heads_upsample'),
      timestep_scale=float(model_field(m, 'timestep_scale')),
      remat=model_field(m, 'remat'),
  )


def init_params(model, config: ml_collections.ConfigDict, rng):
  """Fresh params of `model` for images of `config.data` (labels when class-conditional)."""
  y = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None
  return model.init({'params': rng}, jnp.zeros((1, *image_shape(config))), jnp.zeros((1,)), y,
                    train=False)['params']


def abstract_params(config: ml_collections.ConfigDict, model=None, sharding=None):
  """The shapes and dtypes of the params `config`'s network has (ShapeDtypeStructs, on
  `sharding` if given), without computing any: what a checkpoint is restored into."""
  model = create_model(config) if model is None else model
  tree = jax.eval_shape(lambda: init_params(model, config, jax.random.key(0)))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def make_apply_fn(model):
  """`apply(params, x, t, y, train, rng)`: the pure function losses and samplers call."""

  def apply(params, x, t, y=None, train=False, rng=None):
    rngs = {'dropout': rng} if train and rng is not None else None
    return model.apply({'params': params}, x, t, y, train=train, rngs=rngs)

  return apply
