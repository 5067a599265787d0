"""The data2vec student: front end -> mask embedding -> encoder -> regression head (spec §0).

The same module serves student and teacher. The student embeds its input, replaces masked tokens
with a learned embedding and regresses the teacher's targets through `final_proj` (vision's
`lm_head`). The teacher runs with its own (EMA) parameters on the unmasked input: for speech the
encoder alone on the student's features (`model.encoder.apply({"params": teacher["encoder"]},
...)` runs it standalone, since `encoder` is a module field); for vision the whole model.
"""

from typing import NamedTuple

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from d2v_jax.models import audio, image, text, transformer, variants


class Data2Vec(nn.Module):
  """Student model. Parameter tree: frontend, mask_emb, encoder, final_proj.

  Attributes:
    mask_init: initialiser of the learned mask embedding; None = no mask embedding (text masks
      token ids with `<mask>` before the embedding instead).
    head_hidden: 0 = `final_proj` is one Linear(D -> D) (speech, vision's lm_head); otherwise
      text's two-layer regression head with this hidden width.
  """

  frontend: nn.Module
  encoder: nn.Module
  dim: int
  mask_init: nn.initializers.Initializer | None = nn.initializers.uniform(1.0)
  head_init: nn.initializers.Initializer = transformer.torch_default_init
  head_hidden: int = 0

  def setup(self):
    if self.mask_init is not None:
      self.mask_emb = self.param("mask_emb", self.mask_init, (self.dim,))
    if self.head_hidden:
      self.final_proj = text.RegressionHead(self.dim, self.head_hidden)
    else:
      self.final_proj = nn.Dense(self.dim, kernel_init=self.head_init)

  def embed(self, inputs, padding_mask, *, train: bool):
    """Raw input -> (tokens [B, T, D], token padding mask [B, T])."""
    return self.frontend(inputs, padding_mask, train=train)

  def encode(self, tokens, padding_mask, mask=None, *, train: bool):
    """Replaces masked tokens (mask [B, T], True = masked) and runs the encoder."""
    if mask is not None:
      if self.mask_init is None:
        raise ValueError("This model masks its input ids, not its embeddings: pass mask=None")
      tokens = jnp.where(mask[..., None], self.mask_emb.astype(tokens.dtype), tokens)
    return self.encoder(tokens, padding_mask, train=train)

  def predict(self, x):
    """Regression head on encoder outputs: [B, T, D] -> [B, T, D]."""
    return self.final_proj(x)

  def __call__(self, inputs, padding_mask, mask=None, *, train: bool = False):
    tokens, token_padding = self.embed(inputs, padding_mask, train=train)
    x, aux = self.encode(tokens, token_padding, mask, train=train)
    return self.predict(x), aux


class Backbone(NamedTuple):
  """What pretraining and fine-tuning models share: front end, encoder and their init choices."""

  frontend: nn.Module
  encoder: nn.Module
  dim: int
  mask_init: nn.initializers.Initializer | None  # None: text masks ids, not embeddings
  head_init: nn.initializers.Initializer  # the modality's Linear init (regression head)
  head_hidden: int  # text's two-layer regression head width; 0 = one Linear


def model_sizes(modality: str, model_cfg: ml_collections.ConfigDict) -> dict:
  """The variant's size fields, with those that `model_cfg` sets taking precedence."""
  sizes = variants.decode_variant(modality, model_cfg.variant)
  sizes.update({k: model_cfg[k] for k in sizes if k in model_cfg})
  return sizes


def build_backbone(
  modality: str, model_cfg: ml_collections.ConfigDict, *, final_norm: bool = True
) -> Backbone:
  """Front end and encoder of `modality` from `config.model` (variant, dropouts, dtype).

  Size fields (`num_layers`, `dim`, `num_heads`, `mlp_dim`, and the front end's: `conv_dim`,
  `pos_conv_*` for audio, `image_size`, `patch_size` for images, `vocab_size`, `max_positions`
  for text) present in `model_cfg` override the variant's, so converted checkpoints of any shape
  can be built. `final_norm=False` leaves out the vision encoder's last LayerNorm (BEiT's
  mean-pooling classifier normalises after pooling instead).
  """
  sizes = model_sizes(modality, model_cfg)
  dtype = jnp.dtype(model_cfg.dtype)
  transformer_sizes = dict(
    num_layers=sizes["num_layers"], num_heads=sizes["num_heads"], mlp_dim=sizes["mlp_dim"]
  )
  dim = sizes["dim"]
  execution = transformer.execution_from_config(model_cfg)
  if modality == "audio":
    frontend = audio.AudioFrontend(dim, sizes["conv_dim"], execution=execution, dtype=dtype)
    encoder = audio.AudioEncoder(
      **transformer_sizes,
      pos_conv_depth=sizes["pos_conv_depth"],
      pos_conv_kernel=sizes["pos_conv_kernel"],
      pos_conv_groups=sizes["pos_conv_groups"],
      dropout=model_cfg.dropout,
      attention_dropout=model_cfg.attention_dropout,
      activation_dropout=model_cfg.activation_dropout,
      layerdrop=model_cfg.layerdrop,
      execution=execution,
      dtype=dtype,
    )
    # fairseq: the speech mask embedding is U[0, 1); final_proj is a default torch Linear.
    return Backbone(
      frontend, encoder, dim, nn.initializers.uniform(1.0), transformer.torch_default_init, 0
    )
  if modality == "image":
    relative_bias = model_cfg.get("relative_bias", "shared")
    if relative_bias not in ("shared", "per_layer"):
      raise ValueError(f"config.model.relative_bias={relative_bias!r}: use 'shared' or 'per_layer'")
    frontend = image.ImageFrontend(dim, sizes["image_size"], sizes["patch_size"], dtype=dtype)
    encoder = image.ImageEncoder(
      grid=image.patch_grid(sizes["image_size"], sizes["patch_size"]),
      **transformer_sizes,
      dropout=model_cfg.dropout,
      attention_dropout=model_cfg.attention_dropout,
      drop_path_rate=model_cfg.drop_path_rate,
      layer_scale_init=model_cfg.layer_scale_init,
      layer_norm_eps=model_cfg.layer_norm_eps,
      final_norm=final_norm,
      per_layer_bias=relative_bias == "per_layer",
      execution=execution,
      dtype=dtype,
    )
    # BEiT: the mask token and lm_head are N(0, 0.02) like every other Linear.
    return Backbone(frontend, encoder, dim, transformer.bert_init, transformer.bert_init, 0)
  if modality == "text":
    frontend = text.TextFrontend(
      sizes["vocab_size"],
      dim,
      max_positions=sizes["max_positions"],
      pad_id=model_cfg.pad_id,
      dropout=model_cfg.dropout,
      layer_norm_eps=model_cfg.layer_norm_eps,
      dtype=dtype,
    )
    encoder = text.TextEncoder(
      **transformer_sizes,
      dropout=model_cfg.dropout,
      attention_dropout=model_cfg.attention_dropout,
      activation_dropout=model_cfg.activation_dropout,
      layer_norm_eps=model_cfg.layer_norm_eps,
      execution=execution,
      dtype=dtype,
    )
    return Backbone(frontend, encoder, dim, None, transformer.bert_init, 2 * dim)
  raise ValueError(f"Unknown modality {modality!r}; known: audio, image, text")


def example_inputs(modality: str, model_cfg: ml_collections.ConfigDict, num_channels: int = 3):
  """The smallest one-example (inputs, padding mask) of `modality`, for initialisation: the
  parameters' shapes and values depend on the config and the key, never on the input length."""
  if modality == "audio":
    return jnp.zeros((1, 400)), jnp.zeros((1, 400), bool)  # one receptive field -> one frame
  if modality == "image":
    size = model_cfg.image_size
    return jnp.zeros((1, size, size, num_channels)), None
  return jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), bool)


def build_model(modality: str, model_cfg: ml_collections.ConfigDict) -> Data2Vec:
  """The pretraining student of `modality` (see `build_backbone` for the config fields)."""
  return Data2Vec(**build_backbone(modality, model_cfg)._asdict())
