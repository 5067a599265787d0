"""HF transformers checkpoints of any modality <-> our models, with or without a task head.

The per-modality converters (`hf_audio`, `hf_image`, `hf_text`) map one architecture each; this
module picks the converter from the config's `model_type`, tells a task model from a base model by
its keys, and builds the matching model of ours:

- base models (`Data2Vec*Model`, and the released pretrained checkpoints, which HF stores as
  `Data2VecTextForMaskedLM` / `Data2VecAudioModel` / `Data2VecVisionModel`) -> our pretraining
  model (`data2vec.build_model`); its `final_proj`, which HF lacks, is initialised with `seed`;
- task models with a head we implement -> our fine-tuning model (`build_finetune_model`):
  `Data2VecAudioForCTC` (CTC), `Data2VecVisionForImageClassification` (mean-pooled classifier),
  `Data2VecTextForSequenceClassification` (classification, or regression with one output).

Dropped on import, and reported in `Imported.dropped`: the MLM head `lm_head.*` of
`Data2VecTextForMaskedLM` (data2vec pretrains with a regression head instead; the released text
checkpoints carry an untrained one) and the unused text pooler. Everything else must map.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from d2v_jax.convert import common, hf_audio, hf_image, hf_text
from d2v_jax.models import data2vec
from d2v_jax.models import finetune as finetune_models

ConversionError = common.ConversionError

# HF model_type -> (our modality, converter).
CONVERTERS = {
  "data2vec-audio": ("audio", hf_audio),
  "data2vec-vision": ("image", hf_image),
  "data2vec-text": ("text", hf_text),
  "roberta": ("text", hf_text),
}
MODALITY_CONVERTERS = {"audio": hf_audio, "image": hf_image, "text": hf_text}
BASE_MODELS = {
  "audio": "Data2VecAudioModel",
  "image": "Data2VecVisionModel",
  "text": "Data2VecTextModel",
}

# Keys of HF checkpoints with no counterpart in our models, dropped (and reported) on import.
_DROPPED_PREFIXES = {"text": ("lm_head.",)}
_DROPPED_KEYS = {"text": ("pooler.dense.weight", "pooler.dense.bias")}


@dataclasses.dataclass(frozen=True)
class Imported:
  """A converted checkpoint: our model config, head config (None: a base model) and params.

  HF and data2vec 1.0 checkpoints give `version` 1; `fairseq_v2` gives data2vec 2.0 models, with
  the EMA teacher's leaves in `teacher` when the checkpoint has one.
  """

  modality: str
  model_cfg: ml_collections.ConfigDict
  head_cfg: ml_collections.ConfigDict | None
  params: dict
  dropped: tuple[str, ...]  # source keys not carried over, each with the reason
  version: int = 1
  teacher: dict | None = None  # {path tuple in our tree: array}; None: no EMA teacher
  kept: tuple[str, ...] = ()  # source keys beyond the encoder carried over (regression head)
  recipe: tuple | None = None  # fairseq 1.0: (cfg.model, cfg.task) the file was trained with


def modality_of(hf_config: Mapping[str, Any]) -> str:
  """Our modality for an HF config's `model_type`."""
  model_type = common.config_dict(hf_config).get("model_type")
  if model_type not in CONVERTERS:
    raise ConversionError(
      f"HF model_type {model_type!r} is not a data2vec model; known: {sorted(CONVERTERS)}"
    )
  return CONVERTERS[model_type][0]


def _split_dropped(state_dict: Mapping[str, Any], modality: str, prefix: str):
  """(the state dict without the keys we drop, their names with the reason)."""
  prefixes = _DROPPED_PREFIXES.get(modality, ())
  names = {prefix + k for k in _DROPPED_KEYS.get(modality, ())}
  kept, dropped = {}, []
  for key, value in state_dict.items():
    if key.startswith(prefixes):
      dropped.append(f"{key}: the MLM head (data2vec pretrains with a regression head)")
    elif key in names:
      dropped.append(f"{key}: HF's pooler, which data2vec text never trains")
    else:
      kept[key] = value
  return kept, tuple(dropped)


def _task_prefix(state_dict: Mapping[str, Any], converter) -> str:
  """The base-model prefix of a task model's keys ("" for a base model)."""
  for prefix in (converter.TASK_MODEL_PREFIX, getattr(converter, "ROBERTA_PREFIX", None)):
    if prefix and any(k.startswith(prefix) for k in state_dict):
      return prefix
  return ""


def from_hf(
  state_dict: Mapping[str, Any], hf_config: Mapping[str, Any], *, seed: int = 0
) -> Imported:
  """Converts an HF checkpoint (state dict of numpy arrays, config dict) to our model.

  Raises:
    ConversionError: listing every key that does not map, or naming the unsupported option.
  """
  c = common.config_dict(hf_config)
  modality = modality_of(c)
  converter = MODALITY_CONVERTERS[modality]
  prefix = _task_prefix(state_dict, converter)
  state_dict, dropped = _split_dropped(state_dict, modality, prefix)
  head = converter.head_from_hf(c, state_dict)
  if modality == "image":
    model_cfg = converter.config_from_hf(c, classifier=head is not None)
  else:
    model_cfg = converter.config_from_hf(c)
  inputs = data2vec.example_inputs(modality, model_cfg, c.get("num_channels", 3))
  if head is None:
    model = data2vec.build_model(modality, model_cfg)
    init_params = common.init_shapes_and_head(model, inputs, seed)
    head_cfg = None
  else:
    head_cfg = ml_collections.ConfigDict(head.config)
    model = finetune_models.build_finetune_model(modality, model_cfg, head_cfg)
    init_params = common.init_task_params(model, inputs, seed)
  params = converter.params_from_hf(
    state_dict, c, init_params=init_params, prefix=prefix, head=head
  )
  return Imported(modality, model_cfg, head_cfg, params, dropped)


def to_hf(
  modality: str,
  params: Mapping[str, Any],
  model_cfg: ml_collections.ConfigDict,
  head_cfg: ml_collections.ConfigDict | None = None,
) -> tuple[dict, dict]:
  """Our params (a pretraining student, or a fine-tuning model's with `head_cfg`) -> (HF state
  dict, HF config dict) of `Data2Vec*Model` or the task model. `final_proj` is dropped."""
  converter = MODALITY_CONVERTERS[modality]
  if "head" in params and head_cfg is None:
    raise ConversionError("params have a task head: pass its head config (config.head)")
  prefix = converter.TASK_MODEL_PREFIX if head_cfg is not None else ""
  if modality == "audio":
    hf_config = converter.hf_config_from_params(params)
    state_dict = converter.params_to_hf(params, prefix=prefix)
  elif modality == "image":
    eps = model_cfg.get("layer_norm_eps", hf_image.ORIGINAL_LAYER_NORM_EPS)
    hf_config = converter.hf_config_from_params(params, layer_norm_eps=eps)
    state_dict = converter.params_to_hf(params, prefix=prefix)
  else:
    pad_id = model_cfg.get("pad_id", 1)
    eps = model_cfg.get("layer_norm_eps", hf_text.ORIGINAL_LAYER_NORM_EPS)
    hf_config = converter.hf_config_from_params(params, pad_id=pad_id, layer_norm_eps=eps)
    state_dict = converter.params_to_hf(params, pad_id=pad_id, prefix=prefix)
  if head_cfg is None:
    hf_config["architectures"] = [BASE_MODELS[modality]]
  else:
    hf_config.update(converter.hf_head_config(head_cfg))
  return state_dict, hf_config
