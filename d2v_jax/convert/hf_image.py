"""HF transformers `Data2VecVisionModel` <-> d2v-jax image model (spec §1.1 vision, §4 HF names).

Pure numpy; torch is never imported. Inputs are the HF config as a dict (`config.to_dict()` or the
checkpoint's `config.json`) and the state dict as numpy arrays (e.g.
`safetensors.numpy.load_file("model.safetensors")`).

- `config_from_hf`: HF config -> our `config.model` (variant, explicit sizes, image and patch size,
  dropouts, LayerScale init, `layer_norm_eps`, dtype). Layouts our model does not implement raise
  instead of being approximated: absolute position embeddings, per-layer relative position bias
  tables (`use_relative_position_bias`, the fine-tuned checkpoints), mean pooling (no final
  LayerNorm on the sequence), non-square images or patches, activations other than exact GELU.
- `params_from_hf`: HF state dict -> our `params` tree. Every key must map and every expected key
  must be present with its exact shape; otherwise one `ConversionError` lists all offending keys.
- `build_from_hf`: both, plus our model and a complete parameter tree, ready for `model.apply`.
- `params_to_hf` / `hf_config_from_params`: the inverse, our `params` -> HF state dict and config.

Our model is the data2vec pretraining layout, which HF's conversion script gives the released
pretrained checkpoints (`facebook/data2vec-vision-{base,large}`): a shared relative position bias,
no absolute position embedding, `use_mean_pooling=False` (HF's `layernorm` is our `final_norm`, on
every position). Those checkpoints keep HF's default `layer_norm_eps=1e-12` where the original
model used 1e-6; `config_from_hf` passes the checkpoint's value on as `layer_norm_eps`, which
`build_model` applies.

Parameters without an HF counterpart: our `final_proj` (data2vec's regression head `lm_head`; HF
converts only the encoder), and `mask_emb` when the HF model has no `embeddings.mask_token`
(`use_mask_token=False`, as in the released checkpoints). `params_from_hf` leaves them out unless
`init_params` (a freshly initialised tree of our model) is passed, in which case they are taken
from it; `build_from_hf` always does that. Either way they are never silently invented.

Layouts: torch Conv2d [D, C, p, p] -> Flax Conv [p, p, C, D] (both cross-correlate, and HF
flattens the patch grid row-major like our `reshape`); Linear [out, in] -> Dense [in, out]; q/k/v
Linear -> DenseGeneral [D, H, Dh] (torch splits heads as `view(..., H, Dh)`, so output unit h*Dh+d
is head h, dim d); attention output -> [H, Dh, D]; CLS and mask tokens [1, 1, D] -> [D]. The
relative position bias table is used as is: HF's `generate_relative_position_index` and our
`image.relative_position_index` agree (tested), so no row permutation is needed. Older HF
checkpoints also store that index as `encoder.relative_position_bias.relative_position_index`; it
is not a parameter of ours, and it is checked against our index, not converted.
"""

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from d2v_jax.convert import common
from d2v_jax.models import data2vec, image

# One error type for every converter: `except ConversionError` catches every modality.
ConversionError = common.ConversionError

# Top-level entries of our tree that HF never provides (see the module docstring).
NOT_IN_HF = common.NOT_IN_HF

# Prefix of the base model inside HF task models (`Data2VecVisionForImageClassification`,
# `...ForSemanticSegmentation`): pass it as `prefix`.
TASK_MODEL_PREFIX = "data2vec_vision."

# The LayerNorm eps of the original BEiT / data2vec vision model and the default of our encoder.
ORIGINAL_LAYER_NORM_EPS = 1e-6

# Buffers of older HF checkpoints: not parameters, checked against our index instead.
_TABLE_KEY = "encoder.relative_position_bias.relative_position_bias_table"
_INDEX_KEY = "encoder.relative_position_bias.relative_position_index"


def _layer_table_key(i: int, name: str = "relative_position_bias_table") -> str:
  """A per-block relative position key of HF's fine-tuned layout (`name`: the table or index)."""
  return f"encoder.layer.{i}.attention.attention.relative_position_bias.{name}"


def _side(value) -> int | None:
  """HF `image_size` / `patch_size` (an int or an (h, w) pair) -> the side if square, else None."""
  if isinstance(value, int):
    return value
  value = list(value)
  return int(value[0]) if len(value) == 2 and value[0] == value[1] else None


def config_from_hf(
  hf_config: Mapping[str, Any], *, classifier: bool = False
) -> ml_collections.ConfigDict:
  """HF `Data2VecVisionConfig` (as a dict) -> our `config.model` for `build_model` (or, with
  `classifier`, for `build_finetune_model` under an image classification head).

  Raises:
    ConversionError: if the HF config uses an option our model does not implement.
  """
  c = common.config_dict(hf_config)
  require = common.Requirements()
  model_type = c.get("model_type", "data2vec-vision")
  require(model_type == "data2vec-vision", f"model_type is {model_type!r}, not 'data2vec-vision'")
  image_size, patch_size = _side(c.get("image_size", 224)), _side(c.get("patch_size", 16))
  require(image_size is not None, f"image_size {c.get('image_size')} is not square (ours is)")
  require(patch_size is not None, f"patch_size {c.get('patch_size')} is not square (ours is)")
  if image_size and patch_size:
    require(
      image_size % patch_size == 0,
      f"image_size {image_size} is not a multiple of patch_size {patch_size}",
    )
  require(
    c.get("hidden_act", "gelu") == "gelu",
    f"hidden_act is {c.get('hidden_act')!r}; ours is exact (erf) GELU",
  )
  require(
    not c.get("use_absolute_position_embeddings", False),
    "use_absolute_position_embeddings=True (our encoder has no absolute position embedding)",
  )
  per_layer = c.get("use_relative_position_bias", False)
  require(
    per_layer != c.get("use_shared_relative_position_bias", False),
    "exactly one of use_shared_relative_position_bias (one table for all blocks: pretrained "
    "checkpoints) and use_relative_position_bias (one per block: fine-tuned ones) must be set",
  )
  if classifier:
    require(
      c.get("use_mean_pooling", True),
      "use_mean_pooling=False: a classifier on the CLS token; ours (BEiT's) classifies the "
      "LayerNorm'd mean of the patches",
    )
  else:
    require(
      not c.get("use_mean_pooling", True),
      "use_mean_pooling=True: HF then applies no final LayerNorm to the sequence (it normalises "
      "the patch mean in the pooler instead); our encoder ends with final_norm on every position "
      "(the pretraining layout, use_mean_pooling=False). A fine-tuned classifier converts with its "
      "head (Data2VecVisionForImageClassification)",
    )
  dim, heads = c["hidden_size"], c["num_attention_heads"]
  require(dim % heads == 0, f"hidden_size {dim} not divisible by num_attention_heads {heads}")
  layer_scale = float(c.get("layer_scale_init_value", 0.1))
  require(layer_scale >= 0, f"layer_scale_init_value {layer_scale} < 0")
  require.raise_if_any("Data2VecVision")

  sizes = dict(
    num_layers=c["num_hidden_layers"],
    dim=dim,
    num_heads=heads,
    mlp_dim=c["intermediate_size"],
    image_size=image_size,
    patch_size=patch_size,
  )
  return ml_collections.ConfigDict(
    dict(
      variant=common.variant_for("image", sizes),
      **sizes,
      dropout=float(c.get("hidden_dropout_prob", 0.0)),
      attention_dropout=float(c.get("attention_probs_dropout_prob", 0.0)),
      drop_path_rate=float(c.get("drop_path_rate", 0.1)),
      # HF creates lambda_1/lambda_2 only if this is > 0, and so do we (`Block.layer_scale_init`).
      layer_scale_init=layer_scale,
      layer_norm_eps=float(c.get("layer_norm_eps", 1e-12)),
      relative_bias="per_layer" if per_layer else "shared",
      dtype="float32",
    )
  )


def expected_keys(c: dict) -> common.KeyTable:
  """Every HF key of a Data2VecVisionModel with `c`, its expected shape and its conversions."""
  dim, heads, mlp = c["hidden_size"], c["num_attention_heads"], c["intermediate_size"]
  patch, channels = _side(c.get("patch_size", 16)), c.get("num_channels", 3)
  side = _side(c.get("image_size", 224)) // patch
  keys = common.KeyTable()

  token = dict(to_ours=lambda w: w.reshape(dim), to_hf=lambda w: w.reshape(1, 1, dim))
  keys.add("embeddings.cls_token", "encoder/cls_token", (1, 1, dim), **token)
  if c.get("use_mask_token", False):
    keys.add("embeddings.mask_token", "mask_emb", (1, 1, dim), **token)
  keys.add(
    "embeddings.patch_embeddings.projection.weight",
    "frontend/patch_embed/projection/kernel",
    (dim, channels, patch, patch),
    lambda w: w.transpose(2, 3, 1, 0),  # [D, C, p, p] -> [p, p, C, D]
    lambda w: w.transpose(3, 2, 0, 1),
  )
  keys.add(
    "embeddings.patch_embeddings.projection.bias", "frontend/patch_embed/projection/bias", (dim,)
  )
  table_shape = (image.num_relative_positions((side, side)), heads)
  per_layer = c.get("use_relative_position_bias", False)
  if not per_layer:
    keys.add(_TABLE_KEY, "encoder/rel_pos_bias/table", table_shape)

  for i in range(c["num_hidden_layers"]):
    hf, ours = f"encoder.layer.{i}", f"encoder/blocks/layer_{i:02d}"
    if per_layer:  # block i's own table: slice i of ours
      keys.add(_layer_table_key(i), "encoder/rel_pos_bias/table", table_shape, index=i)
    if c.get("layer_scale_init_value", 0.1) > 0:
      keys.add(f"{hf}.lambda_1", f"{ours}/attention_scale", (dim,))
      keys.add(f"{hf}.lambda_2", f"{ours}/ffn_scale", (dim,))
    for name in ("query", "key", "value"):  # BEiT: q and v biases only
      attention, bias = f"{hf}.attention.attention.{name}", name != "key"
      keys.add_heads_in(attention, f"{ours}/attention/{name}", dim, heads, bias=bias)
    keys.add_heads_out(f"{hf}.attention.output.dense", f"{ours}/attention/out", dim, heads)
    keys.add_norm(f"{hf}.layernorm_before", f"{ours}/attention_norm", dim)
    keys.add_norm(f"{hf}.layernorm_after", f"{ours}/ffn_norm", dim)
    keys.add_linear(f"{hf}.intermediate.dense", f"{ours}/fc1", mlp, dim)
    keys.add_linear(f"{hf}.output.dense", f"{ours}/fc2", dim, mlp)

  if not c.get("use_mean_pooling", True):
    keys.add_norm("layernorm", "encoder/final_norm", dim)
  return keys


def _hints(unknown: list[str], prefix: str) -> list[str]:
  """Explanations for common kinds of unknown keys."""
  hints = []

  def any_key(*parts):
    return common.any_contains(unknown, *parts)

  if any_key("attention.attention.relative_position_bias."):
    hints.append(
      "hint: per-layer relative position bias tables (fine-tuned checkpoints) need "
      "use_relative_position_bias=True and use_shared_relative_position_bias=False in the config"
    )
  if any_key("position_embeddings"):
    hints.append("hint: absolute position embeddings are not supported")
  if any_key("pooler.layernorm"):
    hints.append(
      "hint: a pooler LayerNorm (use_mean_pooling=True) belongs to an image classifier: convert "
      "it with its head (head_from_hf)"
    )
  if any_key("feature_extractor.", "feature_projection.", "masked_spec_embed", "encoder.layers."):
    hints.append("hint: this looks like a Data2VecAudio state dict (see d2v_jax.convert.hf_audio)")
  if any_key("word_embeddings"):
    hints.append("hint: this looks like a Data2VecText state dict")
  return hints + common.prefix_hints(unknown, prefix, (TASK_MODEL_PREFIX,))


# ----------------------------------------------------------------------------- task heads

CLASSIFIER_MODEL = "Data2VecVisionForImageClassification"
_CLASSIFIER = "classifier.weight"
_POOLER_NORM = TASK_MODEL_PREFIX + "pooler.layernorm"


def _head_keys(dim: int, num_outputs: int) -> common.KeyTable:
  """BEiT's classifier: the LayerNorm of the patch mean (HF's pooler) -> our `PooledHead`."""
  keys = common.KeyTable()
  keys.add_norm(_POOLER_NORM, "head/norm", dim)
  keys.add_linear("classifier", "head/proj", num_outputs, dim)
  return keys


def head_from_hf(hf_config: Mapping[str, Any], state_dict: Mapping[str, Any]) -> common.Head | None:
  """The classification head of a `Data2VecVisionForImageClassification` (None: no head).

  Its base model has no final LayerNorm (`use_mean_pooling`): build it with
  `config_from_hf(..., classifier=True)`.
  """
  if _CLASSIFIER not in state_dict:
    return None
  c = common.config_dict(hf_config)
  num_outputs, dim = common.classifier_shape(c, state_dict, _CLASSIFIER)
  config = dict(
    task="classify",
    num_outputs=num_outputs,
    dropout=0.0,  # HF's classifier has no dropout
    layer_norm_eps=float(c.get("layer_norm_eps", 1e-12)),
    init_scale=0.001,
  )
  return common.Head(CLASSIFIER_MODEL, config, _head_keys(dim, num_outputs))


def params_from_hf(
  state_dict: Mapping[str, Any],
  hf_config: Mapping[str, Any],
  *,
  init_params: Mapping[str, Any] | None = None,
  prefix: str = "",
  head: common.Head | None = None,
) -> dict:
  """HF `Data2VecVisionModel` state dict -> our `params` tree (the `params` collection).

  Args:
    state_dict: HF name -> array (numpy, or anything `np.asarray` accepts).
    hf_config: the HF config as a dict.
    init_params: optional freshly initialised `params` of our model with the same config. If given,
      the result is complete: entries HF lacks (`final_proj`, and `mask_emb` if the HF model has no
      `embeddings.mask_token`) are copied from it, and every converted leaf is checked against its
      shape (leaves that HF replaces may be `jax.ShapeDtypeStruct`s). If None, the result holds
      only what HF provides.
    prefix: prefix of the base-model keys, e.g. `TASK_MODEL_PREFIX` for a
      `Data2VecVisionForImageClassification` state dict. Keys outside it (task heads) are reported
      as unknown, not dropped.
    head: `head_from_hf` of a classifier's state dict: its pooler LayerNorm and classifier are
      converted too (our `FineTuneModel`'s `head`), and `init_params` are that model's.

  Returns:
    A nested dict of float32 numpy arrays.

  Raises:
    ConversionError: listing every unknown, missing or mis-shaped key (and a stored
      `relative_position_index` that differs from ours).
  """
  c = common.config_dict(hf_config)
  config_from_hf(c, classifier=head is not None)  # validates the architecture and sizes
  expected = expected_keys(c)
  side = _side(c.get("image_size", 224)) // _side(c.get("patch_size", 16))
  # Older checkpoints store the (constant) index buffers: checked against ours, not converted.
  index_keys = [_INDEX_KEY] + [
    _layer_table_key(i, "relative_position_index") for i in range(c["num_hidden_layers"])
  ]

  def check_index(given):
    ours = image.relative_position_index((side, side))
    return [
      f"{prefix + k}: differs from image.relative_position_index({(side, side)})"
      for k in index_keys
      if k in given
      and (np.shape(given[k]) != ours.shape or not np.array_equal(np.asarray(given[k]), ours))
    ]

  given = common.check_state_dict(
    state_dict,
    expected.shapes(),
    what="HF Data2VecVision state dict",
    prefix=prefix,
    unchecked=index_keys,
    hints=_hints,
    extra=check_index,
    head_shapes=head.keys.shapes() if head else None,
  )
  return common.task_params(given, expected, head, init_params)


def init_shapes_and_head(
  model: data2vec.Data2Vec, model_cfg: ml_collections.ConfigDict, num_channels: int, seed: int
) -> dict:
  """`init_params` for `params_from_hf`: the full tree as shapes, real values for what HF lacks
  (`final_proj`, `mask_emb`; see `common.init_shapes_and_head`)."""
  images = jnp.zeros((1, model_cfg.image_size, model_cfg.image_size, num_channels))
  return common.init_shapes_and_head(model, (images, None), seed)


def build_from_hf(
  state_dict: Mapping[str, Any],
  hf_config: Mapping[str, Any],
  *,
  seed: int = 0,
  prefix: str = "",
) -> tuple[data2vec.Data2Vec, ml_collections.ConfigDict, dict]:
  """Builds our image model from an HF checkpoint: (model, model config, complete params).

  `final_proj` (and `mask_emb` if HF has none) come from our own initialisation with `seed`. The
  model takes NHWC images of `model_cfg.image_size`² with HF's `num_channels` channels (HF takes
  NCHW `pixel_values`).
  """
  model_cfg = config_from_hf(hf_config)
  model = data2vec.build_model("image", model_cfg)
  num_channels = common.config_dict(hf_config).get("num_channels", 3)
  init_params = init_shapes_and_head(model, model_cfg, num_channels, seed)
  params = params_from_hf(state_dict, hf_config, init_params=init_params, prefix=prefix)
  return model, model_cfg, params


# ----------------------------------------------------------------------------- export


def hf_config_from_params(
  params: Mapping[str, Any], *, layer_norm_eps: float = ORIGINAL_LAYER_NORM_EPS
) -> dict:
  """The `Data2VecVisionConfig` fields (as a dict) of an HF model that holds our `params`.

  Sizes are read off the parameter shapes, and so is the layout: one relative position table
  ([rows, H], pretraining) or one per block ([L, rows, H], fine-tuning); a classification `head`
  means mean pooling (HF's pooler LayerNorm instead of a final one). Pass the model's
  `layer_norm_eps` if it is not 1e-6. Dropouts are 0 (set them for fine-tuning).
  """
  blocks = params["encoder"]["blocks"]
  layer = blocks["layer_00"]
  dim, heads, _ = np.shape(layer["attention"]["query"]["kernel"])
  patch, _, channels, _ = np.shape(params["frontend"]["patch_embed"]["projection"]["kernel"])
  table_shape = np.shape(params["encoder"]["rel_pos_bias"]["table"])
  per_layer, rows = len(table_shape) == 3, table_shape[-2]
  side = (math.isqrt(rows - 3) + 1) // 2
  if image.num_relative_positions((side, side)) != rows:
    raise ConversionError(f"relative position table of {rows} rows fits no square grid")
  scales = {np.shape(b.get("attention_scale", ())) for b in blocks.values()}
  if len(scales) != 1:
    raise ConversionError("LayerScale is present in some blocks only")
  return dict(
    model_type="data2vec-vision",
    hidden_size=int(dim),
    num_hidden_layers=len(blocks),
    num_attention_heads=int(heads),
    intermediate_size=int(np.shape(layer["fc1"]["kernel"])[1]),
    hidden_act="gelu",
    image_size=int(side * patch),
    patch_size=int(patch),
    num_channels=int(channels),
    layer_norm_eps=float(layer_norm_eps),
    # The value only decides whether lambda_1/lambda_2 exist; the state dict overwrites them.
    layer_scale_init_value=0.1 if "attention_scale" in layer else 0.0,
    use_mask_token="mask_emb" in params,
    use_shared_relative_position_bias=not per_layer,
    use_relative_position_bias=per_layer,
    use_absolute_position_embeddings=False,
    use_mean_pooling="head" in params,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    drop_path_rate=0.0,
  )


def hf_head_config(head_cfg: Mapping[str, Any]) -> dict:
  """The HF config fields of a `Data2VecVisionForImageClassification` with our `config.head`."""
  num_outputs = int(head_cfg["num_outputs"])
  return dict(
    architectures=[CLASSIFIER_MODEL],
    **common.label_fields(num_outputs),
  )


def params_to_hf(params: Mapping[str, Any], *, prefix: str = "") -> dict[str, np.ndarray]:
  """Our image `params` -> an HF `Data2VecVisionModel` (or, with a classification `head`,
  `...ForImageClassification`) state dict (float32 numpy arrays).

  The inverse of `params_from_hf` for the config `hf_config_from_params(params)`; `final_proj`
  has no HF counterpart and is dropped. `prefix` (`TASK_MODEL_PREFIX` for a task model) is
  prepended to every base-model key.

  Raises:
    ConversionError: if `params` has leaves this mapping does not cover (other than
      `final_proj`), or lacks some it needs.
  """
  expected = expected_keys(hf_config_from_params(params)).prefixed(prefix)
  if "head" in params:
    dim, num_outputs = np.shape(params["head"]["proj"]["kernel"])
    expected.update(_head_keys(int(dim), int(num_outputs)))
  return common.export_state_dict(params, expected, model_name="Data2VecVision")
