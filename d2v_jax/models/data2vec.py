"""The data2vec student: front end -> mask embedding -> encoder -> regression head (spec §0).

The same module serves student and teacher. The student embeds its input, replaces masked tokens
with a learned embedding and regresses the teacher's targets through `final_proj`. The teacher
runs `encoder` alone on the unmasked tokens with its own (EMA) parameters: because `encoder` is a
module field, `model.encoder.apply({"params": teacher["encoder"]}, ...)` runs it standalone.
"""

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from d2v_jax.models import audio, variants


class Data2Vec(nn.Module):
  """Student model. Parameter tree: frontend, mask_emb, encoder, final_proj."""

  frontend: nn.Module
  encoder: nn.Module
  dim: int

  def setup(self):
    # fairseq initialises the audio mask embedding from U[0, 1).
    self.mask_emb = self.param("mask_emb", nn.initializers.uniform(1.0), (self.dim,))
    self.final_proj = nn.Dense(self.dim, kernel_init=audio.torch_default_init)

  def embed(self, inputs, padding_mask, *, train: bool):
    """Raw input -> (tokens [B, T, D], token padding mask [B, T])."""
    return self.frontend(inputs, padding_mask, train=train)

  def encode(self, tokens, padding_mask, mask=None, *, train: bool):
    """Replaces masked tokens (mask [B, T], True = masked) and runs the encoder."""
    if mask is not None:
      tokens = jnp.where(mask[..., None], self.mask_emb.astype(tokens.dtype), tokens)
    return self.encoder(tokens, padding_mask, train=train)

  def predict(self, x):
    """Regression head on encoder outputs: [B, T, D] -> [B, T, D]."""
    return self.final_proj(x)

  def __call__(self, inputs, padding_mask, mask=None, *, train: bool = False):
    tokens, token_padding = self.embed(inputs, padding_mask, train=train)
    x, aux = self.encode(tokens, token_padding, mask, train=train)
    return self.predict(x), aux


def build_model(modality: str, model_cfg: ml_collections.ConfigDict) -> Data2Vec:
  """Builds the student for `modality` from `config.model` (variant, dropouts, dtype).

  Size fields (`num_layers`, `dim`, `num_heads`, `mlp_dim`, `conv_dim`, `pos_conv_*`) present in
  `model_cfg` override the variant's, so converted checkpoints of any shape can be built.
  """
  sizes = variants.decode_variant(modality, model_cfg.variant)
  # Explicit size fields in the config (e.g. written by a converter) override the variant's.
  sizes.update({k: model_cfg[k] for k in sizes if k in model_cfg})
  dtype = jnp.dtype(model_cfg.dtype)
  if modality == "audio":
    frontend = audio.AudioFrontend(sizes["dim"], sizes["conv_dim"], dtype=dtype)
    encoder = audio.AudioEncoder(
      num_layers=sizes["num_layers"],
      num_heads=sizes["num_heads"],
      mlp_dim=sizes["mlp_dim"],
      pos_conv_depth=sizes["pos_conv_depth"],
      pos_conv_kernel=sizes["pos_conv_kernel"],
      pos_conv_groups=sizes["pos_conv_groups"],
      dropout=model_cfg.dropout,
      attention_dropout=model_cfg.attention_dropout,
      activation_dropout=model_cfg.activation_dropout,
      layerdrop=model_cfg.layerdrop,
      dtype=dtype,
    )
  else:
    raise ValueError(f"Unknown modality {modality!r}")
  return Data2Vec(frontend=frontend, encoder=encoder, dim=sizes["dim"])
