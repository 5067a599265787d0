"""The data2vec 2.0 model (spec §2.1; fairseq `data2vec2.py`, `modalities/base.py`, `images.py`).

One module serves student and teacher, as in v1 (`data2vec.py`):
  - `embed`: the modality's local encoder -> tokens [B, N, D] with their fixed positions (images:
    patch embedding + 2-D sin-cos table, a constant);
  - `encode(tokens, padding, keep_ids)`: the student keeps only the unmasked tokens (gathered by
    index, a static count K: MAE-style, spec §2.1.1), then the context encoder: the extra (CLS)
    tokens are prepended after the removal, LayerNorm, the prenet blocks and the main `AltBlock`s.
    With `keep_ids=None` it encodes every token (the teacher; probes and feature extraction);
  - `decode(x, mask)`: the light convolutional decoder (spec §2.1.2): the kept tokens' outputs
    (CLS removed, input dropout) and N(0, σ²) noise vectors at the masked positions, put back in
    their original order, then the 2-D conv decoder and its projection to D. Predictions for
    every position; the loss reads the masked ones.

`encode` hides the extra tokens as v1's image encoder does: outputs and per-block sublayer outputs
are for the (kept) patch positions only; the last CLS output is `aux["cls"]` (the CLS loss reads
it). `aux["layers"]` lists the prenet blocks first; `num_prenet` says how many, since targets
come from the main blocks only (spec §2.1.5).

Per modality: images as above; text: RoBERTa's embeddings (`text.TextFrontend`), no extra
token, the 1-D decoder with a two-layer projection; speech: the v1 CNN and feature projection,
convolutional relative positions on the whole (masked-zeroed) sequence, ALiBi with learned
per-head scales in every block, the 1-D decoder.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from d2v_jax import masking_v2
from d2v_jax.models import audio, image, text, transformer, v2_layers
from d2v_jax.models.data2vec import model_sizes

# BEiT/MAE: the patch projection is Xavier-uniform over the flattened [C·p·p, D] weight.
_PATCH_INIT = nn.initializers.variance_scaling(
  1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1
)


class ContextEncoder(nn.Module):
  """Everything between the local encoder and the decoder (fairseq's relative positional
  encoder, extra tokens, context encoder and blocks): tokens [B, N, D] -> (x [B, K, D] at the
  kept positions without the extra tokens, aux). The encoder a fine-tuning model keeps.

  With `keep_ids` [B, K] only those tokens are encoded (the student); None encodes them all.
  Speech first adds its convolutional positions, computed on the whole sequence with the masked
  frames zeroed (fairseq's `encoder_zero_mask`: kept frames learn where masked ones are, not
  what they hold), and biases every block with ALiBi at the kept frames' ORIGINAL distances,
  scaled per head by learned scales clamped at 0. Then the extra (CLS) tokens are prepended,
  LayerNorm (`input_norm`), and the prenet and main `AltBlock`s run.

  fairseq's context encoder has that LayerNorm for speech and images, but for text only with
  prenet blocks (`text.py`): text's embeddings end in their own LayerNorm.
  """

  num_layers: int  # prenet + main
  num_heads: int
  mlp_ratio: float
  num_extra_tokens: int = 1
  dropout: float = 0.0
  attention_dropout: float = 0.0
  activation_dropout: float = 0.0
  drop_path_rate: float = 0.0
  layerdrop: float = 0.0
  norm_eps: float = 1e-6
  input_norm: bool = True
  relative_positions: nn.Module | None = None  # speech's convolutional positions
  alibi: bool = False  # speech: ALiBi with learned per-head scales
  execution: transformer.Execution = transformer.Execution()  # remat, fused attention
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, padding_mask, keep_ids=None, *, train: bool):
    length = x.shape[1]
    if self.relative_positions is not None:
      visible = x
      if keep_ids is not None:
        rows = jnp.arange(x.shape[0])[:, None]
        kept = jnp.zeros(x.shape[:2], bool).at[rows, keep_ids].set(True)  # [B, T]
        visible = jnp.where(kept[..., None], x, 0)
      x = x + self.relative_positions(visible, padding_mask)
    bias = None
    if self.alibi:
      scale = v2_layers.AlibiScale(self.num_heads, name="alibi_scale")()[0, 0]  # [H, 1, 1]
      bias = v2_layers.alibi_bias(self.num_heads, length) * scale  # [H, T, T]
      bias = bias[None] if keep_ids is None else v2_layers.masked_alibi(bias, keep_ids)
    if keep_ids is not None:
      x = masking_v2.gather(x, keep_ids)  # [B, K, D]
      padding_mask = masking_v2.gather(padding_mask, keep_ids)
    batch, _, dim = x.shape
    extra = self.num_extra_tokens
    if extra:  # fairseq: N(0, 1) (init_extra_token_zero false)
      tokens = self.param("extra_tokens", nn.initializers.normal(1.0), (extra, dim))
      x = jnp.concatenate([jnp.broadcast_to(tokens.astype(x.dtype), (batch, extra, dim)), x], 1)
      padding_mask = jnp.pad(padding_mask, ((0, 0), (extra, 0)))  # [B, E+K]
    x, layers = v2_layers.AltEncoder(
      self.num_layers,
      self.num_heads,
      self.mlp_ratio,
      dropout=self.dropout,
      attention_dropout=self.attention_dropout,
      activation_dropout=self.activation_dropout,
      post_mlp_dropout=self.dropout,
      end_drop_path_rate=self.drop_path_rate,
      layerdrop=self.layerdrop,
      input_norm=self.input_norm,
      norm_eps=self.norm_eps,
      execution=self.execution,
      dtype=self.dtype,
      name="blocks",
    )(x, padding_mask, bias, train=train)
    layers = [{name: y[:, extra:] for name, y in layer.items()} for layer in layers]
    cls = x[:, 0] if extra else None
    return x[:, extra:], {"layers": layers, "cls": cls}


class Data2Vec2(nn.Module):
  """Student (and teacher) of data2vec 2.0. Parameter tree: frontend, encoder, decoder."""

  frontend: nn.Module
  encoder: ContextEncoder
  decoder: nn.Module
  dim: int
  num_prenet: int = 0
  mask_noise_std: float = 0.01
  decoder_input_dropout: float = 0.0

  def setup(self):
    self.decoder_dropout = nn.Dropout(self.decoder_input_dropout)

  def embed(self, inputs, padding_mask, *, train: bool):
    """Raw input -> (tokens with fixed positions [B, N, D], padding mask [B, N])."""
    return self.frontend(inputs, padding_mask, train=train)

  def encode(self, tokens, padding_mask, keep_ids=None, *, train: bool):
    """The context encoder on the tokens at `keep_ids` [B, K] (None: every token)."""
    return self.encoder(tokens, padding_mask, keep_ids, train=train)

  def decode(self, x, mask: masking_v2.V2Mask, padding_mask=None, *, train: bool):
    """Encoder outputs at the kept positions [B, K, D] -> predictions at all N positions.

    `padding_mask` [B, N] (text) keeps padded positions out of the 1-D decoder's convolutions.
    """
    x = self.decoder_dropout(x, deterministic=not train)
    masked_shape = (x.shape[0], mask.mask.shape[1] - x.shape[1], x.shape[2])
    noise = jnp.zeros(masked_shape, x.dtype)
    if masked_shape[1]:  # static: `init` decodes with nothing masked and needs no noise stream
      noise = self.mask_noise_std * jax.random.normal(self.make_rng("noise"), masked_shape)
    full = masking_v2.unshuffle(x, noise.astype(x.dtype), mask.restore_ids)  # [B, N, D]
    return self.decoder(full, padding_mask)

  def __call__(self, inputs, padding_mask=None, *, train: bool = False):
    """Every module once (for `init`): the whole input through encoder and decoder."""
    tokens, token_padding = self.embed(inputs, padding_mask, train=train)
    x, aux = self.encode(tokens, token_padding, train=train)
    num = tokens.shape[1]
    everything = masking_v2.from_mask(jnp.zeros((tokens.shape[0], num), bool), num)
    return self.decode(x, everything, token_padding, train=train), aux


def _decoder(modality: str, d: ml_collections.ConfigDict, sizes: dict, dtype) -> nn.Module:
  """The 2-D decoder on the patch grid (images) or the 1-D one over time (speech, text)."""
  conv = dict(
    decoder_dim=d.dim, kernel=d.kernel, groups=d.groups, num_layers=d.layers, residual=d.residual
  )
  if modality == "image":
    grid = image.patch_grid(sizes["image_size"], sizes["patch_size"])
    return v2_layers.Decoder2d(grid=grid, **conv, dtype=dtype)
  return v2_layers.Decoder1d(**conv, projection_layers=d.projection_layers, dtype=dtype)


def _frontend(modality: str, model_cfg, sizes: dict, dtype) -> nn.Module:
  """The local encoder: the CNN and feature projection (speech), patches with fixed positions
  (images) or embeddings (text)."""
  if modality == "audio":
    return audio.AudioFrontend(
      sizes["dim"],
      sizes["conv_dim"],
      execution=transformer.execution_from_config(model_cfg),
      dtype=dtype,
    )
  if modality == "image":
    return image.ImageFrontend(
      sizes["dim"],
      sizes["image_size"],
      sizes["patch_size"],
      dtype=dtype,
      kernel_init=_PATCH_INIT,
      fixed_positions=True,
    )
  return text.TextFrontend(
    sizes["vocab_size"],
    sizes["dim"],
    max_positions=sizes["max_positions"],
    pad_id=model_cfg.pad_id,
    dropout=model_cfg.dropout,
    layer_norm_eps=model_cfg.norm_eps,
    dtype=dtype,
  )


# Extra (CLS) tokens per modality (fairseq `num_extra_tokens`): only images have one.
_EXTRA_TOKENS = {"audio": 0, "image": 1, "text": 0}


def build_backbone(modality: str, model_cfg: ml_collections.ConfigDict):
  """(local encoder, context encoder, width) of `modality`: what pretraining and fine-tuning
  models share (`finetune.build_finetune_model` puts a task head on them)."""
  if modality not in _EXTRA_TOKENS:
    raise NotImplementedError(
      f"data2vec 2.0 has no {modality!r} model; known: {sorted(_EXTRA_TOKENS)}"
    )
  sizes = model_sizes(modality, model_cfg)
  dtype = jnp.dtype(model_cfg.dtype)
  dim = sizes["dim"]
  speech = modality == "audio"
  encoder = ContextEncoder(
    num_layers=sizes["num_layers"],
    num_heads=sizes["num_heads"],
    mlp_ratio=sizes["mlp_dim"] / dim,
    num_extra_tokens=_EXTRA_TOKENS[modality],
    # Training fields: a fine-tuning config (built on a v1 pretraining config) may lack some.
    dropout=model_cfg.get("dropout", 0.0),
    attention_dropout=model_cfg.get("attention_dropout", 0.0),
    activation_dropout=model_cfg.get("activation_dropout", 0.0),
    drop_path_rate=model_cfg.get("drop_path_rate", 0.0),
    layerdrop=model_cfg.get("layerdrop", 0.0),
    norm_eps=model_cfg.norm_eps,
    input_norm=modality != "text" or model_cfg.get("prenet_depth", 0) > 0,
    relative_positions=audio.ConvPositionalEncoding(
      sizes["pos_conv_depth"], sizes["pos_conv_kernel"], sizes["pos_conv_groups"], dtype=dtype
    )
    if speech
    else None,
    alibi=speech,
    execution=transformer.execution_from_config(model_cfg),
    dtype=dtype,
  )
  return _frontend(modality, model_cfg, sizes, dtype), encoder, dim


def build_model(modality: str, model_cfg: ml_collections.ConfigDict) -> Data2Vec2:
  """The data2vec 2.0 model of `modality` from `config.model` (version=2 configs).

  `num_layers` counts every block, prenet (`prenet_depth`) and main.
  """
  frontend, encoder, dim = build_backbone(modality, model_cfg)
  sizes = model_sizes(modality, model_cfg)
  return Data2Vec2(
    frontend=frontend,
    encoder=encoder,
    decoder=_decoder(modality, model_cfg.decoder, sizes, jnp.dtype(model_cfg.dtype)),
    dim=dim,
    num_prenet=model_cfg.prenet_depth,
    mask_noise_std=model_cfg.mask_noise_std,
    decoder_input_dropout=model_cfg.decoder.input_dropout,
  )
