"""HF transformers `Data2VecTextModel` <-> d2v-jax text model (spec §1.1 text, §4 HF names).

Pure numpy; torch is never imported. Inputs are the HF config as a dict (`config.to_dict()` or the
checkpoint's `config.json`) and the state dict as numpy arrays (e.g.
`safetensors.numpy.load_file("model.safetensors")`).

- `config_from_hf`: HF config -> our `config.model` (variant, explicit sizes, `vocab_size`,
  `max_positions`, `pad_id`, dropouts, `layer_norm_eps`, dtype). Layouts our model does not
  implement raise instead of being approximated: activations other than exact GELU, relative
  position embeddings (`position_embedding_type` other than "absolute"), decoders and
  cross-attention, no pad token. The checkpoint's LayerNorm eps is carried over
  (`build_model` applies `config.model.layer_norm_eps`).
- `params_from_hf`: HF state dict -> our `params` tree. Every key must map (or be one of the
  ignored keys below) and every expected key must be present with its exact shape; otherwise one
  `ConversionError` lists all offending keys.
- `build_from_hf`: both, plus our model and a complete parameter tree, ready for `model.apply`.
- `params_to_hf` / `hf_config_from_params`: the inverse, our `params` -> HF state dict and config.

`model_type` "roberta" is accepted as well: `RobertaModel` has the same layout, names and config
fields (a `RobertaForMaskedLM` state dict needs `prefix="roberta."`).

Positions are RoBERTa's, in both: the i-th non-pad token of a row (1-based) gets position
`pad + i`, pad tokens get `pad` (HF `create_position_ids_from_input_ids`, our
`text.position_ids(padding_mask, pad_id)`), so HF's `max_position_embeddings` rows hold our
`max_positions = max_position_embeddings - pad_token_id - 1` positions. Our model takes
`(input_ids, padding_mask)` with `padding_mask = input_ids == pad_token_id` (HF's
`attention_mask` is its negation); padding may sit anywhere in a row, as in HF.

Token types: HF adds `token_type_embeddings[token_type_ids]` to every token, with
`token_type_ids` all 0 unless given. Our model has no token types; row 0 is folded into every row
of our position table (exact up to fp32 rounding of the sum's order, ~1e-7), so our model computes
HF's output for `token_type_ids` = 0. The released checkpoints have `type_vocab_size` 1 with that
row zeroed (HF's conversion script), so there the fold adds nothing. A table with more rows is
accepted only if every row equals row 0 (then token types change nothing); otherwise the types
1.. would be lost, and `params_from_hf` raises. The export writes `type_vocab_size` 1 and a zero
row.

Ignored keys (accepted, shape-checked, not converted): the pooler `pooler.dense.{weight,bias}`
(`Data2VecTextModel`'s default `add_pooling_layer=True`; fairseq's data2vec text has no pooler, so
HF's is never pretrained, and the released checkpoints, saved from `Data2VecTextForMaskedLM`, have
none), and the `embeddings.position_ids` buffer of older checkpoints (checked to be `arange`). The
export has neither: build the HF model with `add_pooling_layer=False`.

Parameters without an HF counterpart: our `final_proj` (data2vec text's regression head, fairseq
`encoder.regression_head`, which HF's conversion drops). `params_from_hf` leaves it out unless
`init_params` (a freshly initialised tree of our model) is passed, in which case it is taken from
it; `build_from_hf` always does that. Either way it is never silently invented. The released
checkpoints are task models: their `lm_head.*` (the MLM head of `Data2VecTextForMaskedLM`) or
`classifier.*` keys must be dropped and `prefix=TASK_MODEL_PREFIX` passed.

Layouts: Embedding [N, D] as is; Linear [out, in] -> Dense [in, out]; q/k/v Linear -> DenseGeneral
[D, H, Dh] (torch splits heads as `view(..., H, Dh)`, so output unit h*Dh + d is head h, dim d);
attention output -> [H, Dh, D].
"""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from d2v_jax.convert import common
from d2v_jax.models import data2vec

# One error type for every converter: `except ConversionError` catches every modality.
ConversionError = common.ConversionError

# Top-level entries of our tree that HF never provides (see the module docstring).
NOT_IN_HF = common.NOT_IN_HF

# Prefix of the base model inside HF task models (`Data2VecTextForMaskedLM`, the released
# checkpoints, and `...ForSequenceClassification` etc.): pass it as `prefix`.
TASK_MODEL_PREFIX = "data2vec_text."
ROBERTA_PREFIX = "roberta."  # the same for RoBERTa task models

MODEL_TYPES = ("data2vec-text", "roberta")

# The LayerNorm eps of fairseq (PyTorch's default), of the released checkpoints and of our model.
ORIGINAL_LAYER_NORM_EPS = 1e-5

TOKEN_TYPE_KEY = "embeddings.token_type_embeddings.weight"
POSITION_KEY = "embeddings.position_embeddings.weight"
_POSITION_IDS_KEY = "embeddings.position_ids"  # a buffer of older checkpoints
_POOLER = ("pooler.dense.weight", "pooler.dense.bias")


def config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """HF `Data2VecTextConfig` (as a dict) -> our `config.model` for `build_model("text", ...)`.

  Raises:
    ConversionError: if the HF config uses an option our model does not implement.
  """
  c = common.config_dict(hf_config)
  require = common.Requirements()
  model_type = c.get("model_type", "data2vec-text")
  if model_type not in MODEL_TYPES:  # its sizes may not even exist: nothing else to check
    other = {"data2vec-audio": "hf_audio", "data2vec-vision": "hf_image"}.get(model_type)
    raise ConversionError(
      f"Unsupported Data2VecText config:\n  model_type is {model_type!r}, not one of {MODEL_TYPES}"
      + (f" (see d2v_jax.convert.{other})" if other else "")
    )
  require(
    c.get("hidden_act", "gelu") == "gelu",
    f"hidden_act is {c.get('hidden_act')!r}; ours is exact (erf) GELU",
  )
  # transformers 5 dropped the field (absolute only); older configs and checkpoints carry it.
  position_type = c.get("position_embedding_type") or "absolute"
  require(
    position_type == "absolute",
    f"position_embedding_type is {position_type!r}; ours is 'absolute' (learned positions)",
  )
  require(not c.get("is_decoder", False), "is_decoder=True (a causal decoder; ours is an encoder)")
  require(not c.get("add_cross_attention", False), "add_cross_attention=True (no cross-attention)")
  dim, heads = c["hidden_size"], c["num_attention_heads"]
  require(dim % heads == 0, f"hidden_size {dim} not divisible by num_attention_heads {heads}")
  vocab, rows, pad = c["vocab_size"], c["max_position_embeddings"], c.get("pad_token_id")
  require(pad is not None, "pad_token_id is None; RoBERTa positions need a pad token")
  if pad is not None:
    require(0 <= pad < vocab, f"pad_token_id {pad} outside the vocabulary of {vocab}")
    require(
      rows > pad + 1,
      f"max_position_embeddings {rows} leaves no position after the {pad + 1} reserved rows "
      f"0..pad_token_id",
    )
  require(c.get("type_vocab_size", 2) >= 1, f"type_vocab_size {c.get('type_vocab_size')} < 1")
  require.raise_if_any("Data2VecText")

  sizes = dict(
    num_layers=c["num_hidden_layers"],
    dim=dim,
    num_heads=heads,
    mlp_dim=c["intermediate_size"],
    vocab_size=vocab,
    max_positions=rows - pad - 1,
  )
  eps = float(c.get("layer_norm_eps", 1e-12))
  model_cfg = ml_collections.ConfigDict(
    dict(
      variant=common.variant_for("text", sizes),
      **sizes,
      pad_id=pad,
      dropout=float(c.get("hidden_dropout_prob", 0.1)),
      attention_dropout=float(c.get("attention_probs_dropout_prob", 0.1)),
      activation_dropout=0.0,  # HF has no dropout after the FFN activation (fairseq's is 0)
      layer_norm_eps=eps,
      dtype="float32",
    )
  )
  return model_cfg


def expected_keys(c: dict) -> common.KeyTable:
  """Every converted HF key of a Data2VecTextModel with `c`, its expected shape and conversions.

  The position table is listed as is; `params_from_hf` folds the token type row into it.
  """
  dim, heads, mlp = c["hidden_size"], c["num_attention_heads"], c["intermediate_size"]
  keys = common.KeyTable()
  keys.add(
    "embeddings.word_embeddings.weight", "frontend/token_embed/embedding", (c["vocab_size"], dim)
  )
  keys.add(POSITION_KEY, "frontend/position_embed/embedding", (c["max_position_embeddings"], dim))
  keys.add_norm("embeddings.LayerNorm", "frontend/embed_norm", dim)

  for i in range(c["num_hidden_layers"]):
    hf, ours = f"encoder.layer.{i}", f"encoder/blocks/layer_{i:02d}"
    for name in ("query", "key", "value"):
      keys.add_heads_in(f"{hf}.attention.self.{name}", f"{ours}/attention/{name}", dim, heads)
    keys.add_heads_out(f"{hf}.attention.output.dense", f"{ours}/attention/out", dim, heads)
    keys.add_norm(f"{hf}.attention.output.LayerNorm", f"{ours}/attention_norm", dim)
    keys.add_linear(f"{hf}.intermediate.dense", f"{ours}/fc1", mlp, dim)
    keys.add_linear(f"{hf}.output.dense", f"{ours}/fc2", dim, mlp)
    keys.add_norm(f"{hf}.output.LayerNorm", f"{ours}/ffn_norm", dim)
  return keys


def _other_keys(c: dict) -> tuple[dict[str, tuple[int, ...]], set[str]]:
  """HF keys besides `expected_keys`: {name: shape}, and which of them may be absent."""
  dim = c["hidden_size"]
  shapes = {
    TOKEN_TYPE_KEY: (c.get("type_vocab_size", 2), dim),  # required; folded into the positions
    _POOLER[0]: (dim, dim),
    _POOLER[1]: (dim,),
    _POSITION_IDS_KEY: (1, c["max_position_embeddings"]),
  }
  return shapes, {*_POOLER, _POSITION_IDS_KEY}


def _hints(unknown: list[str], prefix: str) -> list[str]:
  """Explanations for common kinds of unknown keys."""
  hints = []

  def any_key(*parts):
    return common.any_contains(unknown, *parts)

  fairseq = ("sentence_encoder.", "regression_head.", "modality_encoders.", "_ema")
  if any_key(*fairseq) or any(k.startswith("encoder.lm_head.") for k in unknown):
    hints.append(
      "hint: fairseq data2vec names (encoder.sentence_encoder.*, regression_head, _ema, "
      "modality_encoders.*); this converter reads HF state dicts, importing a fairseq checkpoint "
      "is a separate converter"
    )
  if any(k.startswith(("lm_head.", "classifier.", "qa_outputs.")) for k in unknown):
    hints.append(
      "hint: task-head keys (lm_head.*: the MLM head of Data2VecTextForMaskedLM, as in the "
      "released checkpoints; classifier.* / qa_outputs.*: fine-tuning heads) have no counterpart: "
      f"drop them and pass prefix={TASK_MODEL_PREFIX!r} (or {ROBERTA_PREFIX!r})"
    )
  if any_key("distance_embedding"):
    hints.append("hint: relative position embeddings (position_embedding_type) are not supported")
  if any_key("crossattention"):
    hints.append("hint: cross-attention (a decoder) is not supported")
  if any_key("feature_extractor.", "feature_projection.", "masked_spec_embed", "encoder.layers."):
    hints.append("hint: this looks like a Data2VecAudio state dict (see d2v_jax.convert.hf_audio)")
  if any_key("patch_embeddings", "cls_token", "relative_position_bias", "layernorm_before"):
    hints.append("hint: this looks like a Data2VecVision state dict (see d2v_jax.convert.hf_image)")
  return hints + common.prefix_hints(unknown, prefix, (TASK_MODEL_PREFIX, ROBERTA_PREFIX))


# ----------------------------------------------------------------------------- task heads

SEQUENCE_CLASSIFIER = "Data2VecTextForSequenceClassification"
_CLASSIFIER = "classifier.out_proj.weight"


def _head_keys(dim: int, num_outputs: int) -> common.KeyTable:
  """RoBERTa's classification head: `classifier.{dense, out_proj}` -> our `SentenceHead`."""
  keys = common.KeyTable()
  keys.add_linear("classifier.dense", "head/dense", dim, dim)
  keys.add_linear("classifier.out_proj", "head/out", num_outputs, dim)
  return keys


def head_from_hf(hf_config: Mapping[str, Any], state_dict: Mapping[str, Any]) -> common.Head | None:
  """The sequence classification head of a task-model state dict (None: no head).

  One output is a regression (GLUE STS-B), as in HF. The class count is read off the weights and
  must agree with the config's `id2label` if it has one.
  """
  if _CLASSIFIER not in state_dict:
    return None
  c = common.config_dict(hf_config)
  num_outputs, dim = common.classifier_shape(c, state_dict, _CLASSIFIER)
  dropout = c.get("classifier_dropout")
  config = dict(
    task="regress" if num_outputs == 1 else "classify",
    num_outputs=num_outputs,
    dropout=float(c.get("hidden_dropout_prob", 0.1) if dropout is None else dropout),
  )
  return common.Head(SEQUENCE_CLASSIFIER, config, _head_keys(dim, num_outputs))


def params_from_hf(
  state_dict: Mapping[str, Any],
  hf_config: Mapping[str, Any],
  *,
  init_params: Mapping[str, Any] | None = None,
  prefix: str = "",
  head: common.Head | None = None,
) -> dict:
  """HF `Data2VecTextModel` state dict -> our `params` tree (the `params` collection).

  Args:
    state_dict: HF name -> array (numpy, or anything `np.asarray` accepts).
    hf_config: the HF config as a dict.
    init_params: optional freshly initialised `params` of our model with the same config. If given,
      the result is complete: `final_proj` is copied from it, and every converted leaf is checked
      against its shape (leaves that HF replaces may be `jax.ShapeDtypeStruct`s). If None, the
      result holds only what HF provides.
    prefix: prefix of the base-model keys, e.g. `TASK_MODEL_PREFIX` for a
      `Data2VecTextForMaskedLM` state dict. Keys outside it (task heads) are reported as unknown,
      not dropped.
    head: `head_from_hf` of a sequence classification state dict: its head is converted too
      (our `FineTuneModel`'s `head`), and `init_params` are that model's.

  Returns:
    A nested dict of float32 numpy arrays. `frontend/position_embed/embedding` is HF's position
    table plus the token type 0 row.

  Raises:
    ConversionError: listing every unknown, missing or mis-shaped key, token types other than 0
      that would be lost, and a stored `embeddings.position_ids` that is not `arange`.
  """
  c = common.config_dict(hf_config)
  config_from_hf(c)  # validates the architecture before we trust its sizes
  expected = expected_keys(c)
  other_shapes, optional = _other_keys(c)
  shapes = {**expected.shapes(), **other_shapes}

  def check_buffers(given):
    """Token types other than 0 that would be lost; a position_ids buffer that is not arange."""
    other = []
    if TOKEN_TYPE_KEY in given and tuple(np.shape(given[TOKEN_TYPE_KEY])) == shapes[TOKEN_TYPE_KEY]:
      types = np.asarray(given[TOKEN_TYPE_KEY], dtype=np.float32)
      if not np.array_equal(types[1:], np.broadcast_to(types[:1], types[1:].shape)):
        other.append(
          f"{prefix + TOKEN_TYPE_KEY}: {len(types)} token types with different rows; our model "
          "has no token types (it computes HF's output for token_type_ids = 0), so types 1.. "
          "would be lost"
        )
    ids = given.get(_POSITION_IDS_KEY)
    if _POSITION_IDS_KEY in given and np.shape(ids) == shapes[_POSITION_IDS_KEY]:
      if not np.array_equal(ids[0], np.arange(c["max_position_embeddings"])):
        other.append(f"{prefix + _POSITION_IDS_KEY}: not arange(max_position_embeddings)")
    return other

  given = common.check_state_dict(
    state_dict,
    shapes,
    what="HF Data2VecText state dict",
    prefix=prefix,
    optional=optional,
    hints=_hints,
    extra=check_buffers,
    head_shapes=head.keys.shapes() if head else None,
  )
  # The token type 0 row is folded into the positions (see the module docstring).
  types = np.asarray(given[TOKEN_TYPE_KEY], np.float32)[0]
  given = {**given, POSITION_KEY: np.asarray(given[POSITION_KEY], np.float32) + types}
  return common.task_params(given, expected, head, init_params)


def init_shapes_and_head(model: data2vec.Data2Vec, seed: int) -> dict:
  """`init_params` for `params_from_hf`: the full tree as shapes, real values for `final_proj`
  (see `common.init_shapes_and_head`)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  padding = jnp.zeros((1, 1), bool)
  return common.init_shapes_and_head(model, (tokens, padding), seed)


def build_from_hf(
  state_dict: Mapping[str, Any],
  hf_config: Mapping[str, Any],
  *,
  seed: int = 0,
  prefix: str = "",
) -> tuple[data2vec.Data2Vec, ml_collections.ConfigDict, dict]:
  """Builds our text model from an HF checkpoint: (model, model config, complete params).

  `final_proj` comes from our own initialisation with `seed`. The model takes
  `(input_ids, padding_mask)` with `padding_mask = input_ids == model_cfg.pad_id`.
  """
  model_cfg = config_from_hf(hf_config)
  model = data2vec.build_model("text", model_cfg)
  init_params = init_shapes_and_head(model, seed)
  params = params_from_hf(state_dict, hf_config, init_params=init_params, prefix=prefix)
  return model, model_cfg, params


# ----------------------------------------------------------------------------- export


def hf_config_from_params(
  params: Mapping[str, Any],
  *,
  pad_id: int = 1,
  layer_norm_eps: float = ORIGINAL_LAYER_NORM_EPS,
) -> dict:
  """The `Data2VecTextConfig` fields (as a dict) of an HF model that holds our `params`.

  Sizes are read off the parameter shapes. The pad id is not (it is an attribute of our model, not
  a parameter): pass the model's if it is not 1, and its `layer_norm_eps` if it is not 1e-5.
  `type_vocab_size` is 1 (the exported row is zero); bos/eos are RoBERTa's 0 and 2. Dropouts are 0
  (set them for fine-tuning).
  """
  frontend = params["frontend"]
  blocks = params["encoder"]["blocks"]
  layer = blocks["layer_00"]
  dim, heads, _ = np.shape(layer["attention"]["query"]["kernel"])
  rows = np.shape(frontend["position_embed"]["embedding"])[0]
  if rows <= pad_id + 1:
    raise ConversionError(f"position table of {rows} rows has no position after pad_id {pad_id}")
  return dict(
    model_type="data2vec-text",
    vocab_size=int(np.shape(frontend["token_embed"]["embedding"])[0]),
    hidden_size=int(dim),
    num_hidden_layers=len(blocks),
    num_attention_heads=int(heads),
    intermediate_size=int(np.shape(layer["fc1"]["kernel"])[1]),
    hidden_act="gelu",
    max_position_embeddings=int(rows),
    type_vocab_size=1,
    layer_norm_eps=float(layer_norm_eps),
    pad_token_id=int(pad_id),
    bos_token_id=0,
    eos_token_id=2,
    is_decoder=False,
    add_cross_attention=False,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
  )


def hf_head_config(head_cfg: Mapping[str, Any]) -> dict:
  """The HF config fields of a `Data2VecTextForSequenceClassification` with our `config.head`."""
  num_outputs = int(head_cfg["num_outputs"])
  return dict(
    architectures=[SEQUENCE_CLASSIFIER],
    **common.label_fields(num_outputs),
    problem_type="regression" if head_cfg["task"] == "regress" else None,
    classifier_dropout=float(head_cfg.get("dropout", 0.0)),
  )


def params_to_hf(
  params: Mapping[str, Any], *, pad_id: int = 1, prefix: str = ""
) -> dict[str, np.ndarray]:
  """Our text `params` -> an HF `Data2VecTextModel` state dict (float32 numpy arrays).

  The inverse of `params_from_hf` for the config `hf_config_from_params(params, pad_id=pad_id)`:
  our position table (token types folded in) becomes HF's, with a zero token type row. No pooler
  (build the HF model with `add_pooling_layer=False`); `final_proj` has no HF counterpart and is
  dropped. `prefix` (e.g. `TASK_MODEL_PREFIX`) is prepended to every key.

  Raises:
    ConversionError: if `params` has leaves this mapping does not cover (other than
      `final_proj`), or lacks some it needs.
  """
  expected = expected_keys(hf_config_from_params(params, pad_id=pad_id)).prefixed(prefix)
  if "head" in params:  # a fine-tuned SentenceHead
    dim, num_outputs = np.shape(params["head"]["out"]["kernel"])
    expected.update(_head_keys(int(dim), int(num_outputs)))
  state_dict = common.export_state_dict(params, expected, model_name="Data2VecText")
  dim = expected[prefix + POSITION_KEY].hf_shape[1]
  state_dict[prefix + TOKEN_TYPE_KEY] = np.zeros((1, dim), np.float32)
  return state_dict
