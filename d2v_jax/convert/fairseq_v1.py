"""Released data2vec v1 checkpoints (fairseq, BEiT) -> HF transformers names (spec §4, §1.1, §1.6).

This module only RENAMES. It turns the state dict of an original data2vec v1 checkpoint into the
state dict and config dict of the matching HF transformers model, so that the HF converters
(`hf_audio`, `hf_image`, `hf_text`) do the rest: there is one mapping onto our parameter tree,
theirs. Pure numpy: torch is never imported; loading the `.pt` file is the caller's job.

- `detect_modality`: "audio" | "image" | "text" from the key names.
- `to_hf`: a checkpoint's `model` dict (+ its model config) -> `HFNamed`: HF-named arrays, the HF
  config dict, the EMA teacher in HF names, and every key that was not carried over with the
  reason. A key that is neither mapped nor known to be droppable raises `common.ConversionError`
  listing all of them (data2vec 2.0 checkpoints, `modality_encoders.*`, are `fairseq_v2`'s).

Layouts covered (read from the fairseq and data2vec_vision code, spec §4; checked against
synthetic state dicts by name and shape only, not against the released files):

- audio pretrained (`data2vec_audio`, task "pretrain"): `audio_base_ls.pt`, `vox_pretrained.pt`;
- audio CTC (`Wav2VecCtc`, "ctc"): `audio_base_ls_{10m,100h,960h}.pt`, `vox_{10m,100h,960h}.pt`;
- text pretrained (`data2vec_text`, "pretrain"): `nlp_base.pt`; text fine-tuned on GLUE
  (`classification_heads.<name>.*`, "classify"): none released, fairseq's layout;
- vision pretrained (BEiT `modeling_cyclical`, "pretrain"): data2vec_vision's `base_800/`,
  `large_800/`, `large_1600/checkpoint-799.pth`;
- vision fine-tuned on ImageNet (BEiT `modeling_finetune`, "classify"):
  `finetuned_{base,large}/checkpoint-*/mp_rank_00_model_states.pt`.

Pass `ckpt["model"]` (fairseq, BEiT `.pth`) or `ckpt["module"]` (the DeepSpeed `mp_rank_00` files).

The model config (`cfg`) is `ckpt["cfg"]["model"]` (or `vars(ckpt["args"])` for older files and
the BEiT ones) as a plain dict; a CTC model's encoder config is its `w2v_args` (its `model` part).
Sizes are read off the weight shapes; the config supplies what shapes do not hold: the number of
attention heads (audio, text), the audio CNN strides, dropouts and LayerScale's init value. Without
`cfg`, those are the released models': 12 heads at width 768 and 16 at 1024, strides
(5, 2, 2, 2, 2, 2, 2) for the released kernels, HF's default dropouts.

What each modality needs beyond renaming:
- Audio: `final_proj.*` (stored as `final_proj.0.*` in the released files) is the regression head
  and is dropped. `num_conv_pos_embeddings` is the NUMBER of positional conv layers (spec §4).
  `masked_spec_embed` exists in HF only if a SpecAugment probability is positive: pretrained
  checkpoints get HF's defaults (`mask_time_prob` 0.05), CTC ones their fine-tuning masking.
- Text: HF adds token type embeddings that fairseq lacks; one zero row is added, as HF's own
  conversion does (`type_vocab_size` 1). The regression head (`encoder.regression_head.*`, stored
  as `encoder.lm_head.*` by older code) and a RoBERTa MLM head (`encoder.lm_head.*`) are dropped.
  Old names (`decoder.*`, `emb_layer_norm`) are read the way fairseq's `upgrade_state_dict_named`
  reads them.
- Vision: the fused `attn.qkv.weight` [3D, D] is split into thirds (query, key, value; BEiT has
  no key bias). The relative position bias is shared (`rel_pos_bias.*`, pretrained) or per block
  (`blocks.i.attn.relative_position_bias_table`, fine-tuned); its `relative_position_index` buffers
  are carried over under the names HF's conversion gives them, as older HF checkpoints hold them
  (current HF models compute the index; `hf_image` checks them against ours). `lm_head.*` (the
  regression head) is dropped. Unlike HF's conversion, the pretrained `mask_token` is kept
  (`use_mask_token=True`): our pretraining uses it.

EMA teachers: fairseq stores the teacher's fp32 weights as a nested dict, `_ema` (audio: the
transformer encoder's names, or the whole model's) and `encoder._ema` (text: the sentence
encoder's names). `HFNamed.teacher` holds them under HF base-model names. The BEiT vision teacher
is a separate top-level `ckpt["model_ema"]` with the model's own layout: convert it with
`to_hf(ckpt["model_ema"], cfg)`.
"""

import ast
import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from d2v_jax.convert import common, hf_audio, hf_image, hf_text
from d2v_jax.convert import fairseq_common as fs

MODALITIES = ("audio", "image", "text")
TASKS = ("pretrain", "ctc", "classify")

_PREFIXES = {
  "audio": hf_audio.TASK_MODEL_PREFIX,
  "image": hf_image.TASK_MODEL_PREFIX,
  "text": hf_text.TASK_MODEL_PREFIX,
}

# The audio CNN of every released model (fairseq's default `conv_feature_layers`).
_RELEASED_CONV_KERNELS = (10, 3, 3, 3, 3, 2, 2)
_RELEASED_CONV_STRIDES = (5, 2, 2, 2, 2, 2, 2)

# HF Data2VecAudioConfig defaults, used where the fairseq config has no value.
_HF_AUDIO_DEFAULTS = dict(
  hidden_dropout=0.1,
  attention_dropout=0.1,
  activation_dropout=0.1,
  feat_proj_dropout=0.0,
  final_dropout=0.1,
  layerdrop=0.1,
  mask_time_prob=0.05,
  mask_time_length=10,
  mask_feature_prob=0.0,
  mask_feature_length=10,
)

_V2_HINT = (
  "hint: `modality_encoders.*` keys belong to a data2vec 2.0 checkpoint: convert it with "
  "`fairseq_v2.from_fairseq` (`python -m d2v_jax.convert import` picks it by itself)"
)
_HF_HINT = (
  "hint: these are already HF names; use d2v_jax.convert.hf_audio / hf_image / hf_text directly"
)


@dataclasses.dataclass(frozen=True)
class HFNamed:
  """A fairseq/BEiT checkpoint renamed into an HF transformers model (see the module docstring)."""

  modality: str  # "audio" | "image" | "text"
  task: str  # "pretrain" | "ctc" | "classify"
  hf_config: dict  # fields of Data2VecAudioConfig / Data2VecVisionConfig / Data2VecTextConfig
  # HF names: base-model keys without prefix for "pretrain"; for task models the base-model keys
  # under `prefix` plus the head keys as HF names them (`lm_head.*`, `classifier.*`).
  state_dict: dict[str, np.ndarray]
  prefix: str  # "" or the HF TASK_MODEL_PREFIX of the modality
  teacher: dict[str, np.ndarray] | None  # the EMA teacher under HF base-model names, or None
  dropped: tuple[str, ...]  # every fairseq key not carried over, as "key: reason"


# ----------------------------------------------------------------------------- name tables


def _compile(table):
  """(pattern, target) pairs with the patterns compiled."""
  return tuple((re.compile(pattern), target) for pattern, target in table)


# (fairseq name pattern, HF name template). Patterns are full matches on the fairseq name relative
# to the base model; templates use the pattern's groups. "{part}" marks a fused q/k/v weight that
# is split into thirds, one key per part.
_CONV = r"feature_extractor\.conv_layers\.(\d+)\."
_AUDIO_LAYER = r"encoder\.layers\.(\d+)\."
# Read backwards by `fairseq_export` (HF names -> fairseq's) for the 1.0 speech export.
AUDIO_BASE = (
  (_CONV + r"0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
  (_CONV + r"2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
  (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
  (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
  (r"encoder\.pos_conv\.(\d+)\.0\.(weight|bias)", r"encoder.pos_conv_embed.layers.\1.conv.\2"),
  (
    _AUDIO_LAYER + r"self_attn\.(q|k|v|out)_proj\.(weight|bias)",
    r"encoder.layers.\1.attention.\2_proj.\3",
  ),
  (_AUDIO_LAYER + r"self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
  (_AUDIO_LAYER + r"fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
  (_AUDIO_LAYER + r"fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
  (_AUDIO_LAYER + r"final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
  (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
  (r"mask_emb", r"masked_spec_embed"),
)

_TEXT_EMBED = r"encoder\.sentence_encoder\."
_TEXT_LAYER = r"encoder\.sentence_encoder\.layers\.(\d+)\."
_TEXT_HF_LAYER = r"encoder.layer.\1."
# Read backwards by `fairseq_export` as well.
TEXT_BASE = (
  (_TEXT_EMBED + r"embed_tokens\.weight", r"embeddings.word_embeddings.weight"),
  (_TEXT_EMBED + r"embed_positions\.weight", r"embeddings.position_embeddings.weight"),
  (_TEXT_EMBED + r"layernorm_embedding\.(weight|bias)", r"embeddings.LayerNorm.\1"),
  (_TEXT_LAYER + r"self_attn\.q_proj\.(weight|bias)", _TEXT_HF_LAYER + r"attention.self.query.\2"),
  (_TEXT_LAYER + r"self_attn\.k_proj\.(weight|bias)", _TEXT_HF_LAYER + r"attention.self.key.\2"),
  (_TEXT_LAYER + r"self_attn\.v_proj\.(weight|bias)", _TEXT_HF_LAYER + r"attention.self.value.\2"),
  (
    _TEXT_LAYER + r"self_attn\.out_proj\.(weight|bias)",
    _TEXT_HF_LAYER + r"attention.output.dense.\2",
  ),
  (
    _TEXT_LAYER + r"self_attn_layer_norm\.(weight|bias)",
    _TEXT_HF_LAYER + r"attention.output.LayerNorm.\2",
  ),
  (_TEXT_LAYER + r"fc1\.(weight|bias)", _TEXT_HF_LAYER + r"intermediate.dense.\2"),
  (_TEXT_LAYER + r"fc2\.(weight|bias)", _TEXT_HF_LAYER + r"output.dense.\2"),
  (_TEXT_LAYER + r"final_layer_norm\.(weight|bias)", _TEXT_HF_LAYER + r"output.LayerNorm.\2"),
)

_BLOCK = r"blocks\.(\d+)\."
_VISION_HF_LAYER = r"encoder.layer.\1."
_RELATIVE = r"(relative_position_bias_table|relative_position_index)"
# Read backwards by `fairseq_export` as well.
VISION_BASE = (
  (r"cls_token", r"embeddings.cls_token"),
  (r"mask_token", r"embeddings.mask_token"),
  (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
  (r"rel_pos_bias\." + _RELATIVE, r"encoder.relative_position_bias.\1"),
  (_BLOCK + r"norm1\.(weight|bias)", _VISION_HF_LAYER + r"layernorm_before.\2"),
  (_BLOCK + r"norm2\.(weight|bias)", _VISION_HF_LAYER + r"layernorm_after.\2"),
  (_BLOCK + r"attn\.qkv\.weight", _VISION_HF_LAYER + r"attention.attention.{part}.weight"),
  (_BLOCK + r"attn\.q_bias", _VISION_HF_LAYER + r"attention.attention.query.bias"),
  (_BLOCK + r"attn\.v_bias", _VISION_HF_LAYER + r"attention.attention.value.bias"),
  (
    _BLOCK + r"attn\." + _RELATIVE,
    _VISION_HF_LAYER + r"attention.attention.relative_position_bias.\2",
  ),
  (_BLOCK + r"attn\.proj\.(weight|bias)", _VISION_HF_LAYER + r"attention.output.dense.\2"),
  (_BLOCK + r"mlp\.fc1\.(weight|bias)", _VISION_HF_LAYER + r"intermediate.dense.\2"),
  (_BLOCK + r"mlp\.fc2\.(weight|bias)", _VISION_HF_LAYER + r"output.dense.\2"),
  (_BLOCK + r"gamma_1", _VISION_HF_LAYER + r"lambda_1"),
  (_BLOCK + r"gamma_2", _VISION_HF_LAYER + r"lambda_2"),
  (r"norm\.(weight|bias)", r"layernorm.\1"),
  # Fine-tuned with mean pooling: the LayerNorm of the patch mean, HF's pooler (a base-model key).
  (r"fc_norm\.(weight|bias)", r"pooler.layernorm.\1"),
)

# Task heads: (fairseq name pattern on the full key, HF name template); HF names them at the top
# level of the task model, outside the base-model prefix.
_AUDIO_HEADS = ((r"w2v_encoder\.proj\.(weight|bias)", r"lm_head.\1"),)
_TEXT_HEADS = (
  (r"classification_heads\.[^.]+\.dense\.(weight|bias)", r"classifier.dense.\1"),
  (r"classification_heads\.[^.]+\.out_proj\.(weight|bias)", r"classifier.out_proj.\1"),
)
_VISION_HEADS = ((r"head\.(weight|bias)", r"classifier.\1"),)

# (fairseq name pattern on the full or base-relative key, why it is not carried over).
_REGRESSION_HEAD = "the data2vec regression head; HF has no counterpart (its conversion drops it)"
_AUDIO_DROPS = ((r"final_proj\..*", _REGRESSION_HEAD),)
_TEXT_DROPS = (
  (r"encoder\.regression_head\..*", _REGRESSION_HEAD),
  (
    r"encoder\.lm_head\..*",
    "a pretraining head (the regression head under its old name, or a RoBERTa MLM head); HF's "
    "base model has no counterpart",
  ),
  (r"encoder\.sentence_encoder\.version", "fairseq's format-version buffer, not a parameter"),
)
_VISION_DROPS = ((r"lm_head\..*", _REGRESSION_HEAD),)
_EMA_DROPS = _compile(
  (
    (r"__sq_mom.*", "EMA bookkeeping (squared momentum), not a parameter"),
    (r"(.*\.)?version", "fairseq's format-version buffer, not a parameter"),
    (r"(.*\.)?_float_tensor", "fairseq's device-tracking buffer, not a parameter"),
  )
)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How one modality's fairseq/BEiT names map onto HF's."""

  base: tuple  # base-model rules, on the name relative to the fairseq base model
  heads: tuple  # task-head rules, on the full name
  drops: tuple  # droppable keys, on the full or base-relative name
  task_of_head: str  # the task when head keys are present
  base_prefix: str = ""  # fairseq prefix of the base model inside task models
  ema_key: str = ""  # where fairseq stores the EMA teacher ("" if nowhere)


_LAYOUTS = {
  "audio": _Layout(
    base=_compile(AUDIO_BASE),
    heads=_compile(_AUDIO_HEADS),
    drops=_compile(_AUDIO_DROPS),
    task_of_head="ctc",
    base_prefix="w2v_encoder.w2v_model.",
    ema_key="_ema",
  ),
  "text": _Layout(
    base=_compile(TEXT_BASE),
    heads=_compile(_TEXT_HEADS),
    drops=_compile(_TEXT_DROPS),
    task_of_head="classify",
    ema_key="encoder._ema",
  ),
  "image": _Layout(
    base=_compile(VISION_BASE),
    heads=_compile(_VISION_HEADS),
    drops=_compile(_VISION_DROPS),
    task_of_head="classify",
  ),
}

# Key prefixes that identify each modality's fairseq/BEiT layout.
_MARKERS = {
  "audio": ("feature_extractor.", "post_extract_proj.", "w2v_encoder."),
  "text": ("encoder.sentence_encoder.", "decoder.sentence_encoder."),
  "image": ("patch_embed.", "blocks.", "rel_pos_bias."),
}
_HF_MARKERS = ("feature_projection.", "embeddings.", "encoder.layer.", "data2vec_")


# ----------------------------------------------------------------------------- detection


def _hints(keys: Iterable[str]) -> list[str]:
  """Explanations for keys this module does not read."""
  keys = list(keys)
  hints = []
  if any("modality_encoders." in k for k in keys):
    hints.append(_V2_HINT)
  if any(k.startswith(_HF_MARKERS) for k in keys):
    hints.append(_HF_HINT)
  if any("weight_g" in k or "weight_v" in k for k in keys):
    hints.append("hint: a weight-normed positional conv belongs to wav2vec 2.0, not data2vec")
  if any(k.startswith("backbone.") for k in keys):
    hints.append("hint: `backbone.*` is a BEiT semantic-segmentation model (not supported)")
  return hints


def detect_modality(state_dict: Mapping[str, Any]) -> str:
  """Which data2vec v1 layout the key names are: "audio", "image" or "text".

  Raises:
    ConversionError (a ValueError): for a data2vec 2.0 checkpoint, HF names, or keys that match
      no modality or several.
  """
  keys = list(state_dict)
  if any("modality_encoders." in k for k in keys):
    raise common.ConversionError(f"Not a data2vec v1 checkpoint:\n  {_V2_HINT}")
  found = [m for m, markers in _MARKERS.items() if any(k.startswith(markers) for k in keys)]
  if len(found) == 1:
    return found[0]
  what = f"keys of several modalities ({', '.join(found)})" if found else "no known key names"
  sample = ", ".join(sorted(keys)[:8]) + (", ..." if len(keys) > 8 else "")
  lines = [f"{what}; first keys: {sample}", *_hints(keys)]
  raise common.ConversionError(
    "Cannot tell the modality of this data2vec v1 state dict:\n  " + "\n  ".join(lines)
  )


# ----------------------------------------------------------------------------- renaming


def _match(rules, name):
  """The HF name (template expanded) of the first rule matching `name`, or None."""
  for pattern, target in rules:
    m = pattern.fullmatch(name)
    if m is not None:
      return m.expand(target)
  return None


def _drop_reason(drops, name):
  return next((reason for pattern, reason in drops if pattern.fullmatch(name)), None)


def _put(out: dict, hf_name: str, value) -> None:
  """Stores `value` under `hf_name`; a fused q/k/v weight [3D, D] becomes three [D, D] thirds."""
  value = np.asarray(value)
  if "{part}" not in hf_name:
    out[hf_name] = value
    return
  for part, third in zip(("query", "key", "value"), np.split(value, 3, axis=0), strict=True):
    out[hf_name.replace("{part}", part)] = third


@dataclasses.dataclass
class _Renamed:
  base: dict = dataclasses.field(default_factory=dict)  # HF base-model name -> array
  heads: dict = dataclasses.field(default_factory=dict)  # HF task-head name -> array
  dropped: list = dataclasses.field(default_factory=list)  # "key: reason"
  unknown: list = dataclasses.field(default_factory=list)  # fairseq keys


def _upgrade_text_name(name: str) -> str:
  """Old data2vec_text / RoBERTa names -> current ones (fairseq's `upgrade_state_dict_named`)."""
  if name.startswith("decoder."):
    name = "encoder." + name[len("decoder.") :]
  return name.replace(".emb_layer_norm.", ".layernorm_embedding.")


def _base_prefix(modality: str, state_dict: Mapping[str, Any]) -> str:
  """The fairseq prefix of the base model: set in task models that nest it (audio CTC)."""
  prefix = _LAYOUTS[modality].base_prefix
  return prefix if prefix and any(k.startswith(prefix) for k in state_dict) else ""


def _rename(modality: str, state_dict: Mapping[str, Any]) -> _Renamed:
  """Sorts every key of the model dict (EMA excluded) into base, heads, dropped or unknown."""
  layout, out = _LAYOUTS[modality], _Renamed()
  base_prefix = _base_prefix(modality, state_dict)
  for key, value in state_dict.items():
    name = _upgrade_text_name(key) if modality == "text" else key
    in_base = name.startswith(base_prefix)
    relative = name[len(base_prefix) :] if in_base else name
    reason = _drop_reason(layout.drops, name) or (in_base and _drop_reason(layout.drops, relative))
    if reason:
      out.dropped.append(f"{key}: {reason}")
    elif (head := _match(layout.heads, name)) is not None:
      _put(out.heads, head, value)
    elif in_base and (base := _match(layout.base, relative)) is not None:
      _put(out.base, base, value)
    else:
      out.unknown.append(key)
  return out


def _ema_model_names(modality: str, ema: Mapping[str, Any]) -> dict[str, str]:
  """EMA key -> its name in the model dict.

  Audio EMAs the transformer encoder (`ema_transformer_only`, the released setting: names
  relative to `encoder.`) or the whole model (names as in the model dict, so some start with
  `encoder.`); text EMAs the sentence encoder.
  """
  if modality == "text":
    return {k: "encoder.sentence_encoder." + k for k in ema}
  whole_model = any(k.startswith(("encoder.", "feature_extractor.")) for k in ema)
  return {k: k if whole_model else "encoder." + k for k in ema}


def _rename_ema(modality: str, ema: Mapping[str, Any]) -> tuple[dict, list, list]:
  """(teacher under HF base-model names, dropped "key: reason", unknown keys) of an EMA dict."""
  layout = _LAYOUTS[modality]
  teacher, dropped, unknown = {}, [], []
  for key, name in _ema_model_names(modality, ema).items():
    shown = f"{layout.ema_key}.{key}"
    reason = _drop_reason(_EMA_DROPS, key) or _drop_reason(layout.drops, name)
    hf_name = _match(layout.base, name) if reason is None else None
    if reason is not None:
      dropped.append(f"{shown}: {reason}")
    elif hf_name is None:
      unknown.append(shown)
    else:
      _put(teacher, hf_name, ema[key])
  return teacher, dropped, unknown


# ----------------------------------------------------------------------------- configs


def _shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
  """The shape of `state_dict[key]` (HF name); a missing key is a ConversionError."""
  if key not in state_dict:
    raise common.ConversionError(f"the checkpoint lacks what HF calls {key!r}")
  return tuple(np.shape(state_dict[key]))


class _ConvLayers(ast.NodeVisitor):
  """Evaluates fairseq's `conv_feature_layers` string (lists, tuples, ints, + and *) safely."""

  def visit_Expression(self, node):
    return self.visit(node.body)

  def visit_List(self, node):
    return [self.visit(e) for e in node.elts]

  def visit_Tuple(self, node):
    return tuple(self.visit(e) for e in node.elts)

  def visit_Constant(self, node):
    if not isinstance(node.value, int | float):
      raise ValueError(f"unexpected constant {node.value!r}")
    return node.value

  def visit_BinOp(self, node):
    left, right = self.visit(node.left), self.visit(node.right)
    if isinstance(node.op, ast.Add):
      return left + right
    if isinstance(node.op, ast.Mult):
      return left * right
    raise ValueError(f"unexpected operator {type(node.op).__name__}")

  def generic_visit(self, node):
    raise ValueError(f"unexpected syntax {type(node).__name__}")


def _conv_strides(cfg: Mapping[str, Any], kernels: tuple[int, ...]) -> tuple[int, ...]:
  """The CNN strides: from `conv_feature_layers` [(dim, kernel, stride), ...], else the released
  ones (strides are not stored in the weights)."""
  spec = fs.lookup(cfg, "conv_feature_layers")
  if spec is not None:
    layers = _ConvLayers().visit(ast.parse(spec, mode="eval"))
    if tuple(k for _, k, _ in layers) != kernels:
      raise common.ConversionError(
        f"conv_feature_layers {spec!r} does not match the stored conv kernels {kernels}"
      )
    return tuple(s for _, _, s in layers)
  if kernels != _RELEASED_CONV_KERNELS:
    raise common.ConversionError(
      f"conv kernels {kernels} are not the released ones and the strides are not stored in the "
      "weights: pass the checkpoint's model config (with conv_feature_layers) as cfg"
    )
  return _RELEASED_CONV_STRIDES


def _audio_config(base: Mapping[str, Any], heads: Mapping[str, Any], cfg: dict, task: str) -> dict:
  """Data2VecAudioConfig fields for the renamed `base` (+ `heads`), as HF's conversion sets them.

  Sizes come from the shapes; heads, strides, dropouts and masking from the config (for a CTC
  model, the fine-tuning config overrides the encoder's, as fairseq's `Wav2VecEncoder` does).
  """
  encoder_cfg = fs.encoder_cfg(cfg)
  fine_tuning_cfg = cfg if task == "ctc" else {}
  conv_layers = fs.count_indices(base, r"feature_extractor\.conv_layers\.(\d+)\.conv\.weight")
  conv_shapes = [
    _shape(base, f"feature_extractor.conv_layers.{j}.conv.weight") for j in range(conv_layers)
  ]
  kernels = tuple(s[2] for s in conv_shapes)
  dim = _shape(base, "feature_projection.projection.weight")[0]
  pos_layers = fs.count_indices(base, r"encoder\.pos_conv_embed\.layers\.(\d+)\.conv\.weight")
  pos_shape = _shape(base, "encoder.pos_conv_embed.layers.0.conv.weight")  # [D, D/groups, k]

  def setting(hf_name, *fairseq_names):
    value = fs.lookup(fine_tuning_cfg, *fairseq_names)
    value = fs.lookup(encoder_cfg, *fairseq_names) if value is None else value
    return _HF_AUDIO_DEFAULTS[hf_name] if value is None else value

  config = dict(
    model_type="data2vec-audio",
    hidden_size=dim,
    num_hidden_layers=fs.count_indices(base, r"encoder\.layers\.(\d+)\.attention\.q_proj\.weight"),
    num_attention_heads=fs.num_heads(encoder_cfg, dim, "encoder_attention_heads"),
    intermediate_size=_shape(base, "encoder.layers.0.feed_forward.intermediate_dense.weight")[0],
    hidden_act="gelu",
    feat_extract_activation="gelu",
    layer_norm_eps=1e-5,  # PyTorch's default, fairseq's LayerNorms
    do_stable_layer_norm=bool(fs.lookup(encoder_cfg, "layer_norm_first", default=False)),
    conv_dim=[s[0] for s in conv_shapes],
    conv_kernel=list(kernels),
    conv_stride=list(_conv_strides(encoder_cfg, kernels)),
    conv_bias="feature_extractor.conv_layers.0.conv.bias" in base,
    num_conv_pos_embeddings=pos_layers,  # the NUMBER of pos-conv layers (spec §4)
    conv_pos_kernel_size=pos_shape[2],
    num_conv_pos_embedding_groups=dim // pos_shape[1],
    hidden_dropout=setting("hidden_dropout", "dropout"),
    attention_dropout=setting("attention_dropout", "attention_dropout"),
    activation_dropout=setting("activation_dropout", "activation_dropout"),
    feat_proj_dropout=setting("feat_proj_dropout", "dropout_input"),
    layerdrop=setting("layerdrop", "layerdrop", "encoder_layerdrop"),
    final_dropout=setting("final_dropout", "final_dropout"),
  )
  # HF's masking fields are fine-tuning SpecAugment: a CTC model's own, else HF's defaults.
  masking = dict(
    mask_time_prob=("mask_prob",),
    mask_time_length=("mask_length",),
    mask_feature_prob=("mask_channel_prob",),
    mask_feature_length=("mask_channel_length",),
  )
  for hf_name, fairseq_names in masking.items():
    config[hf_name] = fs.lookup(
      fine_tuning_cfg, *fairseq_names, default=_HF_AUDIO_DEFAULTS[hf_name]
    )
  if task == "ctc":
    config["vocab_size"] = _shape(heads, "lm_head.weight")[0]
  return config


def _text_config(base: Mapping[str, Any], heads: Mapping[str, Any], cfg: dict, task: str) -> dict:
  """Data2VecTextConfig fields, as HF's conversion sets them (spec §4)."""
  vocab, dim = _shape(base, "embeddings.word_embeddings.weight")
  config = dict(
    model_type="data2vec-text",
    vocab_size=vocab,
    hidden_size=dim,
    num_hidden_layers=fs.count_indices(
      base, r"encoder\.layer\.(\d+)\.attention\.self\.query\.weight"
    ),
    num_attention_heads=fs.num_heads(
      cfg, dim, "transformer.encoder.attention_heads", "encoder_attention_heads"
    ),
    intermediate_size=_shape(base, "encoder.layer.0.intermediate.dense.weight")[0],
    hidden_act="gelu",
    max_position_embeddings=_shape(base, "embeddings.position_embeddings.weight")[0],  # 514
    type_vocab_size=1,
    layer_norm_eps=1e-5,  # PyTorch's default, fairseq's LayerNorms
    pad_token_id=1,  # fairseq's dictionary: <s>=0, <pad>=1, </s>=2
    bos_token_id=0,
    eos_token_id=2,
    position_embedding_type="absolute",
    hidden_dropout_prob=fs.lookup(cfg, "transformer.dropout", "dropout", default=0.1),
    attention_probs_dropout_prob=fs.lookup(
      cfg, "transformer.attention_dropout", "attention_dropout", default=0.1
    ),
  )
  if task == "classify":
    inner, in_dim = _shape(heads, "classifier.dense.weight")
    if (inner, in_dim) != (dim, dim):
      raise common.ConversionError(
        f"classification head dense layer is {inner}x{in_dim}; HF's classifier is {dim}x{dim}"
      )
    config["num_labels"] = _shape(heads, "classifier.out_proj.weight")[0]
  return config


def _bias_table_side(rows: int) -> int:
  """The patch grid side of a relative position bias table of `rows` rows ((2s-1)² + 3)."""
  side = (math.isqrt(rows - 3) + 1) // 2
  if (2 * side - 1) ** 2 + 3 != rows:
    raise common.ConversionError(f"relative position bias table of {rows} rows fits no square grid")
  return side


def _vision_config(base: Mapping[str, Any], heads: Mapping[str, Any], cfg: dict, task: str) -> dict:
  """Data2VecVisionConfig fields, as HF's conversion sets them (spec §4): sizes and the number of
  heads from the shapes, the position-bias and pooling layout from which keys exist."""
  shared = "encoder.relative_position_bias.relative_position_bias_table"
  per_layer = (
    "encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table"
  )
  table = shared if shared in base else per_layer
  if table not in base:
    raise common.ConversionError(
      "no relative position bias table (rel_pos_bias.* or blocks.i.attn.*); absolute position "
      "embeddings are not a released data2vec layout"
    )
  rows, num_heads = _shape(base, table)
  dim, channels, patch, _ = _shape(base, "embeddings.patch_embeddings.projection.weight")
  # Only whether it is > 0 matters (lambda_1/lambda_2 exist); the weights overwrite the value.
  layer_scale = float(fs.lookup(cfg, "layer_scale_init_value", default=0.1))
  if "encoder.layer.0.lambda_1" not in base:
    layer_scale = 0.0
  config = dict(
    model_type="data2vec-vision",
    hidden_size=dim,
    num_hidden_layers=fs.count_indices(base, r"encoder\.layer\.(\d+)\.layernorm_before\.weight"),
    num_attention_heads=num_heads,
    intermediate_size=_shape(base, "encoder.layer.0.intermediate.dense.weight")[0],
    hidden_act="gelu",
    image_size=_bias_table_side(rows) * patch,
    patch_size=patch,
    num_channels=channels,
    layer_norm_eps=1e-6,  # BEiT's (HF's default is 1e-12)
    use_mask_token="embeddings.mask_token" in base,
    use_absolute_position_embeddings=False,
    use_shared_relative_position_bias=shared in base,
    use_relative_position_bias=per_layer in base,
    use_mean_pooling="pooler.layernorm.weight" in base,
    layer_scale_init_value=layer_scale,
    hidden_dropout_prob=float(fs.lookup(cfg, "drop", default=0.0)),
    attention_probs_dropout_prob=float(fs.lookup(cfg, "attn_drop_rate", default=0.0)),
    drop_path_rate=float(fs.lookup(cfg, "drop_path", default=0.1)),
  )
  if task == "classify":
    config["num_labels"] = _shape(heads, "classifier.weight")[0]
  return config


_CONFIGS = {"audio": _audio_config, "text": _text_config, "image": _vision_config}


# ----------------------------------------------------------------------------- public


def _raise_unknown(modality: str, unknown: list[str]) -> None:
  lines = [f"unknown keys ({len(unknown)}): " + ", ".join(sorted(unknown)), *_hints(unknown)]
  raise common.ConversionError(
    f"fairseq/BEiT data2vec v1 {modality} state dict does not match:\n  " + "\n  ".join(lines)
  )


def _finish_audio(renamed: _Renamed, config: dict, base_prefix: str) -> None:
  """HF creates `masked_spec_embed` only when a SpecAugment probability is positive."""
  if config["mask_time_prob"] <= 0 and config["mask_feature_prob"] <= 0:
    if renamed.base.pop("masked_spec_embed", None) is not None:
      renamed.dropped.append(
        f"{base_prefix}mask_emb: the HF config masks nothing (mask_time_prob = "
        "mask_feature_prob = 0), so HF has no masked_spec_embed"
      )


def _finish_text(renamed: _Renamed) -> None:
  """HF's token type embeddings, which fairseq lacks: one zero row (`type_vocab_size` 1)."""
  words = renamed.base["embeddings.word_embeddings.weight"]
  renamed.base["embeddings.token_type_embeddings.weight"] = np.zeros(
    (1, words.shape[1]), words.dtype
  )


def _check_one_text_head(state_dict: Mapping[str, Any]) -> None:
  names = sorted({k.split(".")[1] for k in state_dict if k.startswith("classification_heads.")})
  if len(names) > 1:
    raise common.ConversionError(
      f"{len(names)} classification heads ({', '.join(names)}); HF's model has one classifier: "
      "keep the one to convert and drop the others' keys"
    )


def to_hf(state_dict: Mapping[str, Any], cfg: Mapping[str, Any] | None = None) -> HFNamed:
  """A data2vec v1 fairseq/BEiT `model` dict -> HF names and config (see the module docstring).

  Args:
    state_dict: the checkpoint's model dict (`ckpt["model"]`; `ckpt["module"]` for the DeepSpeed
      vision fine-tuned files), name -> array (numpy or anything `np.asarray` accepts); the EMA
      (`_ema` / `encoder._ema`) may be a nested name -> array mapping.
    cfg: the checkpoint's model config as a plain dict (`ckpt["cfg"]["model"]`, or
      `vars(ckpt["args"])`), or None to use the released models' values for what the shapes do
      not hold (attention heads, audio strides, dropouts).

  Returns:
    `HFNamed`; `state_dict` and `teacher` hold the input arrays (split or zero-filled where the
    module docstring says), not copies.

  Raises:
    ConversionError: for keys that are neither mapped nor droppable (all of them listed, with a
      hint for data2vec 2.0 or HF names), a modality that cannot be told, several text
      classification heads, or sizes that neither the shapes nor `cfg` determine.
  """
  modality = detect_modality(state_dict)
  cfg = fs.model_cfg(cfg)
  layout = _LAYOUTS[modality]
  model_dict, ema = fs.split_ema(state_dict, layout.ema_key)
  renamed = _rename(modality, model_dict)
  teacher, ema_unknown = None, []
  if ema is not None:
    teacher, ema_dropped, ema_unknown = _rename_ema(modality, ema)
    renamed.dropped += ema_dropped
  if renamed.unknown or ema_unknown:
    _raise_unknown(modality, renamed.unknown + ema_unknown)
  if modality == "text":
    _check_one_text_head(model_dict)

  has_task_model = renamed.heads or _base_prefix(modality, model_dict)
  task = layout.task_of_head if has_task_model else "pretrain"
  config = _CONFIGS[modality](renamed.base, renamed.heads, cfg, task)
  if modality == "audio":
    _finish_audio(renamed, config, _base_prefix(modality, model_dict))
  if modality == "text":
    _finish_text(renamed)

  prefix = "" if task == "pretrain" else _PREFIXES[modality]
  hf_state = {prefix + k: v for k, v in renamed.base.items()} | renamed.heads
  return HFNamed(
    modality=modality,
    task=task,
    hf_config=config,
    state_dict=hf_state,
    prefix=prefix,
    teacher=teacher or None,
    dropped=tuple(renamed.dropped),
  )
