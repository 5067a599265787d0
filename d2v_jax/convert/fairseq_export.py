"""Our runs in fairseq's layout (issue 24): HF has no 2.0 class, so a 2.0 run exports to the
`.pt` that fairseq's `Data2VecMultiModel` loads, and to safetensors; a 1.0 speech run exports
to HF and also to what fairseq's `Data2VecAudioModel` loads (`audio_v1_checkpoint`: the HF
names renamed back with `fairseq_v1`'s own rules turned around, the regression head, `_ema`).

`checkpoint_dict` is the inverse of `fairseq_v2.from_fairseq`: the student under fairseq's names
(`fairseq_v2.key_table` read backwards), the EMA teacher as `_ema` (the blocks alone, named
`<i>.*`, when the run's teacher copies everything else: fairseq's `ema_encoder_only=True`), and
`cfg` as plain types: the `data2vec_multi` model config that rebuilds these shapes (spec §2.1,
§2.3) with the run's recipe. `torch_pickle.save` writes it without torch.
"""

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from d2v_jax.convert import (
  common,
  fairseq_recipe,
  fairseq_v1,
  fairseq_v2,
  hf_audio,
  hf_image,
  hf_text,
)
from d2v_jax.models import data2vec, image

FAIRSEQ_MODALITY = {"audio": "AUDIO", "image": "IMAGE", "text": "TEXT"}


def _teacher_dict(table: common.KeyTable, teacher: Mapping[str, Any], copy_params) -> dict:
  """fairseq's `_ema` from our teacher: every table entry the teacher EMAs."""
  flat = traverse_util.flatten_dict(dict(teacher))
  blocks_only = tuple(copy_params) == fairseq_recipe.BLOCKS_ONLY
  ema = {}
  for name, entry in table.items():
    if entry.path not in flat:
      continue
    if blocks_only:  # the block list alone: `blocks.<i>.x` is `<i>.x`
      if not name.startswith("blocks."):
        continue
      name = name[len("blocks.") :]
    ema[name] = np.ascontiguousarray(entry.to_hf(np.asarray(flat[entry.path], np.float32)))
  return ema


def _norm_flags(kind: str, instance: str, layer: str) -> dict:
  return {instance: kind == "instance", layer: kind == "layer"}


def model_cfg(config) -> dict:
  """The `data2vec_multi` model config of a 2.0 run (plain types)."""
  modality, m = config.modality, config.model
  sizes = data2vec.model_sizes(modality, m)
  dim, prenet = sizes["dim"], m.get("prenet_depth", 0)
  d = m.decoder
  modality_cfg = {
    "type": FAIRSEQ_MODALITY[modality],
    "prenet_depth": prenet,
    "mask_prob": config.masking.ratio,
    "mask_prob_adjust": config.masking.get("adjust", 0.0),
    "mask_length": config.masking.get("block", 1),
    "inverse_mask": config.masking.get("inverse", False),
    "mask_noise_std": m.mask_noise_std,
    "num_alibi_heads": sizes["num_heads"],
    "model_depth": sizes["num_layers"] - prenet,
    "decoder": {
      "decoder_dim": d.dim,
      "decoder_groups": d.groups,
      "decoder_kernel": d.kernel,
      "decoder_layers": d.layers,
      "input_dropout": d.input_dropout,
      "decoder_residual": d.residual,
      "projection_layers": d.projection_layers,
      "projection_ratio": 2.0,
    },
  }
  if modality == "audio":
    c = sizes["conv_dim"]
    modality_cfg.update(
      feature_encoder_spec=f"[({c}, 10, 5)] + [({c}, 3, 2)] * 4 + [({c}, 2, 2)] * 2",
      # fairseq's kernel per layer is max(3, width // depth): width = kernel × depth inverts it.
      conv_pos_width=sizes["pos_conv_kernel"] * sizes["pos_conv_depth"],
      conv_pos_groups=sizes["pos_conv_groups"],
      conv_pos_depth=sizes["pos_conv_depth"],
      use_alibi_encoder=True,  # our speech encoder's learned per-head ALiBi scales
      learned_alibi_scale=True,
      learned_alibi_scale_per_head=True,
    )
  elif modality == "image":
    modality_cfg.update(
      input_size=sizes["image_size"],
      patch_size=sizes["patch_size"],
      in_chans=3,
      embed_dim=dim,  # the patch embedding's width (another one adds a projection)
      num_extra_tokens=1,
      ema_local_encoder="frontend" in config.ema.teacher_params,
    )
  else:
    modality_cfg.update(max_source_positions=sizes["max_positions"], dropout=m.dropout)
  t = config.targets
  return {
    "_name": "data2vec_multi",
    "depth": sizes["num_layers"] - prenet,
    "embed_dim": dim,
    "num_heads": sizes["num_heads"],
    "mlp_ratio": sizes["mlp_dim"] / dim,
    "norm_eps": m.norm_eps,
    "layer_norm_first": False,
    "encoder_dropout": m.dropout,
    "attention_dropout": m.attention_dropout,
    "activation_dropout": m.activation_dropout,
    "post_mlp_drop": m.dropout,
    "layerdrop": m.get("layerdrop", 0.0),
    "average_top_k_layers": t.top_k,
    **_norm_flags(t.layer_norm, "instance_norm_target_layer", "layer_norm_target_layer"),
    **_norm_flags(t.final_norm, "instance_norm_targets", "layer_norm_targets"),
    "loss_beta": float(config.loss.get("beta", 0.0)),
    "loss_scale": config.loss.scale,
    "clone_batch": config.masking.num_clones,
    "ema_decay": config.ema.decay,
    "ema_end_decay": config.ema.end_decay,
    "ema_anneal_end_step": config.ema.anneal_steps,
    "ema_encoder_only": tuple(config.ema.copy_params) == fairseq_recipe.BLOCKS_ONLY,
    "supported_modality": FAIRSEQ_MODALITY[modality],
    "modalities": {modality: modality_cfg},
  }


def checkpoint_dict(config, params, teacher=None) -> dict:
  """`{"model": state dict (+ `_ema`), "cfg": {"model": ...}}` of a 2.0 pretraining run."""
  if config.version != 2:
    raise common.ConversionError("fairseq's Data2VecMultiModel layout is data2vec 2.0's")
  sizes = {**data2vec.model_sizes(config.modality, config.model), **config.model.to_dict()}
  table = fairseq_v2.key_table(config.modality, sizes, FAIRSEQ_MODALITY[config.modality])
  state = common.export_state_dict(params, table, model_name="fairseq Data2VecMultiModel")
  if teacher is not None:
    state["_ema"] = _teacher_dict(table, teacher, config.ema.copy_params)
  if config.modality == "image":  # fairseq stores the fixed sin-cos table our model computes
    grid = sizes["image_size"] // sizes["patch_size"]
    positions = image.sincos_2d(sizes["dim"], grid)[None]  # [1, N, D]
    name = f"modality_encoders.IMAGE.{fairseq_v2.POSITIONS}"
    state[name] = positions
    if teacher is not None and "frontend" in teacher:  # the teacher holds the local encoder
      state["_ema"][name] = positions
  return {"model": state, "cfg": {"model": model_cfg(config)}}


# ----------------------------------------------------------------------------- data2vec 1.0


def _inverse(rules) -> tuple:
  """fairseq -> HF renaming rules (full-match patterns with groups, templates with \\N) turned
  around: (HF pattern, fairseq template)."""
  inverse = []
  for pattern, template in rules:
    groups = re.findall(r"\((?!\?)[^()]*\)", pattern)
    hf_pattern = re.escape(template)
    for i, group in enumerate(groups, 1):
      hf_pattern = hf_pattern.replace(re.escape(f"\\{i}"), group)
    fairseq_template, n = pattern, 0
    for group in groups:
      n += 1
      fairseq_template = fairseq_template.replace(group, f"\\{n}", 1)
    inverse.append((re.compile(hf_pattern), fairseq_template.replace("\\.", ".")))
  return tuple(inverse)


_TO_FAIRSEQ = {
  "audio": _inverse(fairseq_v1.AUDIO_BASE),
  "text": _inverse(fairseq_v1.TEXT_BASE),
}


def _fairseq_name(modality: str, name: str) -> str:
  for pattern, template in _TO_FAIRSEQ[modality]:
    if pattern.fullmatch(name):
      return pattern.sub(template, name)
  raise common.ConversionError(f"HF key {name} has no fairseq data2vec 1.0 {modality} name")


def _linear_to_torch(dense) -> dict:
  return {
    "weight": np.ascontiguousarray(np.asarray(dense["kernel"], np.float32).T),
    "bias": np.asarray(dense["bias"], np.float32),
  }


def audio_v1_cfg(config) -> dict:
  """fairseq's `data2vec_audio` model config (plain types) of a speech 1.0 run: its structure,
  its dropouts and, for a pretraining run, its recipe."""
  m, sizes = config.model, data2vec.model_sizes("audio", config.model)
  c, depth = sizes["conv_dim"], sizes["pos_conv_depth"]
  cfg = {
    "_name": "data2vec_audio",
    "extractor_mode": "layer_norm",
    "conv_feature_layers": f"[({c}, 10, 5)] + [({c}, 3, 2)] * 4 + [({c}, 2, 2)] * 2",
    "conv_bias": False,
    "encoder_layers": sizes["num_layers"],
    "encoder_embed_dim": sizes["dim"],
    "encoder_ffn_embed_dim": sizes["mlp_dim"],
    "encoder_attention_heads": sizes["num_heads"],
    # fairseq's kernel per layer is max(3, conv_pos // depth): conv_pos = kernel × depth.
    "conv_pos": sizes["pos_conv_kernel"] * depth,
    "conv_pos_groups": sizes["pos_conv_groups"],
    "pos_conv_depth": depth,
    "layer_norm_first": False,
    "dropout": m.dropout,
    "attention_dropout": m.attention_dropout,
    "activation_dropout": m.activation_dropout,
    "encoder_layerdrop": m.layerdrop,
    "feature_grad_mult": m.feature_grad_mult,
  }
  if "targets" not in config:  # a fine-tuning run: the encoder's structure is what counts
    return cfg
  t = config.targets
  return {
    **cfg,
    "average_top_k_layers": t.top_k,
    **_norm_flags(t.layer_norm, "instance_norm_target_layer", "layer_norm_target_layer"),
    **_norm_flags(t.final_norm, "instance_norm_targets", "layer_norm_targets"),
    "loss_beta": float(config.loss.beta),
    "loss_scale": None if config.loss.scale < 0 else float(config.loss.scale),
    "ema_decay": config.ema.decay,
    "ema_end_decay": config.ema.end_decay,
    "ema_anneal_end_step": config.ema.anneal_steps,
    "ema_transformer_only": True,
    "ema_layers_only": bool(config.ema.copy_params),
    "max_update": config.loop.total_steps,
    "mask_prob": config.masking.prob,
    "mask_length": config.masking.length,
    "min_target_var": config.loop.min_target_std,
    "min_pred_var": config.loop.min_pred_std,
  }


def audio_v1_checkpoint(config, params, teacher=None) -> dict:
  """`{"model": ..., "cfg": {"model": ...}}` of a data2vec 1.0 speech pretraining run, as
  fairseq's `Data2VecAudioModel` saves it: its state dict (the regression head `final_proj`
  included) with the EMA teacher's transformer as `_ema`."""
  sizes = data2vec.model_sizes("audio", config.model)
  if sizes["pos_conv_depth"] < 2:
    raise common.ConversionError(
      "fairseq's single positional conv is weight-normed and has no LayerNorm; this run's "
      f"pos_conv_depth={sizes['pos_conv_depth']} conv has no fairseq counterpart (export to HF)"
    )
  hf_state = hf_audio.params_to_hf(params)
  state = {_fairseq_name("audio", k): v for k, v in hf_state.items()}
  state |= {f"final_proj.{k}": v for k, v in _linear_to_torch(params["final_proj"]).items()}
  if teacher is not None:
    hf_config = hf_audio.hf_config_from_params(params)
    table = hf_audio.expected_keys(common.config_dict(hf_config))
    flat = traverse_util.flatten_dict(dict(teacher))
    ema = {}  # fairseq keeps its skip keys (the positional conv, copied) in `_ema` too
    for hf_name, entry in table.items():
      if entry.path in flat:
        name = _fairseq_name("audio", hf_name).removeprefix("encoder.")  # the EMA's: the encoder
        ema[name] = np.ascontiguousarray(entry.to_hf(np.asarray(flat[entry.path], np.float32)))
    state["_ema"] = ema
  return {"model": state, "cfg": {"model": audio_v1_cfg(config)}}


_TEXT_ENCODER = "encoder.sentence_encoder."
_VERSION = np.array([3.0], np.float32)  # fairseq's TransformerEncoder `version` buffer


def text_v1_cfg(config) -> dict:
  """fairseq's `data2vec_text` model config (plain types) of a text 1.0 run."""
  m, sizes, t = config.model, data2vec.model_sizes("text", config.model), config.targets
  return {
    "_name": "data2vec_text",
    "max_positions": sizes["max_positions"],
    "head_layers": 2,  # our regression head: Linear, GELU, Linear
    "average_top_k_layers": t.top_k,
    **_norm_flags(t.layer_norm, "instance_norm_target_layer", "layer_norm_target_layer"),
    **_norm_flags(t.final_norm, "instance_norm_targets", "layer_norm_targets"),
    "loss_beta": float(config.loss.beta),
    "loss_scale": float(config.loss.scale),
    "ema_decay": config.ema.decay,
    "ema_end_decay": config.ema.end_decay,
    "ema_anneal_end_step": config.ema.anneal_steps,
    "ema_transformer_layers_only": bool(config.ema.copy_params),
    "transformer": {
      "dropout": m.dropout,
      "attention_dropout": m.attention_dropout,
      "activation_dropout": m.activation_dropout,
      "activation_fn": "gelu",
      "layernorm_embedding": True,
      "no_scale_embedding": True,
      "max_source_positions": sizes["max_positions"],
      "encoder": {
        "embed_dim": sizes["dim"],
        "ffn_embed_dim": sizes["mlp_dim"],
        "layers": sizes["num_layers"],
        "attention_heads": sizes["num_heads"],
        "normalize_before": False,
        "learned_pos": True,
        "layerdrop": 0.0,
      },
      # Unused by data2vec_text; fairseq's TransformerConfig interpolates these dims from a
      # translation model's config, so they are written out.
      "decoder": {"embed_dim": sizes["dim"], "input_dim": sizes["dim"], "output_dim": sizes["dim"]},
    },
  }


def text_v1_checkpoint(config, params, teacher=None) -> dict:
  """`{"model": ..., "cfg": {"model": ...}}` of a data2vec 1.0 text pretraining run, as
  fairseq's `Data2VecTextModel` saves it: the sentence encoder, the regression head and the
  EMA teacher as `encoder._ema`. HF's zero token type row has no fairseq counterpart."""
  pad_id = config.model.pad_id
  hf_state = hf_text.params_to_hf(params, pad_id=pad_id)
  hf_state.pop(hf_text.TOKEN_TYPE_KEY)
  state = {_fairseq_name("text", k): v for k, v in hf_state.items()}
  state[_TEXT_ENCODER + "version"] = _VERSION
  head = params["final_proj"]
  for torch_index, ours in ((0, "dense"), (2, "out")):
    for k, v in _linear_to_torch(head[ours]).items():
      state[f"encoder.regression_head.{torch_index}.{k}"] = v
  if teacher is not None:
    teacher_state = hf_text.params_to_hf(dict(teacher), pad_id=pad_id)
    teacher_state.pop(hf_text.TOKEN_TYPE_KEY)
    ema = {
      _fairseq_name("text", k).removeprefix(_TEXT_ENCODER): v for k, v in teacher_state.items()
    }
    state["encoder._ema"] = {**ema, "version": _VERSION}
  return {"model": state, "cfg": {"model": text_v1_cfg(config)}}


def v1_checkpoint(config, params, teacher=None) -> dict:
  """The released layout of a data2vec 1.0 pretraining run: fairseq's (speech, text) or
  data2vec_vision's (images)."""
  exporters = {"audio": audio_v1_checkpoint, "text": text_v1_checkpoint}
  return {**exporters, "image": image_v1_checkpoint}[config.modality](config, params, teacher)


# data2vec_vision's BEiT (`modeling_cyclical`): the fused q/k/v weight and the position index
# buffer are what the renaming rules do not cover.
_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.weight")
_VISION_TO_BEIT = _inverse(r for r in fairseq_v1.VISION_BASE if "{part}" not in r[1])


def _beit_state(params, grid: tuple[int, int]) -> dict:
  """Our image params -> BEiT's `VisionTransformerForCyclicalTraining` state dict."""
  hf_state = hf_image.params_to_hf(params)
  state, qkv = {}, {}
  for name, value in hf_state.items():
    if match := _QKV.fullmatch(name):
      qkv.setdefault(int(match.group(1)), {})[match.group(2)] = value
      continue
    for pattern, template in _VISION_TO_BEIT:
      if pattern.fullmatch(name):
        state[pattern.sub(template, name)] = value
        break
    else:
      raise common.ConversionError(f"HF key {name} has no data2vec_vision name")
  for i, parts in qkv.items():
    state[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(
      [parts[p] for p in ("query", "key", "value")]
    )
  state["rel_pos_bias.relative_position_index"] = image.relative_position_index(grid)
  state |= {f"lm_head.{k}": v for k, v in _linear_to_torch(params["final_proj"]).items()}
  return state


def image_v1_checkpoint(config, params, teacher=None) -> dict:
  """`{"model", "model_ema", "args"}` of a data2vec 1.0 image pretraining run, as
  data2vec_vision's `run_cyclical.py` saves it (`args` as a plain dict, with the sizes that the
  `--model` name stands for)."""
  m, sizes = config.model, data2vec.model_sizes("image", config.model)
  if m.get("relative_bias", "shared") != "shared":
    raise common.ConversionError("data2vec_vision pretrains with one shared relative position bias")
  grid = image.patch_grid(sizes["image_size"], sizes["patch_size"])
  t, depth = config.targets, sizes["num_layers"]
  args = {
    "input_size": sizes["image_size"],
    "patch_size": sizes["patch_size"],
    "embed_dim": sizes["dim"],
    "depth": depth,
    "num_heads": sizes["num_heads"],
    "mlp_ratio": sizes["mlp_dim"] / sizes["dim"],
    "layer_scale_init_value": m.layer_scale_init,
    "shared_rel_pos_bias": True,
    "rel_pos_bias": False,
    "abs_pos_emb": False,
    "drop_path": m.drop_path_rate,
    "target_layers": str(list(range(depth - t.top_k, depth))),
    "layer_results": {"block": "end", "ffn": "fc"}[t.layer_output],
    "no_target_layer_norm_last": t.layer_norm != "layer",
    "target_instance_norm": t.layer_norm == "instance",
    "post_target_layer_norm": t.final_norm == "layer",
    "post_target_instance_norm": t.final_norm == "instance",
    "l1_beta": float(config.loss.beta),
    "l2_loss": config.loss.beta == 0,
    "ema_decay_init": config.ema.decay,
    "ema_decay": config.ema.end_decay,
    "ema_start_at": config.ema.anneal_steps,
    "num_mask_patches": config.masking.masked_patches,
  }
  ckpt = {"model": _beit_state(params, grid), "args": args}
  if teacher is not None:
    ckpt["model_ema"] = _beit_state(dict(teacher), grid)
  return ckpt


def ctc_v1_checkpoint(config, params) -> dict:
  """`{"model", "cfg"}` of a CTC fine-tuning run on a data2vec 1.0 speech encoder, as fairseq's
  `Wav2VecCtc` saves it (the released `*_960h.pt` layout): the encoder under
  `w2v_encoder.w2v_model.`, the letter projection as `w2v_encoder.proj`, the pretraining config
  as `w2v_args`."""
  if data2vec.model_sizes("audio", config.model)["pos_conv_depth"] < 2:
    raise common.ConversionError("this run's single positional conv has no fairseq counterpart")
  prefix = hf_audio.TASK_MODEL_PREFIX
  hf_state = hf_audio.params_to_hf(params, prefix=prefix)
  state = {}
  for name, value in hf_state.items():
    if name.startswith(prefix):
      state["w2v_encoder.w2v_model." + _fairseq_name("audio", name[len(prefix) :])] = value
    elif name.startswith("lm_head."):  # HF's CTC head is fairseq's encoder projection
      state["w2v_encoder.proj." + name[len("lm_head.") :]] = value
    else:
      raise common.ConversionError(f"HF key {name} has no fairseq Wav2VecCtc name")
  encoder_cfg = audio_v1_cfg(config)
  m = config.model
  cfg = {
    "_name": "wav2vec_ctc",
    "no_pretrained_weights": False,
    "normalize": False,
    "apply_mask": m.get("mask_prob", 0.0) > 0,
    "dropout": m.dropout,
    "final_dropout": config.head.get("dropout", 0.0),
    "attention_dropout": m.attention_dropout,
    "activation_dropout": m.activation_dropout,
    "layerdrop": m.layerdrop,
    "feature_grad_mult": m.feature_grad_mult,
    "w2v_args": {
      "model": encoder_cfg,
      "task": {"_name": "audio_pretraining", "data": "", "normalize": False},
    },
  }
  return {"model": state, "cfg": {"model": cfg}}
