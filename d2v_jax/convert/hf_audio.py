"""HF transformers `Data2VecAudioModel` -> d2v-jax audio model (spec §1.1 audio, §4 HF names).

Pure numpy; torch is never imported. Inputs are the HF config as a dict (`config.to_dict()` or the
checkpoint's `config.json`) and the state dict as numpy arrays (e.g.
`safetensors.numpy.load_file("model.safetensors")`).

- `config_from_hf`: HF config -> our `config.model` (variant, explicit sizes, dropouts, dtype).
  Options our model does not implement (conv bias, other activations or kernels, an adapter, a
  LayerNorm eps other than 1e-5) raise instead of being approximated.
- `params_from_hf`: HF state dict -> our `params` tree. Every key must map and every expected key
  must be present with its exact shape; otherwise one `ConversionError` lists all offending keys.
- `build_from_hf`: both, plus our model and a complete parameter tree, ready for `model.apply`.

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

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from d2v_jax.models import audio, data2vec, variants

# Top-level entries of our tree that HF never provides (see the module docstring).
NOT_IN_HF = ("final_proj",)

# Prefix of the base model inside HF task models (`Data2VecAudioForCTC` etc.): pass it as `prefix`.
TASK_MODEL_PREFIX = "data2vec_audio."


class ConversionError(ValueError):
  """The HF config or state dict does not map exactly onto our model."""


@dataclasses.dataclass(frozen=True)
class _Entry:
  path: tuple[str, ...]  # path in our params tree
  hf_shape: tuple[int, ...]  # expected shape in the state dict
  to_ours: Callable[[np.ndarray], np.ndarray]


def _get(hf_config: Any) -> dict:
  return hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)


def config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """HF `Data2VecAudioConfig` (as a dict) -> our `config.model` for `build_model("audio", ...)`.

  Raises:
    ConversionError: if the HF config uses an option our model does not implement.
  """
  c = _get(hf_config)
  problems = []

  def require(ok, message):
    if not ok:
      problems.append(message)

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
  if problems:
    raise ConversionError("Unsupported Data2VecAudio config:\n  " + "\n  ".join(problems))

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
  # The explicit sizes override the variant's in `build_model`; the variant is only a label, so
  # name the one that matches if any.
  variant = next(
    (v for v in ("tiny", "base", "large") if variants.decode_variant("audio", v) == sizes), "base"
  )
  return ml_collections.ConfigDict(
    dict(
      variant=variant,
      **sizes,
      dropout=float(c["hidden_dropout"]),
      attention_dropout=float(c["attention_dropout"]),
      activation_dropout=float(c["activation_dropout"]),
      layerdrop=float(c["layerdrop"]),
      # HF's feat_proj_dropout (after the projection) has no counterpart; it is 0 in data2vec.
      dtype="float32",
    )
  )


def _expected_keys(c: dict) -> dict[str, _Entry]:
  """Every HF key of a Data2VecAudioModel with `c`, its expected shape and its conversion."""
  dim, heads, mlp = c["hidden_size"], c["num_attention_heads"], c["intermediate_size"]
  head_dim = dim // heads
  conv_dim = c["conv_dim"][0]
  pos_k, groups = c["conv_pos_kernel_size"], c["num_conv_pos_embedding_groups"]

  conv = lambda w: w.transpose(2, 1, 0)  # noqa: E731  [out, in/g, k] -> [k, in/g, out]
  same = lambda w: w  # noqa: E731
  linear = lambda w: w.T  # noqa: E731
  keys = {}

  def add(hf_name, path, hf_shape, fn=same):
    keys[hf_name] = _Entry(tuple(path.split("/")), tuple(hf_shape), fn)

  def add_norm(hf_name, path, size):
    add(f"{hf_name}.weight", f"{path}/scale", (size,))
    add(f"{hf_name}.bias", f"{path}/bias", (size,))

  fe = "frontend/feature_extractor"
  for j, k in enumerate(c["conv_kernel"]):
    hf, in_dim = f"feature_extractor.conv_layers.{j}", 1 if j == 0 else conv_dim
    add(f"{hf}.conv.weight", f"{fe}/conv_{j}/kernel", (conv_dim, in_dim, k), conv)
    add_norm(f"{hf}.layer_norm", f"{fe}/norm_{j}", conv_dim)
  add_norm("feature_projection.layer_norm", "frontend/feature_norm", conv_dim)
  add("feature_projection.projection.weight", "frontend/projection/kernel", (dim, conv_dim), linear)
  add("feature_projection.projection.bias", "frontend/projection/bias", (dim,))

  for j in range(c["num_conv_pos_embeddings"]):
    hf = f"encoder.pos_conv_embed.layers.{j}.conv"
    add(f"{hf}.weight", f"encoder/pos_conv/conv_{j}/kernel", (dim, dim // groups, pos_k), conv)
    add(f"{hf}.bias", f"encoder/pos_conv/conv_{j}/bias", (dim,))
  add_norm("encoder.layer_norm", "encoder/layer_norm", dim)

  for i in range(c["num_hidden_layers"]):
    hf, ours = f"encoder.layers.{i}", f"encoder/blocks/layer_{i:02d}"
    for proj, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
      add(
        f"{hf}.attention.{proj}.weight",
        f"{ours}/attention/{name}/kernel",
        (dim, dim),
        lambda w: w.T.reshape(dim, heads, head_dim),
      )
      add(
        f"{hf}.attention.{proj}.bias",
        f"{ours}/attention/{name}/bias",
        (dim,),
        lambda b: b.reshape(heads, head_dim),
      )
    add(
      f"{hf}.attention.out_proj.weight",
      f"{ours}/attention/out/kernel",
      (dim, dim),
      lambda w: w.T.reshape(heads, head_dim, dim),
    )
    add(f"{hf}.attention.out_proj.bias", f"{ours}/attention/out/bias", (dim,))
    add_norm(f"{hf}.layer_norm", f"{ours}/attention_norm", dim)
    ff = f"{hf}.feed_forward"
    add(f"{ff}.intermediate_dense.weight", f"{ours}/fc1/kernel", (mlp, dim), linear)
    add(f"{ff}.intermediate_dense.bias", f"{ours}/fc1/bias", (mlp,))
    add(f"{ff}.output_dense.weight", f"{ours}/fc2/kernel", (dim, mlp), linear)
    add(f"{ff}.output_dense.bias", f"{ours}/fc2/bias", (dim,))
    add_norm(f"{hf}.final_layer_norm", f"{ours}/ffn_norm", dim)

  add("masked_spec_embed", "mask_emb", (dim,))
  return keys


def _has_mask_embedding(c: dict) -> bool:
  """HF creates `masked_spec_embed` only when a SpecAugment probability is positive."""
  return c.get("mask_time_prob", 0.0) > 0.0 or c.get("mask_feature_prob", 0.0) > 0.0


def params_from_hf(
  state_dict: Mapping[str, Any],
  hf_config: Mapping[str, Any],
  *,
  init_params: Mapping[str, Any] | None = None,
  prefix: str = "",
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

  Returns:
    A nested dict of float32 numpy arrays.

  Raises:
    ConversionError: listing every unknown, missing or mis-shaped key.
  """
  c = _get(hf_config)
  config_from_hf(c)  # validates the architecture before we trust its sizes
  expected = _expected_keys(c)
  optional = set() if _has_mask_embedding(c) else {"masked_spec_embed"}

  given = {}
  unknown = []
  for key, value in state_dict.items():
    if key.startswith(prefix) and key[len(prefix) :] in expected:
      given[key[len(prefix) :]] = value
    else:
      unknown.append(key)
  missing = [prefix + k for k in expected if k not in given and k not in optional]
  misshaped = [
    f"{prefix + k}: got {tuple(np.shape(v))}, expected {expected[k].hf_shape}"
    for k, v in given.items()
    if tuple(np.shape(v)) != expected[k].hf_shape
  ]
  if unknown or missing or misshaped:
    lines = []
    if unknown:
      lines.append(f"unknown keys ({len(unknown)}): " + ", ".join(sorted(unknown)))
      if any("weight_g" in k or "parametrizations" in k for k in unknown):
        lines.append(
          "hint: weight-norm keys belong to wav2vec 2.0; Data2VecAudio's pos conv has none"
        )
    if missing:
      lines.append(f"missing keys ({len(missing)}): " + ", ".join(sorted(missing)))
    if misshaped:
      lines.append(f"mis-shaped keys ({len(misshaped)}): " + "; ".join(sorted(misshaped)))
    raise ConversionError("HF Data2VecAudio state dict does not match:\n  " + "\n  ".join(lines))

  flat = {
    expected[k].path: expected[k].to_ours(np.asarray(v, dtype=np.float32)) for k, v in given.items()
  }
  if init_params is not None:
    flat = _merge(flat, init_params)
  return traverse_util.unflatten_dict(flat)


def _merge(converted: dict, init_params: Mapping[str, Any]) -> dict:
  """Completes `converted` from `init_params`; every leaf must line up in path and shape."""
  init = traverse_util.flatten_dict(dict(init_params))
  problems = [
    f"{'/'.join(p)}: converted {v.shape}, model {np.shape(init[p])}"
    for p, v in converted.items()
    if p in init and v.shape != np.shape(init[p])
  ]
  problems += [f"{'/'.join(p)}: not in the model" for p in converted if p not in init]
  allowed = {(name,) for name in NOT_IN_HF} | {("mask_emb",)}
  for p in init:
    if p not in converted and p[:1] not in allowed:
      problems.append(f"{'/'.join(p)}: in the model but not filled by the converter")
  if problems:
    raise ConversionError("Converted tree does not match the model:\n  " + "\n  ".join(problems))
  return {p: converted.get(p, np.asarray(init[p])) for p in init}


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
  rngs = {"params": jax.random.key(seed)}
  # The full tree only as shapes (tracing, no XLA compile: RNG-heavy init compiles slowly on
  # CPU), to check the converted tree against; real values only for what HF lacks. Running just
  # `predict` creates `final_proj` and, through `setup`, `mask_emb`; flax derives each module's
  # init RNG from its path, so they equal a full `model.init` with the same seed.
  audio_in = jnp.zeros((1, 400)), jnp.zeros((1, 400), bool)  # one receptive field -> one frame
  shapes = jax.eval_shape(lambda: model.init(rngs, *audio_in))["params"]
  head = model.init(rngs, jnp.zeros((1, model_cfg.dim)), method="predict")["params"]
  init_params = {**shapes, **jax.device_get(head)}
  params = params_from_hf(state_dict, hf_config, init_params=init_params, prefix=prefix)
  return model, model_cfg, params
