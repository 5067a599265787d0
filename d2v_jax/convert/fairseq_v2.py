"""Released data2vec 2.0 checkpoints (fairseq `data2vec_multi`) -> our data2vec 2.0 models.

Spec §2 (the model), §4 (the names). HF transformers has no data2vec 2.0, so unlike `fairseq_v1`
this module maps fairseq's names straight onto our tree (`models/data2vec2.py`), with the
`common.KeyTable` machinery of the HF converters. Pure numpy: torch is never imported.

Layouts, read from fairseq's `examples/data2vec/models/{data2vec2.py, modalities/*.py,
mae_image_classification.py, data2vec_text_classification.py}` and `wav2vec2_asr.py`; checked
against synthetic state dicts with those names and shapes, not against the released files:

- pretrained (`data2vec_multi`, task "pretrain"): `base_libri.pt`, `large_vox.pt`,
  `{base,large,huge}_imagenet.pt`, `nlp_base.pt`. Keys `modality_encoders.<AUDIO|IMAGE|TEXT>.*`
  (local encoder, feature projection, positions, extra tokens, ALiBi scales, context encoder,
  decoder) and `blocks.<i>.*`, plus the EMA teacher `_ema`;
- speech CTC (`wav2vec_ctc` over data2vec_multi, "ctc"): `base_libri_960h.pt`, `large_vox_960h.pt`:
  the encoder under `w2v_encoder.w2v_model.` (no decoder), the letters under `w2v_encoder.proj`;
- image classification (`mae_image_classification`, "classify"): `{base,large,huge}_imagenet_ft.pt`:
  the encoder under `model.`, mean pooling, `fc_norm`, `head`;
- text classification (`data2vec_text_classification`, "classify" / "regress"): none released;
  the encoder under `model.`, RoBERTa's `classification_heads.<name>.{dense,out_proj}`.

Mapping (i: main block, j: prenet block, which come first in our `encoder/blocks/layer_XX`):
  `blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}` -> AltBlock `attention_norm`,
  `attention/qkv` ([3D, D] -> [D, 3, H, Dh]), `attention/out`, `ffn_norm`, `fc1`, `fc2`;
  `context_encoder.norm` -> `encoder/blocks/input_norm`; `extra_tokens` -> `encoder/extra_tokens`;
  `alibi_scale` -> `encoder/alibi_scale`; `relative_positional_encoder.<1..n>.0` ->
  `encoder/relative_positions/conv_<0..n-1>`; the speech CNN and `project_features.{1,2}` as in
  data2vec 1.0; `local_encoder.proj` (image patches); the text embeddings; `decoder.blocks.k.0` ->
  `decoder/conv_k`, `decoder.proj` (or `.proj.{0,2}`, text's two layers) -> `decoder/proj(_0)`.

Not carried over, and reported: the image's `fixed_positional_encoder.positions`, a frozen sin-cos
table that our model computes (checked equal to ours first). The EMA teacher (`_ema`) holds what
each modality EMAs (spec §2.3): speech the context encoder and blocks, images also the patch
embedding and CLS token; with `ema_encoder_only=True` (text's recipe) only the blocks, `<i>.*`.
Anything else is an error listing every key that does not map.
"""

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from d2v_jax.convert import common, hf
from d2v_jax.convert import fairseq_common as fs
from d2v_jax.models import data2vec, data2vec2, image
from d2v_jax.models import finetune as finetune_models

MODALITIES = {"AUDIO": "audio", "IMAGE": "image", "TEXT": "text"}

# (task, prefix of the encoder's keys, a key that marks the layout), tried in order.
_TASK_LAYOUTS = (
  ("ctc", "w2v_encoder.w2v_model.", "w2v_encoder.proj.weight"),
  ("classify", "model.", "head.weight"),  # images
  ("classify", "model.", "classification_heads."),  # text (regress with one output)
  ("pretrain", "", ""),
)

# What a config without these values gets: fairseq's defaults and the released recipes (§2.3).
_NORM_EPS = {"audio": 1e-5, "image": 1e-6, "text": 1e-5}
_DROPOUT = {"audio": 0.1, "image": 0.0, "text": 0.1}
_DECODER_RESIDUAL = {"audio": True, "image": True, "text": False}
_DECODER_INPUT_DROPOUT = {"audio": 0.1, "image": 0.0, "text": 0.1}
_TEXT_PAD_ID = 1  # fairseq's dictionary: <s>=0, <pad>=1
_SPEECH_CNN_KERNELS = (10, 3, 3, 3, 3, 2, 2)  # our AudioFrontend's fixed CNN (spec §1.1)
POSITIONS = "fixed_positional_encoder.positions"


def is_v2(state_dict: Mapping[str, Any]) -> bool:
  """Whether a fairseq model dict is data2vec 2.0's (`modality_encoders.*` keys)."""
  return any("modality_encoders." in k for k in state_dict)


def _modality(state_dict: Mapping[str, Any]) -> tuple[str, str]:
  """(our modality, fairseq's name for it) of the one modality encoder in the checkpoint."""
  found = sorted(
    {m.group(1) for k in state_dict if (m := re.search(r"modality_encoders\.(\w+?)\.", k))}
  )
  if len(found) != 1 or found[0] not in MODALITIES:
    raise common.ConversionError(
      f"expected one data2vec 2.0 modality encoder ({', '.join(MODALITIES)}), found {found}: "
      "our models hold one modality each; drop the other encoders' keys"
    )
  return MODALITIES[found[0]], found[0]


def _layout(state_dict: Mapping[str, Any]) -> tuple[str, str]:
  """(task, prefix of the encoder's keys)."""
  for task, prefix, marker in _TASK_LAYOUTS:
    if not marker or any(k.startswith(marker) for k in state_dict):
      return task, prefix
  raise AssertionError("unreachable: the pretraining layout has no marker")


def _encoder_cfg(cfg: Mapping[str, Any]) -> dict:
  """The data2vec_multi config: a fine-tuned model's `w2v_args` / `pretrained_model_args`."""
  for wrapper in ("w2v_args", "pretrained_model_args"):  # whole fairseq configs: their `model`
    inner = fs.as_dict(cfg.get(wrapper))
    if inner:
      return fs.as_dict(inner["model"]) if isinstance(inner.get("model"), Mapping) else inner
  return cfg


class _Keys:
  """The encoder's keys (prefix removed) with the lookups sizes are read with."""

  def __init__(self, state_dict: Mapping[str, Any], prefix: str, mod_name: str):
    self.arrays = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    self.mod = f"modality_encoders.{mod_name}."

  def shape(self, key: str) -> tuple[int, ...]:
    if key not in self.arrays:
      raise common.ConversionError(f"the checkpoint lacks {key!r}")
    return tuple(np.shape(self.arrays[key]))

  def count(self, pattern: str) -> int:
    return fs.count_indices(self.arrays, pattern)


def _model_config(modality: str, keys: _Keys, cfg: dict, task: str) -> ml_collections.ConfigDict:
  """Our `config.model` fields that the checkpoint determines: sizes (from the shapes), the
  LayerNorm eps and heads (from `cfg`, else the released values), the decoder's structure."""
  m = keys.mod
  num_main = keys.count(r"blocks\.(\d+)\.attn\.qkv\.weight")
  num_prenet = keys.count(re.escape(m) + r"context_encoder\.blocks\.(\d+)\.attn\.qkv\.weight")
  first = "blocks.0." if num_main else f"{m}context_encoder.blocks.0."
  mlp_dim, dim = keys.shape(first + "mlp.fc1.weight")
  heads_cfg = dict(cfg)
  if modality == "audio" and fs.lookup(cfg, "num_heads") is None:  # one ALiBi scale per head
    heads_cfg["num_heads"] = keys.shape(m + "alibi_scale")[2]
  fields = dict(
    num_layers=num_prenet + num_main,
    dim=dim,
    num_heads=fs.num_heads(heads_cfg, dim, "num_heads"),
    mlp_dim=mlp_dim,
    prenet_depth=num_prenet,
    norm_eps=float(fs.lookup(cfg, "norm_eps", default=_NORM_EPS[modality])),
    mask_noise_std=float(fs.lookup(cfg, f"modalities.{modality}.mask_noise_std", default=0.01)),
    # Training fields: the checkpoint's (fine-tuning configs keep their own).
    dropout=float(fs.lookup(cfg, "encoder_dropout", default=_DROPOUT[modality])),
    attention_dropout=float(fs.lookup(cfg, "attention_dropout", default=_DROPOUT[modality])),
    activation_dropout=float(fs.lookup(cfg, "activation_dropout", default=0.0)),
    layerdrop=float(fs.lookup(cfg, "layerdrop", default=0.0)),
    dtype="float32",
    **_FRONTEND_SIZES[modality](keys, cfg),
  )
  fields["variant"] = common.variant_for(modality, fields)
  if task == "pretrain":
    fields["decoder"] = _decoder_config(modality, keys, cfg, dim)
  return ml_collections.ConfigDict(fields)


def _audio_sizes(keys: _Keys, cfg: dict) -> dict:
  m = keys.mod
  kernels = tuple(
    keys.shape(f"{m}local_encoder.conv_layers.{j}.0.weight")[2]
    for j in range(keys.count(re.escape(m) + r"local_encoder\.conv_layers\.(\d+)\.0\.weight"))
  )
  if kernels != _SPEECH_CNN_KERNELS:
    raise common.ConversionError(
      f"the speech CNN has kernels {kernels}; our front end is data2vec's {_SPEECH_CNN_KERNELS}"
    )
  depth = keys.count(re.escape(m) + r"relative_positional_encoder\.(\d+)\.0\.weight")
  dim, per_group, kernel = keys.shape(f"{m}relative_positional_encoder.1.0.weight")
  return dict(
    conv_dim=keys.shape(f"{m}local_encoder.conv_layers.0.0.weight")[0],
    pos_conv_depth=depth,
    pos_conv_kernel=kernel,
    pos_conv_groups=dim // per_group,
  )


def _image_sizes(keys: _Keys, cfg: dict) -> dict:
  dim, channels, patch, _ = keys.shape(f"{keys.mod}local_encoder.proj.weight")
  if channels != 3:
    raise common.ConversionError(f"the patch embedding reads {channels} channels; ours reads 3")
  if keys.mod + POSITIONS not in keys.arrays:
    raise common.ConversionError(
      "the image encoder has no fixed sin-cos positions (`fixed_positions: false`); ours needs them"
    )
  side = math.isqrt(keys.shape(keys.mod + POSITIONS)[1])
  return dict(image_size=side * patch, patch_size=patch)


def _text_sizes(keys: _Keys, cfg: dict) -> dict:
  vocab_size, _ = keys.shape(f"{keys.mod}local_encoder.embed_tokens.weight")
  rows, _ = keys.shape(f"{keys.mod}local_encoder.embed_positions.weight")
  # fairseq's learned positions reserve rows 0..pad (RoBERTa: 512 positions in 514 rows).
  return dict(vocab_size=vocab_size, max_positions=rows - _TEXT_PAD_ID - 1, pad_id=_TEXT_PAD_ID)


_FRONTEND_SIZES = {"audio": _audio_sizes, "image": _image_sizes, "text": _text_sizes}


def _decoder_config(modality: str, keys: _Keys, cfg: dict, dim: int) -> dict:
  """`config.model.decoder` read off the decoder's shapes (and `cfg` for what they lack)."""
  d = f"{keys.mod}decoder."
  decoder_dim, per_group, *kernel = keys.shape(d + "blocks.0.0.weight")
  projection_layers = 1 + keys.count(re.escape(d) + r"proj\.(\d+)\.weight") // 2
  if projection_layers > 1:
    ratio = keys.shape(d + "proj.0.weight")[0] / decoder_dim
    if ratio != 2.0:
      raise common.ConversionError(f"decoder projection ratio {ratio}; ours is 2")
  decoder_cfg = fs.lookup(cfg, f"modalities.{modality}.decoder", default={})
  return dict(
    dim=decoder_dim,
    kernel=kernel[0],
    groups=dim // per_group,
    layers=keys.count(re.escape(d) + r"blocks\.(\d+)\.0\.weight"),
    residual=bool(fs.lookup(decoder_cfg, "decoder_residual", default=_DECODER_RESIDUAL[modality])),
    projection_layers=projection_layers,
    input_dropout=float(
      fs.lookup(decoder_cfg, "input_dropout", default=_DECODER_INPUT_DROPOUT[modality])
    ),
  )


# ----------------------------------------------------------------------------- key tables


def _conv_kernel(ndim: int):
  """torch Conv{1,2}d weight [out, in/g, *k] <-> ours [*k, in/g, out]."""
  order = (*range(2, 2 + ndim), 1, 0)
  inverse = tuple(int(i) for i in np.argsort(order))
  return lambda w: w.transpose(order), lambda w: w.transpose(inverse)


def _add_block(keys: common.KeyTable, name: str, path: str, dim: int, heads: int, mlp: int):
  """One AltBlock: fused qkv [3D, D] -> [D, 3, H, Dh], the rest as in data2vec 1.0."""
  head_dim = dim // heads
  keys.add(
    f"{name}.attn.qkv.weight",
    f"{path}/attention/qkv/kernel",
    (3 * dim, dim),
    lambda w: w.T.reshape(dim, 3, heads, head_dim),
    lambda w: w.reshape(dim, 3 * dim).T,
  )
  keys.add(
    f"{name}.attn.qkv.bias",
    f"{path}/attention/qkv/bias",
    (3 * dim,),
    lambda b: b.reshape(3, heads, head_dim),
    lambda b: b.reshape(3 * dim),
  )
  keys.add_heads_out(f"{name}.attn.proj", f"{path}/attention/out", dim, heads)
  keys.add_norm(f"{name}.norm1", f"{path}/attention_norm", dim)
  keys.add_linear(f"{name}.mlp.fc1", f"{path}/fc1", mlp, dim)
  keys.add_linear(f"{name}.mlp.fc2", f"{path}/fc2", dim, mlp)
  keys.add_norm(f"{name}.norm2", f"{path}/ffn_norm", dim)


def _add_frontend(keys: common.KeyTable, modality: str, m: str, sizes: dict):
  dim = sizes["dim"]
  if modality == "audio":
    to_ours, to_fairseq = _conv_kernel(1)
    fe, conv_dim = "frontend/feature_extractor", sizes["conv_dim"]
    for j, k in enumerate(_SPEECH_CNN_KERNELS):
      name, in_dim = f"{m}local_encoder.conv_layers.{j}", 1 if j == 0 else conv_dim
      keys.add(
        f"{name}.0.weight", f"{fe}/conv_{j}/kernel", (conv_dim, in_dim, k), to_ours, to_fairseq
      )
      keys.add_norm(f"{name}.2.1", f"{fe}/norm_{j}", conv_dim)
    keys.add_norm(f"{m}project_features.1", "frontend/feature_norm", conv_dim)
    keys.add_linear(f"{m}project_features.2", "frontend/projection", dim, conv_dim)
  elif modality == "image":
    to_ours, to_fairseq = _conv_kernel(2)
    patch = sizes["patch_size"]
    proj = "frontend/patch_embed/projection"
    keys.add(
      f"{m}local_encoder.proj.weight", f"{proj}/kernel", (dim, 3, patch, patch), to_ours, to_fairseq
    )
    keys.add(f"{m}local_encoder.proj.bias", f"{proj}/bias", (dim,))
  else:
    rows = sizes["max_positions"] + sizes["pad_id"] + 1
    embed = f"{m}local_encoder"
    keys.add(
      f"{embed}.embed_tokens.weight", "frontend/token_embed/embedding", (sizes["vocab_size"], dim)
    )
    keys.add(f"{embed}.embed_positions.weight", "frontend/position_embed/embedding", (rows, dim))
    keys.add_norm(f"{embed}.layernorm_embedding", "frontend/embed_norm", dim)


def _add_context_encoder(keys: common.KeyTable, modality: str, m: str, sizes: dict):
  """Relative positions and ALiBi scales (speech), the CLS token (images), the context encoder's
  LayerNorm and every block, prenet first."""
  dim, heads, mlp, prenet = (
    sizes["dim"],
    sizes["num_heads"],
    sizes["mlp_dim"],
    sizes["prenet_depth"],
  )
  if modality == "audio":
    to_ours, to_fairseq = _conv_kernel(1)
    k, groups = sizes["pos_conv_kernel"], sizes["pos_conv_groups"]
    for j in range(sizes["pos_conv_depth"]):
      name, path = (
        f"{m}relative_positional_encoder.{j + 1}.0",
        f"encoder/relative_positions/conv_{j}",
      )
      keys.add(f"{name}.weight", f"{path}/kernel", (dim, dim // groups, k), to_ours, to_fairseq)
      keys.add(f"{name}.bias", f"{path}/bias", (dim,))
    keys.add(f"{m}alibi_scale", "encoder/alibi_scale/alibi_scale", (1, 1, heads, 1, 1))
  if modality == "image":
    keys.add(
      f"{m}extra_tokens",
      "encoder/extra_tokens",
      (1, 1, dim),
      lambda w: w.reshape(1, dim),
      lambda w: w.reshape(1, 1, dim),
    )
  if modality != "text" or prenet:  # fairseq's text context encoder has no norm without prenet
    keys.add_norm(f"{m}context_encoder.norm", "encoder/blocks/input_norm", dim)
  for j in range(prenet):
    _add_block(
      keys, f"{m}context_encoder.blocks.{j}", f"encoder/blocks/layer_{j:02d}", dim, heads, mlp
    )
  for i in range(sizes["num_layers"] - prenet):
    _add_block(keys, f"blocks.{i}", f"encoder/blocks/layer_{prenet + i:02d}", dim, heads, mlp)


def _add_decoder(keys: common.KeyTable, modality: str, m: str, sizes: dict, decoder: dict):
  """The conv decoder and its projection back to the model's width."""
  dim, d = sizes["dim"], f"{m}decoder"
  to_ours, to_fairseq = _conv_kernel(2 if modality == "image" else 1)
  k, width = decoder["kernel"], decoder["dim"]
  for j in range(decoder["layers"]):
    in_dim = dim if j == 0 else width
    shape = (width, in_dim // decoder["groups"]) + (k,) * (2 if modality == "image" else 1)
    keys.add(f"{d}.blocks.{j}.0.weight", f"decoder/conv_{j}/kernel", shape, to_ours, to_fairseq)
    keys.add(f"{d}.blocks.{j}.0.bias", f"decoder/conv_{j}/bias", (width,))
  if decoder["projection_layers"] == 1:
    keys.add_linear(f"{d}.proj", "decoder/proj", dim, width)
  else:  # Linear(d -> 2d) -> GELU -> Linear(2d -> D): torch indices 0 and 2
    keys.add_linear(f"{d}.proj.0", "decoder/proj_0", 2 * width, width)
    keys.add_linear(f"{d}.proj.2", "decoder/proj", dim, 2 * width)


def key_table(modality: str, model_cfg: Mapping[str, Any], mod_name: str) -> common.KeyTable:
  """fairseq name (without a task model's prefix) -> our path, for every parameter of the
  encoder, and of the decoder if `model_cfg` has one (a pretraining model's)."""
  sizes = dict(model_cfg)
  m = f"modality_encoders.{mod_name}."
  keys = common.KeyTable()
  _add_frontend(keys, modality, m, sizes)
  _add_context_encoder(keys, modality, m, sizes)
  if "decoder" in sizes:
    _add_decoder(keys, modality, m, sizes, sizes["decoder"])
  return keys


# ----------------------------------------------------------------------------- heads


def _head(task: str, modality: str, state_dict: Mapping[str, Any], cfg: dict, dim: int):
  """(our head config, its key table with full names) of a fine-tuned model; (None, {})."""
  keys = common.KeyTable()
  if task == "pretrain":
    return None, keys
  if modality == "audio":
    vocab, _ = np.shape(state_dict["w2v_encoder.proj.weight"])
    keys.add_linear("w2v_encoder.proj", "head/proj", vocab, dim)
    dropout = float(fs.lookup(cfg, "final_dropout", default=0.0))
    return dict(task="ctc", num_outputs=int(vocab), dropout=dropout), keys
  if modality == "image":
    mode = str(fs.lookup(cfg, "prediction_mode", default="MEAN_POOLING"))
    if not mode.endswith("MEAN_POOLING") or "fc_norm.weight" not in state_dict:
      raise common.ConversionError(
        f"image classifier with prediction_mode {mode} and fc_norm "
        f"{'present' if 'fc_norm.weight' in state_dict else 'absent'}: ours mean-pools the patches "
        "and normalises (MEAN_POOLING with use_fc_norm)"
      )
    classes, _ = np.shape(state_dict["head.weight"])
    keys.add_norm("fc_norm", "head/norm", dim)
    keys.add_linear("head", "head/proj", classes, dim)
    head = dict(
      task="classify", num_outputs=int(classes), dropout=0.0, layer_norm_eps=1e-6, init_scale=1.0
    )
    return head, keys
  names = sorted({k.split(".")[1] for k in state_dict if k.startswith("classification_heads.")})
  if len(names) != 1:
    raise common.ConversionError(
      f"{len(names)} classification heads ({', '.join(names)}); keep the one to convert"
    )
  h = f"classification_heads.{names[0]}"
  classes, _ = np.shape(state_dict[f"{h}.out_proj.weight"])
  keys.add_linear(f"{h}.dense", "head/dense", dim, dim)
  keys.add_linear(f"{h}.out_proj", "head/out", classes, dim)
  dropout = float(fs.lookup(cfg, "pooler_dropout", default=0.0))
  task = "regress" if classes == 1 else "classify"
  return dict(task=task, num_outputs=int(classes), dropout=dropout), keys


# ----------------------------------------------------------------------------- public


def _positions_problem(value, sizes: dict) -> list[str]:
  """[] if the stored fixed positions are our sin-cos table, else the problem."""
  ours = image.sincos_2d(sizes["dim"], sizes["image_size"] // sizes["patch_size"])
  diff = float(np.max(np.abs(np.asarray(value, np.float32).reshape(ours.shape) - ours)))
  if diff > 1e-4:
    return [f"{POSITIONS} differs from our 2-D sin-cos table by {diff:.3g}"]
  return []


def _upgrade(arrays: dict) -> dict:
  """fairseq's `upgrade_state_dict_named`: 4-D ALiBi scales of older checkpoints gain an axis."""
  return {
    k: np.asarray(v)[None] if k.endswith("alibi_scale") and np.ndim(v) == 4 else v
    for k, v in arrays.items()
  }


def _teacher_leaves(modality: str, ema: Mapping[str, Any], table: common.KeyTable, m: str, sizes):
  """Our flat teacher leaves {path: array} from fairseq's `_ema` dict."""
  ema = _upgrade(dict(ema))
  # `ema_encoder_only=True`: the block list alone (`<i>.*`); the rest is the student's.
  ema = {("blocks." + k if k[:1].isdigit() else k): v for k, v in ema.items()}
  problems = _positions_problem(ema[m + POSITIONS], sizes) if m + POSITIONS in ema else []
  if problems:
    raise common.ConversionError("EMA teacher: " + problems[0])
  # The teacher holds only what its modality EMAs (spec §2.3); our teacher copies the rest.
  given = common.check_state_dict(
    ema,
    table.shapes(),
    what="data2vec 2.0 EMA teacher (`_ema`)",
    unchecked=(m + POSITIONS,),  # checked above; our model computes them
    missing_ok=True,
  )
  return common.convert(given, table)


def from_fairseq(
  state_dict: Mapping[str, Any], cfg: Mapping[str, Any] | None = None, *, seed: int = 0
) -> hf.Imported:
  """A data2vec 2.0 fairseq `model` dict (+ its model config) -> our model (`version=2`).

  Args:
    state_dict: `ckpt["model"]`, name -> array; the EMA `_ema` may be a nested dict.
    cfg: `ckpt["cfg"]["model"]` as a plain dict (a fine-tuned model's holds the encoder's under
      `w2v_args` / `pretrained_model_args`), or None for the released models' values where the
      shapes do not tell (attention heads, LayerNorm eps, the decoder's residual and dropout).
    seed: initialises what the checkpoint lacks (a fine-tuning model's speech mask embedding).

  Returns:
    `hf.Imported` with `version=2` and `teacher` (our teacher's leaves) when `_ema` is present.

  Raises:
    ConversionError: listing every unknown, missing or mis-shaped key; naming an unsupported
      layout (several modality encoders, another speech CNN, a classifier that is not ours).
  """
  fairseq_cfg = fs.model_cfg(cfg)
  model_dict, ema = fs.split_ema(dict(state_dict), "_ema")
  modality, mod_name = _modality(model_dict)
  task, prefix = _layout(model_dict)
  arrays = _upgrade(model_dict)  # every key, task-head ones included
  keys = _Keys(arrays, prefix, mod_name)
  model_cfg = _model_config(modality, keys, _encoder_cfg(fairseq_cfg), task)
  head_cfg, head_keys = _head(task, modality, model_dict, fairseq_cfg, model_cfg.dim)
  table = key_table(modality, model_cfg, mod_name)
  full = common.KeyTable({prefix + k: e for k, e in table.items()} | head_keys)
  positions = prefix + keys.mod + POSITIONS
  given = common.check_state_dict(
    arrays, full.shapes(), what=f"data2vec 2.0 {modality} checkpoint", unchecked=(positions,)
  )
  dropped = []
  if positions in arrays:
    problems = _positions_problem(arrays[positions], model_cfg)
    if problems:
      raise common.ConversionError(problems[0])
    dropped.append(f"{positions}: the fixed 2-D sin-cos positions, which our model computes")

  if head_cfg is None:
    model = data2vec2.build_model(modality, model_cfg)
  else:
    model = finetune_models.build_finetune_model(
      modality, model_cfg, ml_collections.ConfigDict(head_cfg), version=2
    )
  inputs = data2vec.example_inputs(modality, model_cfg)
  init_params = (
    common.init_task_params(model, inputs, seed)
    if head_cfg is not None
    else jax.eval_shape(lambda: model.init(jax.random.key(seed), *inputs))["params"]
  )
  params = common.params_tree(common.convert(given, full), init_params, from_init=("mask_emb",))
  teacher = None
  if ema is not None:
    teacher = _teacher_leaves(modality, ema, table, keys.mod, model_cfg)
    dropped.append("_ema: the EMA teacher (converted into the teacher)")
  return hf.Imported(
    modality,
    model_cfg,
    ml_collections.ConfigDict(head_cfg) if head_cfg else None,
    params,
    tuple(dropped),
    version=2,
    teacher=teacher,
  )
