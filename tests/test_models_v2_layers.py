"""Tests for d2v_jax/models/v2_layers.py: data2vec 2.0 blocks, ALiBi, sin-cos positions, decoders.

References are written out by hand or recomputed in numpy from fairseq's formulas
(`modalities/modules.py`, `modalities/base.py`, `mae.py`); sizes are tiny.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from d2v_jax.models import conv, image, transformer, v2_layers

D, H, T = 8, 2, 6


def count(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def randomise(params, seed=0, scale=0.3):
  """Every leaf replaced by N(0, scale²) noise (LayerNorm scales around 1), so no term hides."""
  leaves, treedef = jax.tree.flatten_with_path(params)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    value = rng.normal(0, scale, leaf.shape).astype(np.float32)
    if "scale" in jax.tree_util.keystr(path):
      value += 1
    out.append(jnp.asarray(value))
  return jax.tree.unflatten(treedef, out)


# ------------------------------------------------------------------------------------------------
# numpy reference of fairseq's AltBlock (layer_norm_first=False), eval mode

_erf = np.vectorize(math.erf)


def np_gelu(x):
  return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def np_layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_alt_block(p, x, padding_mask, bias, eps=1e-5):
  """fairseq: qkv Linear -> reshape(B, T, 3, H, Dh); softmax(q·k/√Dh + alibi, -inf at pads)."""
  p = jax.tree.map(np.asarray, p)
  b, t, d = x.shape
  # From the torch layout: qkv.weight [3D, D] is our kernel [D, 3, H, Dh] flattened and transposed.
  w_qkv = p["attention"]["qkv"]["kernel"].reshape(d, 3 * d).T
  qkv = x @ w_qkv.T + p["attention"]["qkv"]["bias"].reshape(3 * d)
  qkv = qkv.reshape(b, t, 3, H, d // H).transpose(2, 0, 3, 1, 4)  # [3, B, H, T, Dh]
  q, k, v = qkv[0] * (d // H) ** -0.5, qkv[1], qkv[2]
  logits = q @ k.transpose(0, 1, 3, 2) + bias
  logits = np.where(padding_mask[:, None, None, :], -np.inf, logits)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  a = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
  a = a @ p["attention"]["out"]["kernel"].reshape(d, d) + p["attention"]["out"]["bias"]
  r = np_layer_norm(x + a, p["attention_norm"], eps)
  h = np_gelu(r @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  f = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  return np_layer_norm(r + f, p["ffn_norm"], eps), f


def block_inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, T, D)).astype(np.float32)
  padding_mask = np.zeros((2, T), bool)
  padding_mask[1, 4:] = True
  return x, padding_mask


def test_alt_block_param_layout_and_shapes():
  block = v2_layers.AltBlock(num_heads=H)
  x, padding_mask = block_inputs()
  params = block.init(jax.random.key(0), x, padding_mask, train=False)["params"]
  shapes = jax.tree.map(lambda p: p.shape, params)
  assert shapes["attention"]["qkv"] == {"kernel": (D, 3, H, D // H), "bias": (3, H, D // H)}
  assert shapes["attention"]["out"] == {"kernel": (H, D // H, D), "bias": (D,)}
  assert shapes["fc1"]["kernel"] == (D, 4 * D) and shapes["fc2"]["kernel"] == (4 * D, D)
  assert set(params) == {"attention", "attention_norm", "fc1", "fc2", "ffn_norm"}
  out, aux = block.apply({"params": params}, x, padding_mask, train=False)
  assert out.shape == aux["ffn"].shape == (2, T, D)
  np.testing.assert_array_equal(aux["block"], out)


def test_alt_block_matches_numpy_reference():
  block = v2_layers.AltBlock(num_heads=H, norm_eps=1e-5)
  x, padding_mask = block_inputs()
  params = randomise(block.init(jax.random.key(0), x, padding_mask, train=False)["params"])
  bias = np.asarray(v2_layers.alibi_bias(H, T))[None] * 0.7  # [1, H, T, T]
  out, aux = block.apply({"params": params}, x, padding_mask, bias, train=False)
  want_out, want_ffn = np_alt_block(params, x, padding_mask, bias)
  valid = ~padding_mask
  # aux["ffn"] is the MLP output before the residual: the data2vec 2.0 target.
  np.testing.assert_allclose(np.asarray(aux["ffn"])[valid], want_ffn[valid], atol=1e-5)
  np.testing.assert_allclose(np.asarray(out)[valid], want_out[valid], atol=1e-5)


def test_alt_block_is_post_ln():
  """At init (LN scale 1, bias 0) every position leaves with zero mean and unit variance."""
  block = v2_layers.AltBlock(num_heads=H)
  x, padding_mask = block_inputs(1)
  variables = block.init(jax.random.key(1), x, padding_mask, train=False)
  out, _ = block.apply(variables, 3 * x + 2, padding_mask, train=False)
  np.testing.assert_allclose(np.asarray(out).mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out).var(-1), 1, atol=1e-3)


def test_alt_block_padded_keys_do_not_reach_valid_positions():
  block = v2_layers.AltBlock(num_heads=H)
  x, padding_mask = block_inputs(2)
  variables = {"params": randomise(block.init(jax.random.key(0), x, train=False)["params"], 3)}
  out, aux = block.apply(variables, x, padding_mask, train=False)
  noisy = x.copy()
  noisy[padding_mask] = 100.0
  out2, aux2 = block.apply(variables, noisy, padding_mask, train=False)
  valid = ~padding_mask
  np.testing.assert_allclose(np.asarray(out2)[valid], np.asarray(out)[valid], atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(aux2["ffn"])[valid], np.asarray(aux["ffn"])[valid], atol=1e-6
  )
  # A fully padded row stays finite (the finite mask value).
  out3, _ = block.apply(variables, x, np.ones_like(padding_mask), train=False)
  assert np.isfinite(np.asarray(out3)).all()


def test_alt_block_dropout_placement():
  """post_mlp_dropout acts on the residual branch only: the target (ffn) is untouched."""
  block = v2_layers.AltBlock(
    num_heads=H, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, post_mlp_dropout=0.5
  )
  x, padding_mask = block_inputs(3)
  variables = {"params": randomise(block.init(jax.random.key(0), x, train=False)["params"], 4)}
  rngs = {"dropout": jax.random.key(5)}
  out_eval, aux_eval = block.apply(variables, x, padding_mask, train=False)
  out_train, aux_train = block.apply(variables, x, padding_mask, train=True, rngs=rngs)
  np.testing.assert_allclose(aux_train["ffn"], aux_eval["ffn"], atol=1e-6)
  assert np.abs(np.asarray(out_train) - np.asarray(out_eval)).max() > 1e-2
  # With the activation dropout (timm Mlp: after GELU and after fc2) the target does change.
  block = block.clone(post_mlp_dropout=0.0, activation_dropout=0.5)
  _, aux_train = block.apply(variables, x, padding_mask, train=True, rngs=rngs)
  assert np.abs(np.asarray(aux_train["ffn"]) - np.asarray(aux_eval["ffn"])).max() > 1e-2


# ------------------------------------------------------------------------------------------------
# AltEncoder


def test_drop_path_rates_are_fairseq_linspace():
  for n in (1, 2, 5, 12):
    np.testing.assert_allclose(v2_layers.drop_path_rates(0.05, 0.3, n), np.linspace(0.05, 0.3, n))
  assert v2_layers.drop_path_rates(0.0, 0.1, 0) == []


def test_alt_encoder_stack_input_norm_and_layerdrop():
  encoder = v2_layers.AltEncoder(num_layers=3, num_heads=H, input_norm=True, layerdrop=1.0)
  x, padding_mask = block_inputs(4)
  variables = encoder.init(jax.random.key(0), x, padding_mask, train=False)
  assert set(variables["params"]) == {"input_norm", "layer_00", "layer_01", "layer_02"}
  out, layers = encoder.apply(variables, x, padding_mask, train=False)
  assert out.shape == (2, T, D) and len(layers) == 3
  np.testing.assert_array_equal(layers[-1]["block"], out)
  # LayerDrop 1 skips every block in training: only the input LayerNorm remains.
  rngs = {"dropout": jax.random.key(1)}
  dropped, _ = encoder.apply(variables, x, padding_mask, train=True, rngs=rngs)
  np.testing.assert_allclose(
    dropped, np_layer_norm(x, variables["params"]["input_norm"], 1e-5), atol=1e-5
  )
  # Audio base's context encoder: no prenet blocks, just the LayerNorm.
  context = v2_layers.AltEncoder(num_layers=0, num_heads=H, input_norm=True)
  ctx_vars = context.init(jax.random.key(0), x, train=False)
  assert set(ctx_vars["params"]) == {"input_norm"}
  assert (
    not v2_layers.AltEncoder(1, H)
    .init(jax.random.key(0), x, train=False)["params"]
    .get("input_norm")
  )


def test_alt_encoder_alibi_scales():
  """Per-layer scales multiply the bias block by block; one scale equals folding it in first."""
  encoder = v2_layers.AltEncoder(num_layers=2, num_heads=H)
  x, padding_mask = block_inputs(5)
  variables = encoder.init(jax.random.key(0), x, padding_mask, train=False)
  bias = v2_layers.alibi_bias(H, T)[None]  # [1, H, T, T]
  scale = jnp.asarray([0.5, 2.0]).reshape(1, 1, H, 1, 1)
  folded, _ = encoder.apply(variables, x, padding_mask, bias * scale[0], train=False)
  scaled, _ = encoder.apply(variables, x, padding_mask, bias, scale, train=False)
  np.testing.assert_allclose(scaled, folded, atol=1e-6)
  per_layer = jnp.zeros((2, 1, H, 1, 1)).at[1].set(1.0)  # block 0 unbiased, block 1 biased
  got, _ = encoder.apply(variables, x, padding_mask, bias, per_layer, train=False)
  p = variables["params"]
  h0, _ = v2_layers.AltBlock(H).apply({"params": p["layer_00"]}, x, padding_mask, train=False)
  h1, _ = v2_layers.AltBlock(H).apply(
    {"params": p["layer_01"]}, h0, padding_mask, bias, train=False
  )
  np.testing.assert_allclose(got, h1, atol=1e-6)
  with pytest.raises(ValueError, match="3 alibi scales for 2 blocks"):
    encoder.apply(variables, x, padding_mask, bias, jnp.ones((3, 1, H, 1, 1)), train=False)


# ------------------------------------------------------------------------------------------------
# ALiBi


def test_alibi_slopes_by_hand():
  # H = 4 (power of 2): start = ratio = 2^(-8/4) = 1/4.
  np.testing.assert_array_equal(v2_layers.alibi_slopes(4), [1 / 4, 1 / 16, 1 / 64, 1 / 256])
  # H = 6: the 4 slopes above, then slopes(8)[0::2][:2] = (1/2, 1/8) appended at the end.
  np.testing.assert_array_equal(
    v2_layers.alibi_slopes(6), [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]
  )
  # H = 12 (audio base): slopes(8) = 2^-1..2^-8, then slopes(16)[0::2][:4] = 2^-0.5, -1.5, ...
  want = [2.0**-i for i in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]
  np.testing.assert_allclose(v2_layers.alibi_slopes(12), want, rtol=1e-7)
  assert v2_layers.alibi_slopes(12).dtype == np.float32


def test_alibi_bias_by_hand():
  distance = np.array(
    [
      [0, 1, 2, 3, 4],
      [1, 0, 1, 2, 3],
      [2, 1, 0, 1, 2],
      [3, 2, 1, 0, 1],
      [4, 3, 2, 1, 0],
    ],
    np.float32,
  )
  for heads, slopes in (
    (4, [0.25, 0.0625, 0.015625, 0.00390625]),
    (6, [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]),
  ):
    got = np.asarray(v2_layers.alibi_bias(heads, 5))
    assert got.shape == (heads, 5, 5) and got.dtype == np.float32
    for h, slope in enumerate(slopes):
      np.testing.assert_array_equal(got[h], -slope * distance)
  # Spelled out for one head: H = 6, head 4 (slope 1/2), row 0 and row 2.
  got = np.asarray(v2_layers.alibi_bias(6, 5))
  np.testing.assert_array_equal(got[4, 0], [0, -0.5, -1, -1.5, -2])
  np.testing.assert_array_equal(got[4, 2], [-1, -0.5, 0, -0.5, -1])


def test_alibi_scale_param_and_clamp():
  module = v2_layers.AlibiScale(num_heads=4)
  variables = module.init(jax.random.key(0))
  assert variables["params"]["alibi_scale"].shape == (1, 1, 4, 1, 1)
  np.testing.assert_array_equal(variables["params"]["alibi_scale"], 1.0)
  assert v2_layers.AlibiScale(4, num_layers=3).init(jax.random.key(0))["params"][
    "alibi_scale"
  ].shape == (3, 1, 4, 1, 1)
  assert v2_layers.AlibiScale(4, per_head=False).init(jax.random.key(0))["params"][
    "alibi_scale"
  ].shape == (1, 1, 1, 1, 1)

  raw = jnp.asarray([-0.5, 0.0, 0.25, 2.0]).reshape(1, 1, 4, 1, 1)
  scale = module.apply({"params": {"alibi_scale": raw}})
  np.testing.assert_array_equal(scale.reshape(-1), [0.0, 0.0, 0.25, 2.0])
  scaled = v2_layers.alibi_bias(4, 5)[None] * scale[0]  # [1, H, T, T]
  np.testing.assert_array_equal(scaled[0, 0], 0.0)  # a negative scale acts as 0

  def total(r):
    return module.apply({"params": {"alibi_scale": r}}).sum()

  # No gradient below 0 (torch clamp_min: gradient 1 where the value is ≥ 0).
  np.testing.assert_array_equal(jax.grad(total)(raw).reshape(-1), [0, 1, 1, 1])
  frozen = v2_layers.AlibiScale(4, learned=False)
  grad = jax.grad(lambda r: frozen.apply({"params": {"alibi_scale": r}}).sum())(raw)
  np.testing.assert_array_equal(grad, 0)


def test_masked_alibi_gathers_kept_positions():
  full = v2_layers.alibi_bias(6, 10)  # [H, T, T]
  keep = jnp.asarray([[0, 3, 4, 9], [1, 2, 6, 8]], jnp.int32)  # [B, K]
  got = np.asarray(v2_layers.masked_alibi(full[None], keep))
  assert got.shape == (2, 6, 4, 4)
  full_np = np.asarray(full)
  for b in range(2):
    ids = np.asarray(keep[b])
    np.testing.assert_array_equal(got[b], full_np[:, ids][:, :, ids])
  # The [H, T, T] form and a per-sample bias [B, H, T, T] (different rows per sample).
  np.testing.assert_array_equal(v2_layers.masked_alibi(full, keep), got)
  per_sample = jnp.stack([full, 2 * full])
  np.testing.assert_array_equal(v2_layers.masked_alibi(per_sample, keep)[1], 2 * got[1])
  # Kept positions 0 and 9 are 9 apart although adjacent among the kept tokens.
  assert got[0, 4, 2, 3] == -0.5 * 5 and got[0, 4, 0, 3] == -0.5 * 9


def test_attention_bias_with_fewer_heads_covers_the_first_heads():
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.normal(size=(1, 5, 4, 2)), jnp.float32) for _ in range(2))
  bias = v2_layers.alibi_bias(2, 5)[None]  # 2 of 4 heads
  got = transformer.attention_weights(q, k, None, v2_layers.bias_for_heads(bias, 4))
  full = jnp.concatenate([bias, jnp.zeros_like(bias)], axis=1)
  np.testing.assert_allclose(got, transformer.attention_weights(q, k, None, full), atol=1e-7)
  np.testing.assert_allclose(got[:, 2:], transformer.attention_weights(q, k)[:, 2:], atol=1e-7)


# ------------------------------------------------------------------------------------------------
# 2-D sin-cos positions


def np_mae_sincos(embed_dim, grid_size):
  """MAE's get_2d_sincos_pos_embed (cls_token=False), step by step."""
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)

  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_sincos_2d_matches_mae():
  for dim, grid in ((16, 4), (32, 3), (768, 14)):
    got = image.sincos_2d(dim, grid)
    assert got.shape == (grid * grid, dim) and got.dtype == np.float32
    np.testing.assert_array_equal(got, np_mae_sincos(dim, grid).astype(np.float32))
  got = image.sincos_2d(8, 3)  # ω = (1, 1/100)
  np.testing.assert_array_equal(got[0], [0, 0, 1, 1, 0, 0, 1, 1])
  # Patch 1 is row 0, column 1: the first half encodes the column.
  np.testing.assert_allclose(
    got[1], [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01), 0, 0, 1, 1], rtol=1e-6
  )
  # Patch 3 is row 1, column 0.
  np.testing.assert_allclose(
    got[3], [0, 0, 1, 1, math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)], rtol=1e-6
  )
  # A non-square grid (h, w) = (2, 3) is the square table's first two rows.
  np.testing.assert_array_equal(image.sincos_2d(8, (2, 3)), got[:6])


# ------------------------------------------------------------------------------------------------
# Decoders


def zero_convs(params):
  return {
    name: jax.tree.map(jnp.zeros_like, p) if name.startswith("conv_") else p
    for name, p in params.items()
  }


def test_decoder1d_shapes_groups_and_kernels():
  decoder = v2_layers.Decoder1d(decoder_dim=16, kernel=5, groups=4, num_layers=3)
  x = jnp.ones((2, 7, 12))
  params = decoder.init(jax.random.key(0), x)["params"]
  assert decoder.apply({"params": params}, x).shape == (2, 7, 12)
  assert params["conv_0"]["kernel"].shape == (5, 12 // 4, 16)
  assert params["conv_1"]["kernel"].shape == (5, 16 // 4, 16)
  assert params["proj"]["kernel"].shape == (16, 12)
  assert set(params) == {"conv_0", "conv_1", "conv_2", "proj"}  # LayerNorms have no affine
  # PyTorch default init: kernels and biases U(±1/√fan_in), fan_in = C_in/groups · k.
  bound = 1 / math.sqrt(3 * 5)
  for leaf in jax.tree.leaves(params["conv_0"]):
    assert 0 < np.abs(leaf).max() <= bound
  two = v2_layers.Decoder1d(decoder_dim=16, kernel=5, groups=4, num_layers=1, projection_layers=2)
  shapes = jax.tree.map(lambda p: p.shape, two.init(jax.random.key(0), x)["params"])
  assert shapes["proj_0"]["kernel"] == (16, 32) and shapes["proj"]["kernel"] == (32, 12)


def test_decoder1d_residual():
  """With zero convs each layer outputs gelu(LN(0)) = 0: the stack is then only its residuals."""
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  for residual in (True, False):
    decoder = v2_layers.Decoder1d(
      decoder_dim=8, kernel=3, groups=2, num_layers=3, residual=residual
    )
    params = zero_convs(decoder.init(jax.random.key(0), x)["params"])
    got = decoder.apply({"params": params}, x)
    stack = x if residual else jnp.zeros_like(x)
    want = stack @ params["proj"]["kernel"] + params["proj"]["bias"]
    np.testing.assert_allclose(got, want, atol=1e-6)
  # Input width ≠ decoder width: no residual around layer 0, so the stack output is 0 again.
  decoder = v2_layers.Decoder1d(decoder_dim=4, kernel=3, groups=2, num_layers=3)
  params = zero_convs(decoder.init(jax.random.key(0), x)["params"])
  got = decoder.apply({"params": params}, x)
  np.testing.assert_allclose(got, jnp.broadcast_to(params["proj"]["bias"], got.shape), atol=1e-6)


def test_decoder1d_padding_does_not_reach_valid_positions():
  decoder = v2_layers.Decoder1d(decoder_dim=8, kernel=3, groups=2, num_layers=4)
  x = np.asarray(jax.random.normal(jax.random.key(2), (2, 9, 8)))
  padding_mask = np.zeros((2, 9), bool)
  padding_mask[0, 6:] = True
  variables = decoder.init(jax.random.key(0), x)
  out = np.asarray(decoder.apply(variables, x, padding_mask))
  noisy = x.copy()
  noisy[padding_mask] = 50.0
  out2 = np.asarray(decoder.apply(variables, noisy, padding_mask))
  np.testing.assert_allclose(out2[~padding_mask], out[~padding_mask], atol=1e-6)
  # The padded row equals the same row run alone on its valid length.
  alone = np.asarray(decoder.apply(variables, x[:1, :6]))
  np.testing.assert_allclose(out[0, :6], alone[0], atol=1e-5)


@pytest.mark.parametrize("kernel", [3, 4])
def test_decoder1d_same_pad(kernel):
  """Output t reads inputs t − k//2 … t + (k−1)//2: fairseq's padding k//2 then SamePad."""
  decoder = v2_layers.Decoder1d(decoder_dim=4, kernel=kernel, groups=1, num_layers=1)
  x = jax.random.normal(jax.random.key(3), (1, 8, 4))
  variables = decoder.init(jax.random.key(0), x)
  jac = jax.jacobian(lambda y: decoder.apply(variables, y)[0, :, 0])(x)  # [T, 1, T, C]
  reads = np.abs(np.asarray(jac)).sum((1, 3)) > 0  # [T_out, T_in]
  assert reads.shape == (8, 8)
  lo, hi = kernel // 2, (kernel - 1) // 2
  want = np.array([[t - lo <= s <= t + hi for s in range(8)] for t in range(8)])
  np.testing.assert_array_equal(reads, want)


def test_decoder2d_shapes_residual_and_same_pad():
  decoder = v2_layers.Decoder2d(grid=(3, 4), decoder_dim=8, kernel=3, groups=2, num_layers=2)
  x = jax.random.normal(jax.random.key(4), (2, 12, 8))
  params = decoder.init(jax.random.key(0), x)["params"]
  assert decoder.apply({"params": params}, x).shape == (2, 12, 8)
  assert params["conv_0"]["kernel"].shape == (3, 3, 4, 8)
  zeroed = zero_convs(params)
  want = x @ params["proj"]["kernel"] + params["proj"]["bias"]  # residual only, row-major order
  np.testing.assert_allclose(decoder.apply({"params": zeroed}, x), want, atol=1e-6)
  no_res = decoder.clone(residual=False)
  np.testing.assert_allclose(
    no_res.apply({"params": zeroed}, x),
    jnp.broadcast_to(params["proj"]["bias"], x.shape),
    atol=1e-6,
  )
  with pytest.raises(ValueError, match="11 tokens for a 3x4 grid"):
    decoder.apply({"params": params}, x[:, :11])
  # Even kernel: patch (i, j) reads rows i−1…i and columns j−1…j (SamePad2d drops the last ones).
  even = v2_layers.Decoder2d(grid=(3, 4), decoder_dim=4, kernel=2, groups=1, num_layers=1)
  y = x[:1, :, :4]
  variables = even.init(jax.random.key(0), y)
  jac = jax.jacobian(lambda z: even.apply(variables, z)[0, :, 0])(y)  # [12, 1, 12, C]
  reads = np.abs(np.asarray(jac)).sum((1, 3)) > 0
  pos = [(i, j) for i in range(3) for j in range(4)]
  want = np.array([[i - 1 <= a <= i and j - 1 <= b <= j for a, b in pos] for i, j in pos])
  np.testing.assert_array_equal(reads, want)


def test_decoder_parameter_counts_of_the_released_configs():
  """By hand from fairseq's layers: Conv C_out·C_in/g·k^n + C_out, Linear out·in + out."""

  def n_params(module, *shape):
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape))
    return count(shapes["params"])

  # Audio base: 384/16/7/4, D = 768.
  audio = (384 * 48 * 7 + 384) + 3 * (384 * 24 * 7 + 384) + (768 * 384 + 768)
  assert audio == 619_776
  assert n_params(v2_layers.Decoder1d(384, 7, 16, 4), 1, 10, 768) == audio
  # Text base: 768/1/9/5, no residual, two projection layers 768 -> 1536 -> 768.
  text = 5 * (768 * 768 * 9 + 768) + (1536 * 768 + 1536) + (768 * 1536 + 768)
  assert text == 28_907_520
  text_decoder = v2_layers.Decoder1d(768, 9, 1, 5, residual=False, projection_layers=2)
  assert n_params(text_decoder, 1, 10, 768) == text
  # Image base: 768/16/3/6 on the 14 × 14 grid, one projection layer.
  image = 6 * (768 * 48 * 9 + 768) + (768 * 768 + 768)
  assert image == 2_585_856
  assert n_params(v2_layers.Decoder2d((14, 14), 768, 3, 16, 6), 1, 196, 768) == image


@pytest.mark.parametrize("shape, kernel, groups", [((2, 9, 8), 5, 4), ((2, 4, 5, 8), 3, 2)])
def test_grouped_conv_equals_flax_conv(shape, kernel, groups):
  """The written-out CPU grouped convolution computes what `nn.Conv(feature_group_count)` does
  with the same parameters (1-D and 2-D, odd and even padding split)."""
  x = jax.random.normal(jax.random.key(0), shape)
  padding = (kernel // 2, (kernel - 1) // 2)
  ours = conv.GroupedConv(6 * groups, kernel, groups, padding, nn.initializers.normal(1.0))
  params = ours.init(jax.random.key(1), x)
  reference = nn.Conv(
    6 * groups,
    (kernel,) * (len(shape) - 2),
    padding=[padding] * (len(shape) - 2),
    feature_group_count=groups,
  )
  np.testing.assert_allclose(
    ours.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-5
  )
