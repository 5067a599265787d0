"""Fine-tuning models: the pretrained front end and encoder under a task head (spec §1.6).

Parameter tree: `frontend`, `encoder` (both loaded from pretraining), `mask_emb` (speech only:
fine-tuning keeps masking time steps, SpecAugment style) and `head` (always initialised fresh).
Heads:
  - `CTCHead` (speech recognition): dropout -> Linear(D -> letters), per frame;
  - `PooledHead` (speech and image classification): mean over valid tokens -> LayerNorm (vision's
    `fc_norm`) -> dropout -> Linear(D -> classes);
  - `SentenceHead` (text, RoBERTa's classification head): the `<s>` token -> dropout -> Linear ->
    tanh -> dropout -> Linear(D -> classes), one output for regression.
"""

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from d2v_jax.models import data2vec, data2vec2, transformer


def masked_mean(x, padding_mask):
  """[B, T, D], [B, T] (True = pad) -> [B, D]: the mean over valid tokens."""
  valid = (~padding_mask)[..., None].astype(x.dtype)
  return jnp.sum(x * valid, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1.0)


class CTCHead(nn.Module):
  """fairseq Wav2VecCtc: final dropout, then a Linear with Xavier-uniform weights, zero bias."""

  num_outputs: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, padding_mask, *, train: bool):
    del padding_mask  # per-frame outputs; the loss reads the mask
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return nn.Dense(self.num_outputs, kernel_init=nn.initializers.xavier_uniform(), name="proj")(
      x
    )  # [B, T, V]


class PooledHead(nn.Module):
  """Mean-pooled classifier. `init_scale` multiplies the N(0, 0.02) kernel (BEiT: 0.001)."""

  num_outputs: int
  dropout: float = 0.0
  norm: bool = False
  layer_norm_eps: float = 1e-6
  init_scale: float = 1.0

  @nn.compact
  def __call__(self, x, padding_mask, *, train: bool):
    x = masked_mean(x, padding_mask)  # [B, D]
    if self.norm:
      x = nn.LayerNorm(self.layer_norm_eps, name="norm")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    init = nn.initializers.truncated_normal(0.02 * self.init_scale, lower=-2.0, upper=2.0)
    return nn.Dense(self.num_outputs, kernel_init=init, name="proj")(x)  # [B, C]


class SentenceHead(nn.Module):
  """RoBERTa's classification head on the first (`<s>`) token, N(0, 0.02) init, zero biases."""

  num_outputs: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, padding_mask, *, train: bool):
    del padding_mask  # `<s>` is never padding
    x = nn.Dropout(self.dropout)(x[:, 0], deterministic=not train)  # [B, D]
    x = jnp.tanh(nn.Dense(x.shape[-1], kernel_init=transformer.bert_init, name="dense")(x))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return nn.Dense(self.num_outputs, kernel_init=transformer.bert_init, name="out")(x)  # [B, C]


class FineTuneModel(nn.Module):
  """Front end -> (speech: masked time steps) -> encoder -> task head.

  `__call__` returns (head output, token padding mask [B, T]); the output is [B, T, V] for CTC
  and [B, C] for the pooled and sentence heads.
  """

  frontend: nn.Module
  encoder: nn.Module
  head: nn.Module
  dim: int
  mask_init: nn.initializers.Initializer | None = None  # None: no mask embedding

  @nn.compact
  def __call__(self, inputs, padding_mask, mask=None, channel_mask=None, *, train: bool = False):
    tokens, token_padding = self.frontend(inputs, padding_mask, train=train)  # [B, T, D]
    if self.mask_init is not None:
      mask_emb = self.param("mask_emb", self.mask_init, (self.dim,))
      if mask is not None:  # [B, T]: fairseq's fine-tuning time masks (mask_prob)
        tokens = jnp.where(mask[..., None], mask_emb.astype(tokens.dtype), tokens)
    elif mask is not None:
      raise ValueError("This fine-tuning model has no mask embedding: pass mask=None")
    if channel_mask is not None:  # [B, D]: fairseq's mask_channel zeroes feature channels
      tokens = jnp.where(channel_mask[:, None, :], 0.0, tokens)
    x, _ = self.encoder(tokens, token_padding, train=train)
    return self.head(x, token_padding, train=train), token_padding


# (modality, task) -> how the head is built from `config.head`.
_HEADS = {
  ("audio", "ctc"): lambda h, n: CTCHead(n, dropout=h.dropout),
  ("audio", "classify"): lambda h, n: PooledHead(n, dropout=h.dropout),
  ("image", "classify"): lambda h, n: PooledHead(
    n, dropout=h.dropout, norm=True, layer_norm_eps=h.layer_norm_eps, init_scale=h.init_scale
  ),
  ("text", "classify"): lambda h, n: SentenceHead(n, dropout=h.dropout),
  ("text", "regress"): lambda h, n: SentenceHead(n, dropout=h.dropout),
}


def build_finetune_model(
  modality: str,
  model_cfg: ml_collections.ConfigDict,
  head_cfg: ml_collections.ConfigDict,
  version: int = 1,
) -> FineTuneModel:
  """The fine-tuning model for `head_cfg.task` (ctc | classify | regress) and its output size.

  Speech keeps its mask embedding (fine-tuning masks time steps); vision leaves out the
  encoder's final LayerNorm, which BEiT's mean-pooling classifier replaces by `head/norm`.
  `version=2`: data2vec 2.0's local and context encoders (no decoder, spec §2.3 "v2
  fine-tuning"); speech's mask embedding then starts fresh (2.0 pretraining has none).
  """
  key = (modality, head_cfg.task)
  if key not in _HEADS:
    known = ", ".join(f"{m}/{t}" for m, t in _HEADS)
    raise ValueError(f"config.head.task={head_cfg.task!r} is not available for {modality}: {known}")
  num_outputs = 1 if head_cfg.task == "regress" else head_cfg.num_outputs
  if num_outputs < 1:
    raise ValueError(f"config.head.num_outputs={head_cfg.num_outputs}: must be at least 1")
  head = _HEADS[key](head_cfg, num_outputs)
  speech_mask = nn.initializers.uniform(1.0) if modality == "audio" else None  # fairseq's U[0, 1)
  if version == 2:
    frontend, encoder, dim = data2vec2.build_backbone(modality, model_cfg)
    return FineTuneModel(frontend, encoder, head, dim, mask_init=speech_mask)
  backbone = data2vec.build_backbone(modality, model_cfg, final_norm=modality != "image")
  return FineTuneModel(
    frontend=backbone.frontend,
    encoder=backbone.encoder,
    head=head,
    dim=backbone.dim,
    mask_init=speech_mask,
  )
