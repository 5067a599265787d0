"""Transformer blocks and encoder stack shared by every modality.

Implements the post-LN block of data2vec v1 speech and text (spec §1.1, "Transformer blocks"):

    x = LN1(x + dropout(attention(x)))
    f = fc2(dropout(gelu(fc1(x))))          # the FFN output: v1 audio/text regression targets
    x = LN2(x + dropout(f))                 # the end-of-block output

Each block returns `(x, {"ffn": f, "block": x})`, so target construction (spec §1.3) can pick
either sublayer without touching the model. Parameter names follow `layer_00/attention/query`.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

# fairseq and HF use exact (erf) GELU.
gelu = lambda x: nn.gelu(x, approximate=False)  # noqa: E731

# fairseq's init_bert_params: every Linear in the transformer is N(0, 0.02) with zero bias.
bert_init = nn.initializers.normal(0.02)

_NEG_INF = (
  -1e9
)  # additive attention bias for padded keys; finite so fully-padded rows stay NaN-free


class MultiHeadAttention(nn.Module):
  """Self-attention with separate query/key/value/out projections, all with bias."""

  num_heads: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask, *, train: bool):
    # x: [B, T, D]; padding_mask: [B, T], True at padded positions.
    dim = x.shape[-1]
    head_dim = dim // self.num_heads
    dense = lambda name: nn.DenseGeneral(  # noqa: E731
      (self.num_heads, head_dim), kernel_init=bert_init, dtype=self.dtype, name=name
    )
    q = dense("query")(x) * head_dim**-0.5  # [B, T, H, Dh]
    k = dense("key")(x)
    v = dense("value")(x)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)  # [B, H, T, T]
    if padding_mask is not None:
      logits = jnp.where(padding_mask[:, None, None, :], _NEG_INF, logits)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    probs = nn.Dropout(self.dropout)(probs, deterministic=not train)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, T, H, Dh]
    return nn.DenseGeneral(dim, axis=(-2, -1), kernel_init=bert_init, dtype=self.dtype, name="out")(
      out
    )


class PostLNBlock(nn.Module):
  """One post-LN transformer block (wav2vec 2.0 / RoBERTa layout)."""

  num_heads: int
  mlp_dim: int
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.0
  layer_norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask, *, train: bool):
    dim = x.shape[-1]
    drop = lambda rate, y: nn.Dropout(rate)(y, deterministic=not train)  # noqa: E731
    norm = lambda name: nn.LayerNorm(  # noqa: E731
      epsilon=self.layer_norm_eps, dtype=self.dtype, name=name
    )
    attn = MultiHeadAttention(
      self.num_heads, self.attention_dropout, dtype=self.dtype, name="attention"
    )(x, padding_mask, train=train)
    x = norm("attention_norm")(x + drop(self.dropout, attn))
    h = gelu(
      nn.Dense(self.mlp_dim, kernel_init=bert_init, dtype=self.dtype, name="fc1")(x)
    )  # [B, T, F]
    ffn = nn.Dense(dim, kernel_init=bert_init, dtype=self.dtype, name="fc2")(
      drop(self.activation_dropout, h)
    )
    x = norm("final_norm")(x + drop(self.dropout, ffn))
    return x, {"ffn": ffn, "block": x}


class Encoder(nn.Module):
  """A stack of blocks with LayerDrop; returns the output and every block's sublayer outputs.

  LayerDrop (fairseq): in training each block is skipped with probability `layerdrop`, one draw
  per batch. Under jit the block is still computed and the skip is a select, which keeps one
  static graph.
  """

  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.0
  layerdrop: float = 0.0
  layer_norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask, *, train: bool):
    layer_results = []
    for i in range(self.num_layers):
      y, aux = PostLNBlock(
        self.num_heads,
        self.mlp_dim,
        self.dropout,
        self.attention_dropout,
        self.activation_dropout,
        self.layer_norm_eps,
        dtype=self.dtype,
        name=f"layer_{i:02d}",
      )(x, padding_mask, train=train)
      if train and self.layerdrop > 0:
        keep = jax.random.uniform(self.make_rng("dropout")) >= self.layerdrop
        y = jnp.where(keep, y, x)
      x = y
      layer_results.append(aux)
    return x, layer_results
