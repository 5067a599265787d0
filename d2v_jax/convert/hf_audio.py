"""HF transformers `Data2VecAudioModel` <-> d2v-jax audio model (spec §1.1 audio, §4 HF names).

Pure numpy; torch is never imported. Inputs are the HF config as a dict (`config.to_dict()` or the
checkpoint's `config.json`) and the state dict as numpy arrays (e.g.
`safetensors.numpy.load_file("model.safetensors")`).

- `config_from_hf`: HF config -> our `config.model` (variant, explicit sizes, dropouts, dtype).
  Options our model does not implement (conv bias, other activations or kernels, an adapter, a
  LayerNorm eps other than 1e-5) raise instead of being approximated.
- `params_from_hf`: HF state dict -> our `params` tree. Every key must map and every expected key
  must be present with its exact shape; otherwise one `ConversionError` lists all offending keys.
- `build_from_hf`: both, plus our model and a complete parameter tree, ready for `model.apply`.
- `head_from_hf`: the CTC head of a `Data2VecAudioForCTC` (fairseq's `w2v_encoder.proj`).
- `params_to_hf` / `hf_config_from_params` / `hf_head_config`: the inverse, our `params` -> HF
  state dict and config.

Parameters without an HF counterpart: our `final_proj` (the data2vec regression head, which HF
does not have; released fairseq checkpoints store it, but HF conversion drops it), and `mask_emb`
when the HF model has no `masked_spec_embed` (HF creates it only if `mask_time_prob > 0` or
`mask_feature_prob > 0`). `params_from_hf` leaves them out unless `init_params` (a freshly
initialised tree of our model) is passed, in which case they are taken from it; `build_from_hf`
always does that. Either way they are never silently invented.

Layouts: torch Conv1d [out, in/groups, k] -> Flax [k, in/groups, out]; Linear [out, in] -> Dense
[in, out]; q/k/v Linear -> DenseGeneral [D, H, Dh] (torch splits heads as `view(..., H, Dh)`, so
output unit h*Dh + d is head h, dim d); out_proj -> [H, Dh, D]. Data2VecAudio's positional conv has
no weight norm (unlike wav2vec 2.0), so `weight_g`/`weight_v` keys are rejected as unknown.
"""

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from d2v_jax.convert import common
from d2v_jax.models import audio, data2vec

# One error type for every converter: `except ConversionError` catches every modality.
ConversionError = common.ConversionError

# Top-level entries of our tree that HF never provides (see the module docstring).
NOT_IN_HF = common.NOT_IN_HF

# Prefix of the base model inside HF task models (`Data2VecAudioForCTC` etc.): pass it as `prefix`.
TASK_MODEL_PREFIX = "data2vec_audio."


def config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """HF `Data2VecAudioConfig` (as a dict) -> our `config.model` for `build_model("audio", ...)`.

  Raises:
    ConversionError: if the HF config uses an option our model does not implement.
  """
  c = common.config_dict(hf_config)
  require = common.Requirements()
  model_type = c.get("model_type", "data2vec-audio")
  require(model_type == "data2vec-audio", f"model_type is {model_type!r}, not 'data2vec-audio'")
  conv_dim = list(c["conv_dim"])
  require(
    len(set(conv_dim)) == 1 and len(conv_dim) == len(audio.CONV_KERNELS),
    f"conv_dim {conv_dim} is not {len(audio.CONV_KERNELS)} equal widths (ours has one width)",
  )
  # The CNN geometry is fixed in our FeatureExtractor (and in the frame-count arithmetic).
  require(
    tuple(c["conv_kernel"]) == audio.CONV_KERNELS,
    f"conv_kernel {c['conv_kernel']} != {audio.CONV_KERNELS}",
  )
  require(
    tuple(c["conv_stride"]) == audio.CONV_STRIDES,
    f"conv_stride {c['conv_stride']} != {audio.CONV_STRIDES}",
  )
  require(not c.get("conv_bias", False), "conv_bias=True (our CNN convs have no bias)")
  for key in ("hidden_act", "feat_extract_activation"):
    require(c.get(key, "gelu") == "gelu", f"{key} is {c.get(key)!r}; ours is exact (erf) GELU")
  # HF applies layer_norm_eps to the projection, encoder and block LayerNorms; ours are 1e-5.
  eps = c.get("layer_norm_eps", 1e-5)
  require(math.isclose(eps, 1e-5), f"layer_norm_eps {eps} != 1e-5")
  require(not c.get("add_adapter", False), "add_adapter=True (no adapter in our model)")
  require(not c.get("do_stable_layer_norm", False), "do_stable_layer_norm=True (ours is post-LN)")
  dim, heads = c["hidden_size"], c["num_attention_heads"]
  require(dim % heads == 0, f"hidden_size {dim} not divisible by num_attention_heads {heads}")
  groups = c["num_conv_pos_embedding_groups"]
  require(dim % groups == 0, f"hidden_size {dim} not divisible by pos-conv groups {groups}")
  require.raise_if_any("Data2VecAudio")

  sizes = dict(
    num_layers=c["num_hidden_layers"],
    dim=dim,
    num_heads=heads,
    mlp_dim=c["intermediate_size"],
    conv_dim=conv_dim[0],
    # HF `num_conv_pos_embeddings` is the NUMBER of pos-conv layers (spec §4), not a kernel size.
    pos_conv_depth=c["num_conv_pos_embeddings"],
    pos_conv_kernel=c["conv_pos_kernel_size"],
    pos_conv_groups=groups,
  )
  return ml_collections.ConfigDict(
    dict(
      variant=common.variant_for("audio", sizes),
      **sizes,
      dropout=float(c["hidden_dropout"]),
      attention_dropout=float(c["attention_dropout"]),
      activation_dropout=float(c["activation_dropout"]),
      layerdrop=float(c["layerdrop"]),
      # HF's feat_proj_dropout (after the projection) has no counterpart; it is 0 in data2vec.
      dtype="float32",
    )
  )


def expected_keys(c: dict) -> common.KeyTable:
  """Every HF key of a Data2VecAudioModel with `c`, its expected shape and its conversions."""
  dim, heads, mlp = c["hidden_size"], c["num_attention_heads"], c["intermediate_size"]
  conv_dim = c["conv_dim"][0]
  pos_k, groups = c["conv_pos_kernel_size"], c["num_conv_pos_embedding_groups"]

  conv = lambda w: w.transpose(2, 1, 0)  # noqa: E731  [out, in/g, k] <-> [k, in/g, out]
  keys = common.KeyTable()

  fe = "frontend/feature_extractor"
  for j, k in enumerate(c["conv_kernel"]):
    hf, in_dim = f"feature_extractor.conv_layers.{j}", 1 if j == 0 else conv_dim
    keys.add(f"{hf}.conv.weight", f"{fe}/conv_{j}/kernel", (conv_dim, in_dim, k), conv, conv)
    keys.add_norm(f"{hf}.layer_norm", f"{fe}/norm_{j}", conv_dim)
  keys.add_norm("feature_projection.layer_norm", "frontend/feature_norm", conv_dim)
  keys.add_linear("feature_projection.projection", "frontend/projection", dim, conv_dim)

  for j in range(c["num_conv_pos_embeddings"]):
    hf, ours = f"encoder.pos_conv_embed.layers.{j}.conv", f"encoder/pos_conv/conv_{j}"
    keys.add(f"{hf}.weight", f"{ours}/kernel", (dim, dim // groups, pos_k), conv, conv)
    keys.add(f"{hf}.bias", f"{ours}/bias", (dim,))
  keys.add_norm("encoder.layer_norm", "encoder/layer_norm", dim)

  for i in range(c["num_hidden_layers"]):
    hf, ours = f"encoder.layers.{i}", f"encoder/blocks/layer_{i:02d}"
    for proj, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
      keys.add_heads_in(f"{hf}.attention.{proj}", f"{ours}/attention/{name}", dim, heads)
    keys.add_heads_out(f"{hf}.attention.out_proj", f"{ours}/attention/out", dim, heads)
    keys.add_norm(f"{hf}.layer_norm", f"{ours}/attention_norm", dim)
    keys.add_linear(f"{hf}.feed_forward.intermediate_dense", f"{ours}/fc1", mlp, dim)
    keys.add_linear(f"{hf}.feed_forward.output_dense", f"{ours}/fc2", dim, mlp)
    keys.add_norm(f"{hf}.final_layer_norm", f"{ours}/ffn_norm", dim)

  keys.add("masked_spec_embed", "mask_emb", (dim,))
  return keys


def _has_mask_embedding(c: dict) -> bool:
  """HF creates `masked_spec_embed` only when a SpecAugment probability is positive."""
  return c.get("mask_time_prob", 0.0) > 0.0 or c.get("mask_feature_prob", 0.0) > 0.0


def _hints(unknown: list[str], prefix: str) -> list[str]:
  """Explanations for common kinds of unknown keys."""
  if any("weight_g" in k or "parametrizations" in k for k in unknown):
    return ["hint: weight-norm keys belong to wav2vec 2.0; Data2VecAudio's pos conv has none"]
  return []


# ----------------------------------------------------------------------------- task heads

CTC_MODEL = "Data2VecAudioForCTC"
_LM_HEAD = "lm_head.weight"


def _head_keys(dim: int, vocab_size: int) -> common.KeyTable:
  keys = common.KeyTable()
  keys.add_linear("lm_head", "head/proj", vocab_size, dim)  # fairseq's w2v_encoder.proj
  return keys


def head_from_hf(hf_config: Mapping[str, Any], state_dict: Mapping[str, Any]) -> common.Head | None:
  """The CTC head of a `Data2VecAudioForCTC` state dict (None: no head).

  `Data2VecAudioForSequenceClassification` (a projector and a classifier) is refused: our
  speech classifier is one Linear on the pooled frames.
  """
  c = common.config_dict(hf_config)
  if any(k.startswith(("projector.", "classifier.")) for k in state_dict):
    raise ConversionError(
      "Data2VecAudioForSequenceClassification heads (projector + classifier) are not supported: "
      "our speech classifier (configs/audio_cls.py) is a single Linear on the mean-pooled frames"
    )
  if _LM_HEAD not in state_dict:
    return None
  vocab_size, dim = np.shape(state_dict[_LM_HEAD])
  if vocab_size != c.get("vocab_size", vocab_size):
    raise ConversionError(f"{_LM_HEAD} has {vocab_size} rows but vocab_size is {c['vocab_size']}")
  config = dict(task="ctc", num_outputs=int(vocab_size), dropout=float(c.get("final_dropout", 0.0)))
  return common.Head(CTC_MODEL, config, _head_keys(int(dim), int(vocab_size)))


def params_from_hf(
  state_dict: Mapping[str, Any],
  hf_config: Mapping[str, Any],
  *,
  init_params: Mapping[str, Any] | None = None,
  prefix: str = "",
  head: common.Head | None = None,
) -> dict:
  """HF `Data2VecAudioModel` state dict -> our `params` tree (the `params` collection).

  Args:
    state_dict: HF name -> array (numpy, or anything `np.asarray` accepts).
    hf_config: the HF config as a dict.
    init_params: optional freshly initialised `params` of our model with the same config. If given,
      the result is complete: entries HF lacks (`final_proj`, and `mask_emb` if the HF model has no
      `masked_spec_embed`) are copied from it, and every converted leaf is checked against its
      shape (leaves that HF replaces may be `jax.ShapeDtypeStruct`s). If None, the result holds
      only what HF provides.
    prefix: prefix of the base-model keys, e.g. `TASK_MODEL_PREFIX` for a `Data2VecAudioForCTC`
      state dict. Keys outside it (task heads) are reported as unknown, not dropped.
    head: `head_from_hf` of a CTC state dict: its `lm_head` is converted too (our
      `FineTuneModel`'s `head`), and `init_params` are that model's.

  Returns:
    A nested dict of float32 numpy arrays.

  Raises:
    ConversionError: listing every unknown, missing or mis-shaped key.
  """
  c = common.config_dict(hf_config)
  config_from_hf(c)  # validates the architecture before we trust its sizes
  expected = expected_keys(c)
  given = common.check_state_dict(
    state_dict,
    expected.shapes(),
    what="HF Data2VecAudio state dict",
    prefix=prefix,
    optional=() if _has_mask_embedding(c) else ("masked_spec_embed",),
    hints=_hints,
    head_shapes=head.keys.shapes() if head else None,
  )
  return common.task_params(given, expected, head, init_params)


def build_from_hf(
  state_dict: Mapping[str, Any],
  hf_config: Mapping[str, Any],
  *,
  seed: int = 0,
  prefix: str = "",
) -> tuple[data2vec.Data2Vec, ml_collections.ConfigDict, dict]:
  """Builds our audio model from an HF checkpoint: (model, model config, complete params).

  `final_proj` (and `mask_emb` if HF has none) come from our own initialisation with `seed`.
  """
  model_cfg = config_from_hf(hf_config)
  model = data2vec.build_model("audio", model_cfg)
  audio_in = jnp.zeros((1, 400)), jnp.zeros((1, 400), bool)  # one receptive field -> one frame
  init_params = common.init_shapes_and_head(model, audio_in, seed)
  params = params_from_hf(state_dict, hf_config, init_params=init_params, prefix=prefix)
  return model, model_cfg, params


# ----------------------------------------------------------------------------- export


def hf_config_from_params(params: Mapping[str, Any]) -> dict:
  """The `Data2VecAudioConfig` fields (as a dict) of an HF model that holds our `params`.

  Sizes are read off the parameter shapes (the positional conv's kernel [k, D/groups, D] gives
  its width and groups). Dropouts are 0 (set them for fine-tuning); `mask_time_prob` is 0.05
  where there is a mask embedding (HF keeps `masked_spec_embed` only then), else 0.
  """
  frontend, encoder = params["frontend"], params["encoder"]
  layer = encoder["blocks"]["layer_00"]
  dim, heads, _ = np.shape(layer["attention"]["query"]["kernel"])
  conv_dim = np.shape(frontend["projection"]["kernel"])[0]
  pos_kernel, group_width, _ = np.shape(encoder["pos_conv"]["conv_0"]["kernel"])
  return dict(
    model_type="data2vec-audio",
    hidden_size=int(dim),
    num_hidden_layers=len(encoder["blocks"]),
    num_attention_heads=int(heads),
    intermediate_size=int(np.shape(layer["fc1"]["kernel"])[1]),
    hidden_act="gelu",
    feat_extract_activation="gelu",
    conv_dim=[int(conv_dim)] * len(audio.CONV_KERNELS),
    conv_kernel=list(audio.CONV_KERNELS),
    conv_stride=list(audio.CONV_STRIDES),
    conv_bias=False,
    num_conv_pos_embeddings=len(encoder["pos_conv"]),
    conv_pos_kernel_size=int(pos_kernel),
    num_conv_pos_embedding_groups=int(dim // group_width),
    layer_norm_eps=1e-5,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    feat_proj_dropout=0.0,
    final_dropout=0.0,
    layerdrop=0.0,
    mask_time_prob=0.05 if "mask_emb" in params else 0.0,
    mask_feature_prob=0.0,
    add_adapter=False,
    do_stable_layer_norm=False,
  )


def hf_head_config(head_cfg: Mapping[str, Any]) -> dict:
  """The HF config fields of a `Data2VecAudioForCTC` with our `config.head`."""
  return dict(
    architectures=[CTC_MODEL],
    vocab_size=int(head_cfg["num_outputs"]),
    final_dropout=float(head_cfg.get("dropout", 0.0)),
    pad_token_id=0,  # the CTC blank: our LetterVocabulary's index 0, as fairseq's
  )


def params_to_hf(params: Mapping[str, Any], *, prefix: str = "") -> dict[str, np.ndarray]:
  """Our audio `params` -> an HF `Data2VecAudioModel` (or, with a CTC `head`, `...ForCTC`) state
  dict (float32 numpy arrays), for the config `hf_config_from_params(params)`.

  `final_proj` has no HF counterpart and is dropped. `prefix` (`TASK_MODEL_PREFIX` for a task
  model) is prepended to every base-model key.

  Raises:
    ConversionError: if `params` has leaves this mapping does not cover (other than
      `final_proj`), or lacks some it needs.
  """
  c = hf_config_from_params(params)
  expected = expected_keys(c)
  if "mask_emb" not in params:
    del expected["masked_spec_embed"]
  expected = expected.prefixed(prefix)
  if "head" in params:
    dim, vocab_size = np.shape(params["head"]["proj"]["kernel"])
    expected.update(_head_keys(int(dim), int(vocab_size)))
  return common.export_state_dict(params, expected, model_name="Data2VecAudio")
