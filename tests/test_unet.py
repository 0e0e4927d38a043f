"""Tests for the ADM U-Net port: shapes, dtypes, parameter counts, conditioning."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atdiff_jax.models.layers import timestep_embedding
from atdiff_jax.models.unet import UNet, count_params

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_head_channels=16,
            resblock_updown=True, use_scale_shift_norm=True)
IMAGENET64 = dict(ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3, attn_resolutions=(32, 16, 8),
                  num_head_channels=64, dropout=0.1, out_channels=6, num_classes=1000,
                  resblock_updown=True, use_scale_shift_norm=True)
CIFAR10 = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=3, attn_resolutions=(16, 8),
               num_head_channels=32, dropout=0.3, out_channels=6, num_classes=0,
               resblock_updown=True, use_scale_shift_norm=True)


def _key(seed: int) -> jax.Array:
  # Flax folds the module path into the key for every parameter; with threefry that
  # dominates the tests' compile time on CPU, 'unsafe_rbg' compiles several times faster.
  return jax.random.key(seed, impl="unsafe_rbg")


def _inputs(batch: int = 2, size: int = 8, channels: int = 3, labels: bool = False):
  x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, size, size, channels)),
                  jnp.float32)
  t = jnp.array([0.0, 517.25])[:batch]  # fractional timesteps, as respaced samplers use
  y = jnp.array([1, 3])[:batch] if labels else None
  return x, t, y


def _perturb(params, scale: float = 0.1):
  """Moves every parameter away from its init (zero-init layers make outputs trivial)."""
  rng = np.random.default_rng(42)  # numpy: eager jax RNG would compile once per shape
  return jax.tree.map(
      lambda p: np.asarray(p) + scale * rng.standard_normal(p.shape).astype(p.dtype), params)


def _abstract_params(model: UNet, size: int, labels: bool):
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32) if labels else None
  return jax.eval_shape(
      lambda x, t, y: model.init({"params": jax.random.key(0)}, x, t, y, train=False),
      x, t, y)["params"]


def _adm_param_count(ch, ch_mult, num_res_blocks, attn_resolutions, out_channels, num_classes,
                     resblock_updown, use_scale_shift_norm, image_size, in_channels=3, **_):
  """Parameter count of ADM's UNetModel, derived by hand from its layer list."""
  emb = 4 * ch
  conv = lambda i, o, k: i * o * k * k + o
  norm = lambda c: 2 * c

  def res(i, o):
    emb_proj = conv(emb, 2 * o if use_scale_shift_norm else o, 1)
    skip = conv(i, o, 1) if i != o else 0
    return norm(i) + conv(i, o, 3) + emb_proj + norm(o) + conv(o, o, 3) + skip

  attn = lambda c: norm(c) + conv(c, 3 * c, 1) + conv(c, c, 1)
  resample = lambda c: res(c, c) if resblock_updown else conv(c, c, 3)

  total = conv(ch, emb, 1) + conv(emb, emb, 1) + num_classes * emb
  c = ch * ch_mult[0]
  total += conv(in_channels, c, 3)
  skips, size = [c], image_size
  for level, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      total += res(c, ch * mult) + (attn(ch * mult) if size in attn_resolutions else 0)
      c = ch * mult
      skips.append(c)
    if level != len(ch_mult) - 1:
      total += resample(c)
      skips.append(c)
      size //= 2
  total += 2 * res(c, c) + attn(c)
  for level, mult in reversed(list(enumerate(ch_mult))):
    for _ in range(num_res_blocks + 1):
      total += res(c + skips.pop(), ch * mult)
      c = ch * mult
      total += attn(c) if size in attn_resolutions else 0
    if level:
      total += resample(c)
      size *= 2
  return total + norm(c) + conv(c, out_channels, 3)


def test_timestep_embedding_is_cos_then_sin():
  emb = timestep_embedding(jnp.array([0.0, 2.0]), 6)
  freqs = np.exp(-np.log(10000.0) * np.arange(3) / 3)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 0, 0, 0], atol=1e-7)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(2 * freqs), np.sin(2 * freqs)]),
                             rtol=1e-6)


def test_parameter_counts_match_adm():
  imagenet = count_params(_abstract_params(UNet(**IMAGENET64), 64, labels=True))
  cifar = count_params(_abstract_params(UNet(**CIFAR10), 32, labels=False))
  assert imagenet == 295_904_454
  assert cifar == 57_094_662
  assert imagenet == _adm_param_count(**IMAGENET64, image_size=64)
  assert cifar == _adm_param_count(**CIFAR10, image_size=32)
  # The other block options (conv resampling, additive embedding) count right too.
  plain = dict(CIFAR10, resblock_updown=False, use_scale_shift_norm=False, num_classes=10)
  assert (count_params(_abstract_params(UNet(**plain), 32, labels=True))
          == _adm_param_count(**plain, image_size=32))


@pytest.fixture(scope="module")
def conditional():
  """A tiny class-conditional, learned-sigma model, its init params and a jitted forward."""
  model = UNet(out_channels=6, num_classes=5, dropout=0.5, **TINY)
  x, t, _ = _inputs(labels=True)
  params = jax.jit(lambda key: model.init({"params": key}, x, t, jnp.zeros(2, jnp.int32),
                                          train=False)["params"])(_key(0))

  @jax.jit
  def run(params, y, key):
    """(eval output, train output) for the fixed inputs x, t."""
    return (model.apply({"params": params}, x, t, y, train=False, rngs={"dropout": key}),
            model.apply({"params": params}, x, t, y, train=True, rngs={"dropout": key}))

  return model, params, run


def test_learned_sigma_conditional_output_is_zero_at_init(conditional):
  _, params, run = conditional
  out, out_train = run(params, jnp.array([1, 3]), _key(1))
  assert out.shape == (2, 8, 8, 6) and out.dtype == jnp.float32
  # The final conv is zero-initialised, as in ADM; the layers before it are not.
  assert not np.any(np.asarray(out)) and not np.any(np.asarray(out_train))
  assert not np.any(np.asarray(params["out_conv"]["kernel"]))
  assert np.any(np.asarray(params["down_0_res_0"]["in_conv"]["kernel"]))
  assert params["label_emb"]["embedding"].shape == (5, 4 * TINY["ch"])


def test_fixed_sigma_unconditional_output_shape():
  model = UNet(out_channels=3, **TINY)
  x, t, _ = _inputs(labels=False)
  out, variables = jax.eval_shape(
      lambda: model.init_with_output({"params": jax.random.key(0)}, x, t, train=False))
  assert out.shape == (2, 8, 8, 3) and out.dtype == jnp.float32
  assert "label_emb" not in variables["params"]


def test_dropout_only_in_training_and_labels_matter(conditional):
  _, params, run = conditional
  params = _perturb(params)
  y = jnp.array([1, 3])
  eval_a, train_a = run(params, y, _key(1))
  eval_b, train_b = run(params, y, _key(2))
  np.testing.assert_array_equal(eval_a, eval_b)
  assert float(jnp.max(jnp.abs(train_a - train_b))) > 1e-3
  assert float(jnp.max(jnp.abs(train_a - eval_a))) > 1e-3
  # Another label changes every sample's output.
  eval_other, _ = run(params, (y + 1) % 5, _key(1))
  assert float(jnp.min(jnp.max(jnp.abs(eval_other - eval_a), axis=(1, 2, 3)))) > 1e-3


def test_bfloat16_compute_keeps_float32_params_and_output(conditional):
  model, params, run = conditional
  params = _perturb(params)
  x, t, y = _inputs(labels=True)
  bf16 = model.clone(dtype=jnp.bfloat16)
  # Params are float32 whatever the compute dtype.
  abstract = jax.eval_shape(lambda: bf16.init({"params": _key(0)}, x, t, y, train=False))
  assert {p.dtype for p in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  out = jax.jit(lambda p: bf16.apply({"params": p}, x, t, y, train=False))(params)
  assert out.dtype == jnp.float32 and out.shape == (2, 8, 8, 6)
  # Close to the float32 network, but really computed in lower precision.
  ref, _ = run(params, y, _key(0))
  err = float(jnp.max(jnp.abs(out - ref)))
  assert 0.0 < err < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_attention_only_at_requested_resolutions():
  model = UNet(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), num_heads=2,
               out_channels=3, resblock_updown=False, use_scale_shift_norm=False)
  params = _abstract_params(model, 16, labels=False)  # levels at 16, 8, 4 pixels
  attn = {name for name in params if "attn" in name}
  assert attn == {"down_1_attn_0", "down_1_attn_1", "up_1_attn_0", "up_1_attn_1", "up_1_attn_2",
                  "mid_attn"}
  # Conv resampling (resblock_updown=False) and 1x1 skips where channels change.
  assert "op" in params["down_0_downsample"] and "conv" in params["up_1_upsample"]
  assert "skip" in params["down_1_res_0"] and "skip" not in params["down_1_res_1"]
  # Additive embedding: one projection per output channel (no scale-shift).
  assert params["down_0_res_0"]["emb_proj"]["kernel"].shape == (128, 32)
  assert params["mid_attn"]["qkv"]["kernel"].shape == (64, 192)


def test_rejects_inconsistent_inputs():
  with pytest.raises(ValueError, match="attn_resolutions"):
    _abstract_params(UNet(out_channels=3, **dict(TINY, attn_resolutions=(2,))), 8, labels=False)
  with pytest.raises(ValueError, match="no labels"):
    _abstract_params(UNet(out_channels=3, num_classes=5, **TINY), 8, labels=False)
  with pytest.raises(ValueError, match="unconditional"):
    _abstract_params(UNet(out_channels=3, **TINY), 8, labels=True)
  with pytest.raises(ValueError, match="divisible"):
    _abstract_params(UNet(out_channels=3, **TINY), 7, labels=False)



# One level (no resampling) keeps the compiles of the option tests short; every block kind
# the options touch (ResBlock with dropout, attention in encoder, middle and decoder) is in.
ONE_LEVEL = dict(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), num_heads=1,
                 resblock_updown=True, use_scale_shift_norm=True)


def test_remat_gives_the_same_outputs_and_gradients():
  """remat trades memory for recomputation only: same params, outputs and gradients (with
  dropout on, so the recomputed pass must replay the same masks)."""
  model = UNet(out_channels=6, num_classes=5, dropout=0.5, **ONE_LEVEL)
  x, t, y = _inputs(labels=True)
  init = lambda net: net.init({"params": _key(0)}, x, t, y, train=False)["params"]
  params = _perturb(jax.jit(lambda: init(model))())

  def loss_and_grads(remat):
    net = model.clone(remat=remat)
    assert jax.tree.structure(jax.eval_shape(lambda: init(net))) == jax.tree.structure(params)

    def loss(p):
      out = net.apply({"params": p}, x, t, y, train=True, rngs={"dropout": _key(5)})
      return jnp.mean(out ** 2), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, ref_out), ref_grads = loss_and_grads("none")
  for remat in ("attention", "blocks"):
    (_, out), grads = loss_and_grads(remat)
    # Equal up to float rounding (XLA fuses the recomputed graph differently); other
    # dropout masks would differ by O(1).
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="remat must be one of none, attention, blocks"):
    jax.eval_shape(lambda: init(model.clone(remat="all")))


def test_decoder_heads_and_timestep_scale():
  model = UNet(out_channels=3, **ONE_LEVEL)
  x, t, _ = _inputs()
  params = _perturb(jax.jit(lambda: model.init({"params": _key(0)}, x, t, train=False))()
                    ["params"])
  run = lambda net, t: jax.jit(lambda p, t: net.apply({"params": p}, x, t, train=False))(
      params, t)
  ref = run(model, t)
  # num_heads_upsample: the decoder's heads only; -1 (the default) is num_heads.
  np.testing.assert_array_equal(run(model.clone(num_heads_upsample=1), t), ref)
  assert float(jnp.max(jnp.abs(run(model.clone(num_heads_upsample=2), t) - ref))) > 1e-4
  # timestep_scale: the network sees t * scale (improved-diffusion's rescale_timesteps).
  np.testing.assert_allclose(run(model.clone(timestep_scale=0.25), t), run(model, t * 0.25),
                             rtol=1e-6, atol=1e-6)
