"""Text front end, encoder and regression head of data2vec 1.0 (spec §1.1 and §1.3, text columns).

RoBERTa layout, as fairseq's data2vec text model:
- `TextFrontend`: token embedding (no √D scaling) + learned positions + embedding LayerNorm +
  dropout. Positions are RoBERTa's: the i-th non-pad token of a row gets position pad_id + 1 + i,
  pad tokens get pad_id, so position rows 0 .. pad_id are never used by real tokens. Both
  embedding tables start N(0, 0.02) with the pad row zero (fairseq's init_bert_params).
- `TextEncoder`: the post-LN transformer stack, with no final LayerNorm (the embedding LayerNorm
  comes first instead).
- `RegressionHead`: Linear(D -> 2D) -> GELU -> Linear(2D -> D), the student's head.

Masking happens on token ids before the embedding (BERT's `<mask>` token, spec §1.2 text), so the
text model needs no learned mask embedding.
"""

import jax.numpy as jnp
from flax import linen as nn

from d2v_jax.models import transformer


def position_ids(padding_mask, pad_id: int):
  """int32[B, L]: pad_id + (1-based index among the row's non-pad tokens), pad_id at padding."""
  valid = (~padding_mask).astype(jnp.int32)  # [B, L]
  return jnp.cumsum(valid, axis=1) * valid + pad_id


def _zero_pad_row_init(pad_id: int):
  """N(0, 0.02) with row `pad_id` zero, as fairseq's init_bert_params leaves embeddings."""

  def init(key, shape, dtype=jnp.float32):
    table = transformer.bert_init(key, shape, dtype)
    return table.at[pad_id].set(0.0)

  return init


class TextFrontend(nn.Module):
  """Token ids [B, L] -> (embeddings [B, L, D], padding mask [B, L])."""

  vocab_size: int
  dim: int
  max_positions: int = 512
  pad_id: int = 1
  dropout: float = 0.1
  layer_norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, padding_mask, *, train: bool):
    # tokens: int[B, L]; padding_mask: bool[B, L], True at pad tokens.
    length = tokens.shape[1]
    if length > self.max_positions:
      raise ValueError(
        f"Sequences of {length} tokens exceed the model's {self.max_positions} positions"
      )
    init = _zero_pad_row_init(self.pad_id)
    x = nn.Embed(self.vocab_size, self.dim, embedding_init=init, name="token_embed")(tokens)
    # Rows 0 .. pad_id are reserved (RoBERTa: 512 positions take 514 rows).
    num_rows = self.max_positions + self.pad_id + 1
    positions = position_ids(padding_mask, self.pad_id)  # [B, L]
    x = x + nn.Embed(num_rows, self.dim, embedding_init=init, name="position_embed")(positions)
    x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="embed_norm")(x.astype(self.dtype))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return x, padding_mask


class TextEncoder(nn.Module):
  """Embedded tokens [B, L, D] -> (output [B, L, D], {"layers": [{"ffn", "block"} per block]})."""

  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.0
  layer_norm_eps: float = 1e-5
  execution: transformer.Execution = transformer.Execution()  # remat, fused attention
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask, *, train: bool):
    x, layers = transformer.Encoder(
      self.num_layers,
      self.num_heads,
      self.mlp_dim,
      dropout=self.dropout,
      attention_dropout=self.attention_dropout,
      activation_dropout=self.activation_dropout,
      layer_norm_eps=self.layer_norm_eps,
      execution=self.execution,
      dtype=self.dtype,
      name="blocks",
    )(x, padding_mask, train=train)
    return x, {"layers": layers}


class RegressionHead(nn.Module):
  """data2vec text's head: Linear(D -> hidden) -> GELU -> Linear(hidden -> D), N(0, 0.02)."""

  dim: int
  hidden: int

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.hidden, kernel_init=transformer.bert_init, name="dense")(x)
    return nn.Dense(self.dim, kernel_init=transformer.bert_init, name="out")(transformer.gelu(h))
