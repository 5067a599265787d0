"""Transformer blocks and encoder stack shared by every modality (spec §1.1, "Transformer blocks").

One `Block` covers both layouts of data2vec 1.0:

  post-LN (speech, text; wav2vec 2.0 / RoBERTa):
    x = attention_norm(x + dropout(attention(x)))
    f = fc2(dropout(gelu(fc1(x))))            # the FFN output: v1 speech/text targets
    x = ffn_norm(x + dropout(f))              # the end-of-block output

  pre-LN (vision; BEiT), with LayerScale γ and stochastic depth:
    x = x + drop_path(γ1 · attention(attention_norm(x), relative_position_bias))
    f = fc2(gelu(fc1(ffn_norm(x))))           # the FFN output, before γ2
    x = x + drop_path(γ2 · f)                 # the end-of-block output: v1 vision targets

Each block returns `(x, {"ffn": f, "block": x})`, so target construction (spec §1.3) picks a
sublayer without touching the model. Parameter names: `layer_00/attention/query`, `.../fc1`.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

# fairseq and HF use exact (erf) GELU.
gelu = lambda x: nn.gelu(x, approximate=False)  # noqa: E731

# fairseq's init_bert_params and BEiT's init: every Linear is N(0, 0.02) with zero bias (BEiT's
# truncation at ±2 absolute is 100σ away, so it never bites).
INIT_STD = 0.02
bert_init = nn.initializers.normal(INIT_STD)

# PyTorch's default Conv/Linear initialisation (kaiming_uniform with a=sqrt(5)).
torch_default_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")

# Additive attention bias for padded keys; finite so fully padded rows stay NaN-free.
_NEG_INF = -1e9


class MultiHeadAttention(nn.Module):
  """Self-attention with query/key/value/out projections.

  `key_bias=False` is BEiT's fused qkv with q and v biases only (the fused kernel split in
  thirds is exactly these three projections). `out_init` lets BEiT rescale the output layer.
  """

  num_heads: int
  dropout: float = 0.0
  key_bias: bool = True
  out_init: nn.initializers.Initializer = bert_init
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask, attention_bias=None, *, train: bool):
    # x: [B, T, D]; padding_mask: [B, T], True at padded positions; attention_bias: [H, T, T].
    dim = x.shape[-1]
    head_dim = dim // self.num_heads

    def dense(name, use_bias=True):
      return nn.DenseGeneral(
        (self.num_heads, head_dim),
        use_bias=use_bias,
        kernel_init=bert_init,
        dtype=self.dtype,
        name=name,
      )

    q = dense("query")(x) * head_dim**-0.5  # [B, T, H, Dh]
    k = dense("key", self.key_bias)(x)
    v = dense("value")(x)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)  # [B, H, T, T]
    if attention_bias is not None:
      logits = logits + attention_bias.astype(jnp.float32)
    if padding_mask is not None:
      logits = jnp.where(padding_mask[:, None, None, :], _NEG_INF, logits)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    probs = nn.Dropout(self.dropout)(probs, deterministic=not train)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, T, H, Dh]
    return nn.DenseGeneral(
      dim, axis=(-2, -1), kernel_init=self.out_init, dtype=self.dtype, name="out"
    )(out)


class Block(nn.Module):
  """One transformer block, post-LN (`pre_norm=False`) or pre-LN with LayerScale (`True`).

  Attributes:
    layer_scale_init: γ's initial value (pre-LN only); 0 = no LayerScale.
    drop_path: probability of dropping the residual branches of a sample (stochastic depth).
    out_init: initialiser of the attention output and fc2 kernels (BEiT rescales them per depth).
  """

  num_heads: int
  mlp_dim: int
  pre_norm: bool = False
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.0
  drop_path: float = 0.0
  layer_scale_init: float = 0.0
  key_bias: bool = True
  layer_norm_eps: float = 1e-5
  out_init: nn.initializers.Initializer = bert_init
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask, attention_bias=None, *, train: bool):
    dim = x.shape[-1]
    dropout = lambda rate, y: nn.Dropout(rate)(y, deterministic=not train)  # noqa: E731
    # timm's drop_path: the whole branch of a sample is dropped, survivors scaled by 1/(1-p).
    drop_path = lambda y: nn.Dropout(self.drop_path, broadcast_dims=(1, 2))(  # noqa: E731
      y, deterministic=not train
    )
    attention_norm = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="attention_norm")
    ffn_norm = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="ffn_norm")
    attention = MultiHeadAttention(
      self.num_heads,
      self.attention_dropout,
      self.key_bias,
      self.out_init,
      dtype=self.dtype,
      name="attention",
    )

    def ffn(h):
      h = gelu(nn.Dense(self.mlp_dim, kernel_init=bert_init, dtype=self.dtype, name="fc1")(h))
      return nn.Dense(dim, kernel_init=self.out_init, dtype=self.dtype, name="fc2")(
        dropout(self.activation_dropout, h)
      )  # [B, T, D]

    def layer_scale(name, y):
      if not self.layer_scale_init:
        return y
      gamma = self.param(name, nn.initializers.constant(self.layer_scale_init), (dim,))
      return gamma.astype(y.dtype) * y

    if self.pre_norm:
      a = attention(attention_norm(x), padding_mask, attention_bias, train=train)
      x = x + drop_path(layer_scale("attention_scale", dropout(self.dropout, a)))
      f = ffn(ffn_norm(x))
      x = x + drop_path(layer_scale("ffn_scale", dropout(self.dropout, f)))
    else:
      a = attention(x, padding_mask, attention_bias, train=train)
      x = attention_norm(x + dropout(self.dropout, a))
      f = ffn(x)
      x = ffn_norm(x + dropout(self.dropout, f))
    return x, {"ffn": f, "block": x}


def scaled_init(scale: float) -> nn.initializers.Initializer:
  """N(0, 0.02 · scale): BEiT divides block i's attention output and fc2 by √(2i)."""
  return nn.initializers.normal(INIT_STD * scale)


def layer_drop(module: nn.Module, y, x, rate: float, *, train: bool):
  """LayerDrop: the block's output `y`, or in training with probability `rate` its input `x`
  (one draw per batch from `module`'s dropout stream). Under jit the block is still computed and
  the skip is a select, which keeps one static graph."""
  if not train or rate <= 0:
    return y
  keep = jax.random.uniform(module.make_rng("dropout")) >= rate
  return jnp.where(keep, y, x)


class Encoder(nn.Module):
  """A stack of blocks; returns the output and every block's sublayer outputs.

  LayerDrop (fairseq speech): in training each block is skipped with probability `layerdrop`,
  one draw per batch. Under jit the block is still computed and the skip is a select, which keeps
  one static graph. Stochastic depth (vision) rises linearly from 0 to `drop_path_rate` over the
  blocks. `rescale_init` divides block i's (1-based) output projections' init by √(2i) (BEiT).
  """

  num_layers: int
  num_heads: int
  mlp_dim: int
  pre_norm: bool = False
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.0
  layerdrop: float = 0.0
  drop_path_rate: float = 0.0
  layer_scale_init: float = 0.0
  key_bias: bool = True
  rescale_init: bool = False
  layer_norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask, attention_bias=None, *, train: bool):
    # attention_bias: [H, T, T] shared by every block, or [L, H, T, T] one per block.
    per_block = attention_bias is not None and attention_bias.ndim == 4
    if per_block and attention_bias.shape[0] != self.num_layers:
      raise ValueError(f"{attention_bias.shape[0]} attention biases for {self.num_layers} blocks")
    layer_results = []
    for i in range(self.num_layers):
      drop_path = self.drop_path_rate * i / max(self.num_layers - 1, 1)
      out_init = scaled_init((2.0 * (i + 1)) ** -0.5) if self.rescale_init else bert_init
      y, aux = Block(
        self.num_heads,
        self.mlp_dim,
        pre_norm=self.pre_norm,
        dropout=self.dropout,
        attention_dropout=self.attention_dropout,
        activation_dropout=self.activation_dropout,
        drop_path=drop_path,
        layer_scale_init=self.layer_scale_init,
        key_bias=self.key_bias,
        layer_norm_eps=self.layer_norm_eps,
        out_init=out_init,
        dtype=self.dtype,
        name=f"layer_{i:02d}",
      )(x, padding_mask, attention_bias[i] if per_block else attention_bias, train=train)
      x = layer_drop(self, y, x, self.layerdrop, train=train)
      layer_results.append(aux)
    return x, layer_results
