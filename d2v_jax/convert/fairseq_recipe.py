"""What a fairseq data2vec checkpoint carries besides its encoder (issue 24): its regression
head (1.0), and the pretraining recipe of its own config (spec §1.2-§1.4, §2.3).

`regression_head`: fairseq's speech `final_proj` and text `encoder.regression_head` (HF has no
place for them, so `fairseq_v1` names them dropped) as our `final_proj` parameters, so that
continued pretraining of an imported run starts from the checkpoint's loss.

`apply_recipe`: each target, loss, EMA, masking, dropout and health field of the file's
`cfg.model` (and, for text, `cfg.task`'s masking) that this project has a field for, written into
our config, with a table row per field: the file's value, ours, where it came from. A setting
the project cannot represent (batch-norm targets, a one-layer text head, channel masking in
pretraining, a whole-model speech teacher) is a ConversionError naming it.
"""

import ast
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from d2v_jax.convert import common
from d2v_jax.models import data2vec


def _linear(state_dict, prefix: str) -> dict:
  """A torch Linear ([out, in] weight) as a flax Dense ([in, out] kernel)."""
  kernel = np.asarray(state_dict[f"{prefix}.weight"], np.float32).T
  return {"kernel": kernel, "bias": np.asarray(state_dict[f"{prefix}.bias"], np.float32)}


def regression_head(modality: str, state_dict: Mapping[str, Any]) -> tuple[dict | None, list]:
  """(our `final_proj` params, the source keys they came from) of a fairseq 1.0 `model` dict;
  (None, []) for a modality or file without one (fine-tuned files, BEiT: `lm_head`)."""
  if modality == "audio":
    for prefix in ("final_proj", "final_proj.0"):  # older files wrap it in a Sequential
      if f"{prefix}.weight" in state_dict:
        return _linear(state_dict, prefix), [f"{prefix}.weight", f"{prefix}.bias"]
  if modality == "image" and "lm_head.weight" in state_dict:
    return _linear(state_dict, "lm_head"), ["lm_head.weight", "lm_head.bias"]
  if modality == "text":
    keys = sorted(k for k in state_dict if k.startswith("encoder.regression_head."))
    if not keys:
      return None, []
    if keys != [f"encoder.regression_head.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]:
      raise common.ConversionError(
        f"The text regression head has the keys {keys}: d2v-jax's head is fairseq's "
        "head_layers=2 (Linear, GELU, Linear); other depths cannot be represented"
      )
    head = {
      "dense": _linear(state_dict, "encoder.regression_head.0"),
      "out": _linear(state_dict, "encoder.regression_head.2"),
    }
    return head, keys
  return None, []


def check_head_shapes(head: dict, ours: dict) -> None:
  """Raises ConversionError unless the checkpoint's head has our `final_proj`'s shapes."""
  got = {k: np.shape(v) for k, v in traverse_util.flatten_dict(head, sep="/").items()}
  want = {k: np.shape(v) for k, v in traverse_util.flatten_dict(dict(ours), sep="/").items()}
  if got != want:
    raise common.ConversionError(
      f"The checkpoint's regression head has shapes {got}, our final_proj {want}"
    )


@dataclasses.dataclass(frozen=True)
class Field:
  """One of our config fields and the fairseq field of `cfg.model` it reads (`{mod}`: the
  modality's part of a 2.0 config, `modalities.<modality>`)."""

  ours: str  # dotted path in our config
  source: str  # fairseq's field
  convert: Callable[[Any], Any] = lambda v: v
  neutral: Any = 0  # where our config lacks the field: the only file value it can stand for


def _scale(value):
  """fairseq's None (speech) or <= 0 (text) = 1/sqrt(D): data2vec 1.0's configs say -1."""
  return -1.0 if value is None or value <= 0 else float(value)


def _scale_v2(value):
  """data2vec 2.0's configs keep fairseq's None for 1/sqrt(D)."""
  return None if value is None or value <= 0 else float(value)


_HEALTH = (
  # fairseq's "var" is a standard deviation (`compute_var` returns its square root).
  Field("loop.min_target_std", "min_target_var", float),
  Field("loop.min_pred_std", "min_pred_var", float),
)


def _targets_loss_ema(scale: Callable[[Any], Any]) -> tuple[Field, ...]:
  """The fields every data2vec config of fairseq names alike (1.0 and 2.0, any modality)."""
  return (
    Field("targets.top_k", "average_top_k_layers", int),
    Field("loss.beta", "loss_beta", float),
    Field("loss.scale", "loss_scale", scale),
    Field("ema.decay", "ema_decay", float),
    Field("ema.end_decay", "ema_end_decay", float),
    Field("ema.anneal_steps", "ema_anneal_end_step", int),
  )


_FIELDS = {
  "audio": (
    *_targets_loss_ema(_scale),
    Field("masking.prob", "mask_prob", float),
    Field("masking.length", "mask_length", int),
    Field("model.dropout", "dropout", float),
    Field("model.attention_dropout", "attention_dropout", float),
    Field("model.activation_dropout", "activation_dropout", float),
    Field("model.layerdrop", "encoder_layerdrop", float),
    Field("model.feature_grad_mult", "feature_grad_mult", float),
    *_HEALTH,
  ),
  "text": (
    *_targets_loss_ema(_scale),
    Field("model.dropout", "transformer.dropout", float),
    Field("model.attention_dropout", "transformer.attention_dropout", float),
    Field("model.activation_dropout", "transformer.activation_dropout", float),
    Field("model.layerdrop", "transformer.encoder.layerdrop", float),
    *_HEALTH,
  ),
}
_MOD = "modalities.{mod}."
_FIELDS_V2 = (
  *_targets_loss_ema(_scale_v2),
  Field("masking.num_clones", "clone_batch", int, neutral=1),
  Field("masking.ratio", _MOD + "mask_prob", float),
  Field("masking.adjust", _MOD + "mask_prob_adjust", float),
  Field("masking.inverse", _MOD + "inverse_mask", bool, neutral=False),
  Field("masking.block", _MOD + "mask_length", int, neutral=1),  # text masks single tokens
  Field("model.mask_noise_std", _MOD + "mask_noise_std", float),
  Field("model.dropout", "encoder_dropout", float),
  Field("model.attention_dropout", "attention_dropout", float),
  Field("model.activation_dropout", "activation_dropout", float),
  Field("model.layerdrop", "layerdrop", float),
  Field("model.decoder.dim", _MOD + "decoder.decoder_dim", int, neutral=None),
  Field("model.decoder.kernel", _MOD + "decoder.decoder_kernel", int, neutral=None),
  Field("model.decoder.layers", _MOD + "decoder.decoder_layers", int, neutral=None),
  Field("model.decoder.groups", _MOD + "decoder.decoder_groups", int, neutral=None),
  Field("model.decoder.residual", _MOD + "decoder.decoder_residual", bool, neutral=None),
  Field("model.decoder.projection_layers", _MOD + "decoder.projection_layers", int, neutral=None),
  Field("model.decoder.input_dropout", _MOD + "decoder.input_dropout", float),
  *_HEALTH,
)


def _get(tree: Mapping[str, Any], path: str, missing=None):
  node = tree
  for part in path.split("."):
    if not isinstance(node, Mapping) or part not in node:
      return missing
    node = node[part]
  return node


def _norm_kind(cfg: Mapping[str, Any], flags: dict[str, str], what: str) -> tuple[str, list]:
  """Our normalisation name for fairseq's boolean flags (at most one may be set)."""
  on = [name for name in flags if cfg.get(name)]
  if len(on) > 1 or any(flags[name] is None for name in on):
    raise common.ConversionError(
      f"{what}: the checkpoint sets {', '.join(f'{n}=True' for n in on)}; d2v-jax normalises "
      "with one of instance or layer norm only"
    )
  return (flags[on[0]] if on else "none"), [n for n in flags if n in cfg]


_MISSING = object()


def apply_recipe(
  config, modality: str, cfg: Mapping[str, Any] | None, task_cfg=None, *, version: int = 1
) -> list:
  """Writes the checkpoint's recipe into `config` (see the module docstring); returns the table
  rows `{"field", "file", "ours", "from"}` for `conversion.json`."""
  cfg, rows = dict(cfg or {}), []

  def put(ours: str, value, source: str | None, raw=_MISSING, neutral=0):
    """Sets `ours` to `value` when the file has the field (`source`), and records the row."""
    *groups, name = ours.split(".")
    group = config
    for part in groups:
      group = group[part]
    file_value = None if source is None else (value if raw is _MISSING else raw)
    origin = f"cfg.{source}" if source else "not in the file"
    if name not in group:  # e.g. text has no layerdrop: only its neutral value fits
      if source is not None and value != neutral and not (neutral == 0 and not value):
        raise common.ConversionError(
          f"cfg.{source}={file_value!r}: d2v-jax's {config.modality} model has no {ours}"
        )
      rows.append({"field": ours, "file": file_value, "ours": None, "from": origin})
      return
    if source is None:
      origin = f"not in the file: this project's {group[name]!r}"
    else:
      group[name] = value
    rows.append({"field": ours, "file": file_value, "ours": group[name], "from": origin})

  if version == 1 and modality == "image":  # data2vec_vision's argparse recipe (BEiT)
    _beit_recipe(config, cfg, put)
    return rows
  fields = _FIELDS_V2 if version == 2 else _FIELDS[modality]
  for field in fields:
    source = field.source.replace("{mod}", modality)
    value = _get(cfg, source, _MISSING)
    if value is _MISSING or value is None and field.ours != "loss.scale":
      put(field.ours, None, None)
    else:
      put(field.ours, field.convert(value), f"model.{source}", value, field.neutral)
  layer_norm, layer_flags = _norm_kind(
    cfg,
    {
      "instance_norm_target_layer": "instance",
      "layer_norm_target_layer": "layer",
      "batch_norm_target_layer": None,
      "group_norm_target_layer": None,
    },
    "per-layer target norm",
  )
  flags = {name: cfg[name] for name in layer_flags}
  put("targets.layer_norm", layer_norm, "model." + "/".join(layer_flags) if flags else None, flags)
  final, final_flags = _norm_kind(
    cfg,
    {"instance_norm_targets": "instance", "layer_norm_targets": "layer"},
    "target norm after averaging",
  )
  flags = {name: cfg[name] for name in final_flags}
  put("targets.final_norm", final, "model." + "/".join(final_flags) if flags else None, flags)
  if version == 2:
    _v2_teacher(cfg, put)
  elif modality == "audio":
    _audio_teacher_and_masks(cfg, put)
  else:
    _text_teacher_and_masks(cfg, dict(task_cfg or {}), put)
  return rows


# With `ema_encoder_only=True` fairseq's 2.0 teacher is the blocks alone; everything else it
# reads (the context encoder: positions, its LayerNorm, ALiBi scales; images' patch embedding)
# is the student's, which our teacher copies instead of averaging.
BLOCKS_ONLY = (r"^(?!encoder/blocks/layer_)",)


def _v2_teacher(cfg, put) -> None:
  if "ema_encoder_only" in cfg:
    copied = BLOCKS_ONLY if cfg["ema_encoder_only"] else ()
    put("ema.copy_params", copied, "model.ema_encoder_only", cfg["ema_encoder_only"])


def _beit_recipe(config, args: Mapping[str, Any], put) -> None:
  """data2vec_vision's `run_cyclical.py` arguments (spec §1.3, §1.4): target layers, their
  norms, smooth L1 beta, the EMA ramp and the masked patch count."""
  if "target_layers" in args:
    layers = sorted(ast.literal_eval(str(args["target_layers"])))
    depth = data2vec.model_sizes("image", config.model)["num_layers"]
    if layers != list(range(depth - len(layers), depth)):
      raise common.ConversionError(
        f"target_layers={layers}: d2v-jax averages the top K blocks (of {depth}) only"
      )
    put("targets.top_k", len(layers), "target_layers", args["target_layers"])
  if "layer_results" in args:
    kinds = {"end": "block", "fc": "ffn"}
    if args["layer_results"] not in kinds:
      raise common.ConversionError(f"layer_results={args['layer_results']!r}: use end or fc")
    put("targets.layer_output", kinds[args["layer_results"]], "layer_results")
  if args.get("target_batch_norm"):
    raise common.ConversionError("target_batch_norm=True: d2v-jax normalises by instance or layer")
  per_layer = {
    "target_instance_norm": args.get("target_instance_norm", False),
    "layer norm (not no_target_layer_norm_last)": not args.get("no_target_layer_norm_last", False),
  }
  if all(per_layer.values()):
    raise common.ConversionError(
      "target_instance_norm with the last layer norm: d2v-jax uses one per-layer norm"
    )
  if "no_target_layer_norm_last" in args or "target_instance_norm" in args:
    kind = "instance" if per_layer["target_instance_norm"] else "layer"
    kind = kind if any(per_layer.values()) else "none"
    put("targets.layer_norm", kind, "target_instance_norm/no_target_layer_norm_last", per_layer)
  post = {k: bool(args.get(k)) for k in ("post_target_instance_norm", "post_target_layer_norm")}
  if all(post.values()):
    raise common.ConversionError("post_target_instance_norm with post_target_layer_norm")
  if any(k in args for k in post):
    final = "instance" if post["post_target_instance_norm"] else "none"
    final = "layer" if post["post_target_layer_norm"] else final
    put("targets.final_norm", final, "post_target_instance_norm/post_target_layer_norm", post)
  if "l1_beta" in args or "l2_loss" in args:
    beta = 0.0 if args.get("l2_loss") else float(args.get("l1_beta", 0.12))
    put("loss.beta", beta, "l1_beta/l2_loss", {k: args.get(k) for k in ("l1_beta", "l2_loss")})
  if args.get("loss_scale", -1) != -1:
    put("loss.scale", float(args["loss_scale"]), "loss_scale")
  if "ema_decay" in args:  # τ ramps from ema_decay_init to ema_decay over ema_start_at updates
    start = int(args.get("ema_start_at", 0))
    put(
      "ema.decay",
      float(args.get("ema_decay_init", args["ema_decay"]) if start else args["ema_decay"]),
      "ema_decay_init",
    )
    put("ema.end_decay", float(args["ema_decay"]), "ema_decay")
    put("ema.anneal_steps", start, "ema_start_at")
  if "num_mask_patches" in args:
    put("masking.masked_patches", int(args["num_mask_patches"]), "num_mask_patches")


def _audio_teacher_and_masks(cfg, put) -> None:
  if cfg.get("ema_transformer_only") is False:
    raise common.ConversionError(
      "ema_transformer_only=False (a teacher of the whole model): d2v-jax's speech teacher "
      "mirrors the transformer and shares the CNN features (spec §1.4)"
    )
  if "ema_layers_only" in cfg:  # False: the positional conv is EMA'd too, not copied
    copied = ("^encoder/pos_conv/",) if cfg["ema_layers_only"] else ()
    put("ema.copy_params", copied, "model.ema_layers_only", cfg["ema_layers_only"])
  for name, allowed in (("mask_channel_prob", 0), ("mask_selection", "static")):
    if name in cfg and cfg[name] not in (allowed, float(allowed) if allowed == 0 else allowed):
      raise common.ConversionError(
        f"{name}={cfg[name]!r}: d2v-jax's speech pretraining masks time spans only "
        f"({name}={allowed!r})"
      )


def _text_teacher_and_masks(cfg, task, put) -> None:
  if "ema_transformer_layers_only" in cfg:  # False: the embeddings are EMA'd, not copied
    copied = ("^frontend/",) if cfg["ema_transformer_layers_only"] else ()
    put(
      "ema.copy_params",
      copied,
      "model.ema_transformer_layers_only",
      cfg["ema_transformer_layers_only"],
    )
  if "mask_prob" not in task:
    return
  span = int(task.get("mask_multiple_length", 1))
  random_prob = float(task.get("random_token_prob", 0.1))
  leave_prob = float(task.get("leave_unmasked_prob", 0.1))
  if span > 1:
    if random_prob or leave_prob:
      raise common.ConversionError(
        f"task.mask_multiple_length={span} with random_token_prob={random_prob} / "
        f"leave_unmasked_prob={leave_prob}: d2v-jax's span masking replaces every span by <mask>"
      )
    put("masking.scheme", "span", "task.mask_multiple_length", span)
    put("masking.span_length", span, "task.mask_multiple_length")
    put("masking.span_prob", float(task["mask_prob"]), "task.mask_prob")
  else:
    put("masking.scheme", "bert", "task.mask_multiple_length", span)
    put("masking.bert_prob", float(task["mask_prob"]), "task.mask_prob")
    put("masking.random_prob", random_prob, "task.random_token_prob")
    put("masking.leave_prob", leave_prob, "task.leave_unmasked_prob")
