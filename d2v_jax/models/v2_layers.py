"""Building blocks of data2vec 2.0 (spec §2.1 items 7 and 8, §2.3 "Other").

Ported from fairseq `examples/data2vec/models/modalities/`: `modules.py` (AltBlock, AltAttention,
BlockEncoder, Decoder1d, Decoder2d), `base.py` (get_alibi, get_alibi_bias, masked_alibi, the
`alibi_scale` parameter) and `mae.py` (get_2d_sincos_pos_embed), wired as in `data2vec2.py`.

- `AltBlock` (§2.1.7), post-LN with stochastic depth and the FFN output as the target:
    x = x + drop_path(dropout(proj(attention(qkv(x)))))
    r = attention_norm(x)
    f = dropout(fc2(dropout(gelu(fc1(r)))))   # aux["ffn"]: the v2 target (before the residual)
    x = ffn_norm(r + drop_path(post_mlp_dropout(f)))   # aux["block"]
  Only fairseq's `layer_norm_first=False` path: every released v2 config uses it.
- `AltEncoder`: fairseq's BlockEncoder (the modality "context encoder": input LayerNorm, dropout,
  prenet blocks) and the main block stack of `Data2VecMultiModel` (input dropout, blocks); with
  `layer_norm_first=False` neither has a final norm.
- ALiBi for speech (§2.3): `alibi_slopes`, `alibi_bias` (symmetric, −slope·|i−j|), `AlibiScale`
  (the learned, clamped per-head scale) and `masked_alibi` (the bias at the student's kept
  positions, which keeps each token's ORIGINAL distance to the others).
- the fixed 2-D sin-cos positions of images are `image.sincos_2d` (the image front end adds them).
- `Decoder1d`, `Decoder2d` (§2.1.8): grouped conv layers with a residual, then a projection.

Parameter layouts (for converters; torch Linear weights are [out, in]):
  attention/qkv kernel [D, 3, H, Dh], bias [3, H, Dh]  <- attn.qkv.weight.T.reshape(D, 3, H, Dh):
      fairseq reshapes the fused output as (3, H, Dh), so the q, k, v thirds and the heads inside
      each third are already in this order. attention/out kernel [H, Dh, D] <- attn.proj.weight.T
      .reshape(H, Dh, D).
  attention_norm, ffn_norm, fc1, fc2 <- norm1, norm2, mlp.fc1, mlp.fc2.
  alibi_scale [L or 1, 1, H or 1, 1, 1]: fairseq's exact shape, copied as is.
  decoder conv_i kernel [k, C_in/g, C_out] (2-D: [k, k, C_in/g, C_out]) <- blocks.i.0.weight
      transposed (2, 1, 0) (2-D: (2, 3, 1, 0)); proj <- proj (one layer) or the last Linear of
      the proj Sequential, proj_j <- its j-th hidden Linear (index 2j).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from d2v_jax.models import conv, transformer
from d2v_jax.models.transformer import bert_init, gelu, torch_default_init


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default Conv/Linear bias: U(−1/√fan_in, 1/√fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# ------------------------------------------------------------------------------------------------
# Attention and blocks


def bias_for_heads(attention_bias, num_heads: int):
  """`attention_bias` [B or 1, H', T, T] with H' ≤ H zero-padded to H heads: fairseq adds its
  `alibi_bias` to `attn[:, :H']`, so a bias with fewer heads covers the first ones."""
  if attention_bias is None or attention_bias.shape[-3] == num_heads:
    return attention_bias
  pad = [(0, 0)] * attention_bias.ndim
  pad[-3] = (0, num_heads - attention_bias.shape[-3])
  return jnp.pad(attention_bias, pad)


class AltAttention(nn.Module):
  """Self-attention with a fused qkv projection (with bias), as fairseq's AltAttention.

  `dropout` is fairseq's `proj_drop` (= `encoder_dropout`), applied after the output projection.
  """

  num_heads: int
  attention_dropout: float = 0.0
  dropout: float = 0.0
  fused: bool = False  # `transformer.Execution.fused_attention`
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask=None, attention_bias=None, *, train: bool):
    dim = x.shape[-1]
    head_dim = dim // self.num_heads
    qkv = nn.DenseGeneral(
      (3, self.num_heads, head_dim), kernel_init=bert_init, dtype=self.dtype, name="qkv"
    )(x)  # [B, T, 3, H, Dh]
    q, k, v = qkv[:, :, 0] * head_dim**-0.5, qkv[:, :, 1], qkv[:, :, 2]
    bias = bias_for_heads(attention_bias, self.num_heads)
    out = transformer.attend(  # [B, T, H, Dh]
      q, k, v, padding_mask, bias, dropout=self.attention_dropout, train=train, fused=self.fused
    )
    out = nn.DenseGeneral(dim, axis=(-2, -1), kernel_init=bert_init, dtype=self.dtype, name="out")(
      out
    )  # [B, T, D]
    return nn.Dropout(self.dropout)(out, deterministic=not train)


class AltBlock(nn.Module):
  """fairseq's AltBlock with `layer_norm_first=False`; returns `(x, {"ffn": f, "block": x})`.

  Attributes (fairseq names in brackets):
    dropout: after the attention output projection [drop = encoder_dropout].
    activation_dropout: timm Mlp's dropout, after GELU and again after fc2 [mlp_drop].
    post_mlp_dropout: on the FFN branch before the residual, not on the target [post_mlp_drop].
    drop_path: per-sample drop of the attention and FFN residual branches (timm DropPath).
  """

  num_heads: int
  mlp_ratio: float = 4.0
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.0
  post_mlp_dropout: float = 0.1
  drop_path: float = 0.0
  norm_eps: float = 1e-5
  fused_attention: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask=None, attention_bias=None, train: bool | None = None):
    # `train` may be positional, so `transformer.block_class` can mark it static for nn.remat.
    transformer.check_train(train, self)
    dim = x.shape[-1]
    dropout = lambda rate, y: nn.Dropout(rate)(y, deterministic=not train)  # noqa: E731
    # timm's DropPath: the whole branch of a sample is dropped, survivors scaled by 1/(1-p).
    drop_path = lambda y: nn.Dropout(self.drop_path, broadcast_dims=(1, 2))(  # noqa: E731
      y, deterministic=not train
    )
    dense = lambda n, name: nn.Dense(n, kernel_init=bert_init, dtype=self.dtype, name=name)  # noqa: E731
    norm = lambda name: nn.LayerNorm(self.norm_eps, dtype=self.dtype, name=name)  # noqa: E731

    a = AltAttention(
      self.num_heads,
      self.attention_dropout,
      self.dropout,
      fused=self.fused_attention,
      dtype=self.dtype,
      name="attention",
    )(x, padding_mask, attention_bias, train=train)
    r = norm("attention_norm")(x + drop_path(a))  # [B, T, D]
    h = dropout(self.activation_dropout, gelu(dense(int(dim * self.mlp_ratio), "fc1")(r)))
    f = dropout(self.activation_dropout, dense(dim, "fc2")(h))  # [B, T, D]
    x = norm("ffn_norm")(r + drop_path(dropout(self.post_mlp_dropout, f)))
    return x, {"ffn": f, "block": x}


def drop_path_rates(start: float, end: float, num_layers: int) -> list[float]:
  """Per-block stochastic depth, `np.linspace(start, end, num_layers)` as in fairseq."""
  return [start + (end - start) * i / max(num_layers - 1, 1) for i in range(num_layers)]


class AltEncoder(nn.Module):
  """A stack of AltBlocks: fairseq's BlockEncoder (context encoder) or the main v2 blocks.

  `input_norm=True` is the context encoder's LayerNorm on its input (`context_encoder.norm`:
  speech and images always, even with zero prenet blocks as in audio base; text only with some);
  then `input_dropout` (`prenet_dropout`, or the main stack's `dropout_input`). No final norm.
  LayerDrop skips a block with probability `layerdrop`, one draw per block and batch, as a
  select under jit.

  `alibi_scale` [L or 1, 1, H or 1, 1, 1] (clamped, from `AlibiScale`): block i's bias is
  `attention_bias * alibi_scale[i]` (or `[0]`), as fairseq applies per-layer scales; pass None
  when the scale is already folded into `attention_bias`.
  Returns `(x, [aux of every block])`.
  """

  num_layers: int
  num_heads: int
  mlp_ratio: float = 4.0
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.0
  post_mlp_dropout: float = 0.1
  start_drop_path_rate: float = 0.0
  end_drop_path_rate: float = 0.0
  layerdrop: float = 0.0
  input_norm: bool = False
  input_dropout: float = 0.0
  norm_eps: float = 1e-5
  execution: transformer.Execution = transformer.Execution()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask=None, attention_bias=None, alibi_scale=None, *, train: bool):
    if alibi_scale is not None and alibi_scale.shape[0] not in (1, self.num_layers):
      raise ValueError(f"{alibi_scale.shape[0]} alibi scales for {self.num_layers} blocks")
    if self.input_norm:
      x = nn.LayerNorm(self.norm_eps, dtype=self.dtype, name="input_norm")(x)
    x = nn.Dropout(self.input_dropout)(x, deterministic=not train)
    rates = drop_path_rates(self.start_drop_path_rate, self.end_drop_path_rate, self.num_layers)
    block = transformer.block_class(AltBlock, self.execution)
    layer_results = []
    for i, rate in enumerate(rates):
      bias = attention_bias
      if bias is not None and alibi_scale is not None:
        bias = bias * alibi_scale[i if alibi_scale.shape[0] > 1 else 0].astype(bias.dtype)
      y, aux = block(
        self.num_heads,
        self.mlp_ratio,
        dropout=self.dropout,
        attention_dropout=self.attention_dropout,
        activation_dropout=self.activation_dropout,
        post_mlp_dropout=self.post_mlp_dropout,
        drop_path=rate,
        norm_eps=self.norm_eps,
        fused_attention=self.execution.fused_attention,
        dtype=self.dtype,
        name=f"layer_{i:02d}",
      )(x, padding_mask, bias, train)
      x = transformer.layer_drop(self, y, x, self.layerdrop, train=train)
      layer_results.append(aux)
    return x, layer_results


# ------------------------------------------------------------------------------------------------
# ALiBi (speech)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi head slopes [H], float32, as fairseq's `get_alibi.get_slopes`.

  For H a power of 2: 2^(−8/H), 2^(−16/H), … (start = ratio = 2^(−8/H)). Otherwise the slopes of
  the largest power of 2 below H, followed by every other slope of twice that power, i.e. the
  ones that fall between them, until there are H.
  """

  def power_of_2(n):
    start = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return [start * start**i for i in range(n)]

  def slopes(n):
    if math.log2(n).is_integer():
      return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + slopes(2 * closest)[0::2][: n - closest]

  return np.asarray(slopes(num_heads), np.float32)


def alibi_bias(num_heads: int, length: int) -> jax.Array:
  """Symmetric 1-D ALiBi bias [H, T, T]: bias[h, i, j] = −slope_h · |i − j|, float32.

  Built from iotas so a long sequence does not become a large constant in the compiled graph.
  """
  pos = jnp.arange(length, dtype=jnp.float32)
  distance = jnp.abs(pos[None, :] - pos[:, None])  # [T, T]
  return jnp.asarray(alibi_slopes(num_heads))[:, None, None] * -distance[None]


class AlibiScale(nn.Module):
  """The learned ALiBi scale, clamped at ≥ 0 (fairseq `alibi_scale`, `clamp_min(0)`).

  Param `alibi_scale` [num_layers, 1, H or 1, 1, 1], initialised to `init_scale` (fairseq
  `alibi_scale`, 1.0): fairseq's shape with
  `learned_alibi_scale_per_layer` (num_layers = prenet + main depth) and `_per_head`. A negative
  value acts as 0 and gets no gradient (as torch's clamp). `learned=False` keeps it fixed.
  Returns the clamped scale; slice it per stack for `AltEncoder(alibi_scale=...)`.
  """

  num_heads: int
  num_layers: int = 1
  per_head: bool = True
  init_scale: float = 1.0
  learned: bool = True

  @nn.compact
  def __call__(self):
    shape = (self.num_layers, 1, self.num_heads if self.per_head else 1, 1, 1)
    scale = self.param("alibi_scale", nn.initializers.constant(self.init_scale), shape, jnp.float32)
    if not self.learned:
      scale = jax.lax.stop_gradient(scale)
    return jnp.where(scale >= 0, scale, 0.0)


def masked_alibi(bias, keep_ids):
  """The bias between kept tokens: [B or 1, H, T, T] or [H, T, T], keep_ids [B, K] -> [B, H, K, K].

  out[b, h, i, j] = bias[b, h, keep_ids[b, i], keep_ids[b, j]] (fairseq `masked_alibi`), so the
  student, which sees only its kept tokens, is biased by their original distances.
  """
  batch, num_keep = keep_ids.shape
  bias = bias[None] if bias.ndim == 3 else bias
  bias = jnp.broadcast_to(bias, (batch, *bias.shape[1:]))
  rows = jnp.take_along_axis(bias, keep_ids[:, None, :, None], axis=2)  # [B, H, K, T]
  cols = jnp.broadcast_to(keep_ids[:, None, None, :], (*rows.shape[:2], num_keep, num_keep))
  return jnp.take_along_axis(rows, cols, axis=3)  # [B, H, K, K]


# ------------------------------------------------------------------------------------------------
# Fixed 2-D positions (images)


# ------------------------------------------------------------------------------------------------
# Convolutional decoders


def _conv_layer(x, features, kernel, groups, dtype, name):
  """A decoder layer: `conv.same_conv_layer` with PyTorch's default Conv bias init."""
  fan_in = x.shape[-1] // groups * kernel ** (x.ndim - 2)
  return conv.same_conv_layer(x, features, kernel, groups, dtype, name, torch_bias_init(fan_in))


def _projection(x, out_dim, layers, ratio, dtype):
  """fairseq's decoder `proj`: (layers − 1) × [Linear -> GELU], the first widening by `ratio`,
  then Linear to `out_dim`; PyTorch default init (DecoderBase.reset_parameters)."""

  def dense(y, n, name):
    init = dict(kernel_init=torch_default_init, bias_init=torch_bias_init(y.shape[-1]))
    return nn.Dense(n, dtype=dtype, name=name, **init)(y)

  for j in range(layers - 1):
    x = gelu(dense(x, int(x.shape[-1] * ratio) if j == 0 else x.shape[-1], f"proj_{j}"))
  return dense(x, out_dim, "proj")


class Decoder1d(nn.Module):
  """fairseq's Decoder1d: [B, T, C] -> [B, T, C] (the projection returns to the input width).

  `num_layers` × conv layer (k = `kernel`, `groups`), the first mapping C -> `decoder_dim`, each
  plus its input when `residual` and the widths match (so never layer 0 when C ≠ decoder_dim);
  then the projection (`projection_layers`, `projection_ratio`). The caller builds the full-length
  input in original order (kept tokens and noise at masked ones). Padded positions are zeroed
  before every conv, so they cannot reach valid outputs (fairseq does not mask here).
  """

  decoder_dim: int = 384
  kernel: int = 5
  groups: int = 16
  num_layers: int = 5
  residual: bool = True
  projection_layers: int = 1
  projection_ratio: float = 2.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask=None):
    out_dim = x.shape[-1]
    for i in range(self.num_layers):
      residual = x
      if padding_mask is not None:
        x = jnp.where(padding_mask[..., None], 0, x)
      x = _conv_layer(x, self.decoder_dim, self.kernel, self.groups, self.dtype, f"conv_{i}")
      if self.residual and residual.shape[-1] == x.shape[-1]:
        x = x + residual  # [B, T, decoder_dim]
    return _projection(x, out_dim, self.projection_layers, self.projection_ratio, self.dtype)


class Decoder2d(nn.Module):
  """fairseq's Decoder2d: [B, h·w, C] (row-major patches) -> [B, h·w, C] on the (h, w) grid.

  The conv layers of `Decoder1d` as 2-D convs (k × k); fairseq's 2-D decoder always projects with
  one Linear. No padding mask: every image fills the grid.
  """

  grid: tuple[int, int]
  decoder_dim: int = 384
  kernel: int = 5
  groups: int = 16
  num_layers: int = 5
  residual: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask=None):
    del padding_mask  # images fill the grid: never padded (the 1-D decoder's signature)
    batch, length, out_dim = x.shape
    h, w = self.grid
    if length != h * w:
      raise ValueError(f"{length} tokens for a {h}x{w} grid")
    x = x.reshape(batch, h, w, out_dim)  # [B, h, w, C]
    for i in range(self.num_layers):
      residual = x
      x = _conv_layer(x, self.decoder_dim, self.kernel, self.groups, self.dtype, f"conv_{i}")
      if self.residual and residual.shape[-1] == x.shape[-1]:
        x = x + residual
    x = x.reshape(batch, length, self.decoder_dim)
    return _projection(x, out_dim, 1, 1.0, self.dtype)
