"""What the HF converters (`hf_audio`, `hf_image`, `hf_text`) share.

Each converter describes its HF model as a `KeyTable`: HF key -> `Entry` (our path, HF's shape and
the layout conversion each way), built with the `KeyTable.add_*` helpers for the layouts every
transformer has (LayerNorm, Linear, attention heads). This module does the rest the same way for
all of them:

- `config_dict`, `Requirements`, `variant_for`: reading and validating the HF config.
- `check_state_dict`: sorts a state dict (HF's or fairseq's) against the expected keys (under a
  task-model `prefix`) and raises one `ConversionError` listing every unknown, missing and
  mis-shaped key, with the converter's hints (`prefix_hints` gives those about task-model
  prefixes).
- `convert` and `params_tree`: HF arrays -> our tree, completed from `init_params`
  (`init_shapes_and_head` makes those) and checked against it leaf by leaf.
- `export_state_dict`: our params -> an HF state dict (the converters that export).

Pure numpy, like the converters: torch is never imported (jax only builds `init_params`).
"""

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from d2v_jax.models import variants

# Top-level entries of our tree that HF never provides: the data2vec regression head (HF's
# conversions drop it). `params_tree` takes them from `init_params`; exports drop them.
NOT_IN_HF = ("final_proj",)

# What `params_tree` may take from `init_params`: `NOT_IN_HF`, and `mask_emb` for HF models
# without a mask embedding.
FROM_INIT = (*NOT_IN_HF, "mask_emb")


class ConversionError(ValueError):
  """The HF config or state dict does not map exactly onto our model."""


def _same(w):
  return w


def _transpose(w):
  return w.T


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF parameter: where it goes in our tree, HF's shape, and the layout conversions.

  `index` is set where several HF parameters stack into one leaf of ours (vision's per-block
  relative position tables -> one [L, rows, H] leaf): this parameter is slice `index` of it.
  """

  path: tuple[str, ...]  # path in our params tree
  hf_shape: tuple[int, ...]  # expected shape in the state dict
  to_ours: Callable[[np.ndarray], np.ndarray]  # HF layout -> ours
  to_hf: Callable[[np.ndarray], np.ndarray]  # ours -> HF layout
  index: int | None = None


@dataclasses.dataclass(frozen=True)
class Head:
  """A task model's head: what `build_finetune_model` needs and where HF keeps its weights.

  `keys` holds full HF names (a head may have keys inside the base model's prefix, e.g. vision's
  `data2vec_vision.pooler.layernorm`); `config` is our `config.head` (task, num_outputs, ...).
  """

  hf_class: str  # e.g. "Data2VecAudioForCTC"
  config: dict
  keys: "KeyTable"


class KeyTable(dict[str, Entry]):
  """HF key -> `Entry` for every parameter of an HF model, in the order added.

  The `add_*` helpers name the layouts every converter maps: torch Linear [out, in] -> Dense
  [in, out]; q/k/v Linear -> DenseGeneral [D, H, Dh] (torch splits heads as `view(..., H, Dh)`, so
  output unit h*Dh + d is head h, dim d); the attention output -> [H, Dh, D].
  """

  def shapes(self) -> dict[str, tuple[int, ...]]:
    """HF key -> its shape (for `check_state_dict`)."""
    return {k: e.hf_shape for k, e in self.items()}

  def add(self, hf_name, path, hf_shape, to_ours=_same, to_hf=_same, index=None):
    """`hf_name` -> `path` ("a/b/c" in our tree); the conversions default to "as is"."""
    self[hf_name] = Entry(tuple(path.split("/")), tuple(hf_shape), to_ours, to_hf, index)

  def prefixed(self, prefix: str) -> "KeyTable":
    """The same entries under `prefix` + each HF name (a task model's base-model keys)."""
    table = KeyTable()
    table.update({prefix + k: e for k, e in self.items()})
    return table

  def add_norm(self, hf_name, path, size):
    """A LayerNorm: HF `weight`/`bias` -> our `scale`/`bias`."""
    self.add(f"{hf_name}.weight", f"{path}/scale", (size,))
    self.add(f"{hf_name}.bias", f"{path}/bias", (size,))

  def add_linear(self, hf_name, path, out_dim, in_dim, bias=True):
    """A Linear [out, in] -> Dense `kernel` [in, out] (and `bias`)."""
    self.add(f"{hf_name}.weight", f"{path}/kernel", (out_dim, in_dim), _transpose, _transpose)
    if bias:
      self.add(f"{hf_name}.bias", f"{path}/bias", (out_dim,))

  def add_heads_in(self, hf_name, path, dim, heads, bias=True):
    """A q, k or v Linear [D, D] -> DenseGeneral `kernel` [D, H, Dh] (and `bias` [H, Dh])."""
    head_dim = dim // heads
    self.add(
      f"{hf_name}.weight",
      f"{path}/kernel",
      (dim, dim),
      lambda w: w.T.reshape(dim, heads, head_dim),
      lambda w: w.reshape(dim, dim).T,
    )
    if bias:
      self.add(
        f"{hf_name}.bias",
        f"{path}/bias",
        (dim,),
        lambda b: b.reshape(heads, head_dim),
        lambda b: b.reshape(dim),
      )

  def add_heads_out(self, hf_name, path, dim, heads):
    """The attention output Linear [D, D] -> DenseGeneral `kernel` [H, Dh, D] and `bias` [D]."""
    head_dim = dim // heads
    self.add(
      f"{hf_name}.weight",
      f"{path}/kernel",
      (dim, dim),
      lambda w: w.T.reshape(heads, head_dim, dim),
      lambda w: w.reshape(dim, dim).T,
    )
    self.add(f"{hf_name}.bias", f"{path}/bias", (dim,))


# ----------------------------------------------------------------------------- config


def config_dict(hf_config: Any) -> dict:
  """The HF config as a plain dict: a `PretrainedConfig` (through `to_dict`) or any mapping."""
  return hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)


class Requirements:
  """Collects what an HF config fails to meet, so that one error lists every problem.

  `require(ok, message)` records `message` unless `ok`; `raise_if_any` raises them together.
  """

  def __init__(self):
    self.problems = []

  def __call__(self, ok, message):
    if not ok:
      self.problems.append(message)

  def raise_if_any(self, model_name: str):
    """Raises `ConversionError` ("Unsupported <model_name> config: ...") if anything failed."""
    if self.problems:
      raise ConversionError(f"Unsupported {model_name} config:\n  " + "\n  ".join(self.problems))


def variant_for(modality: str, sizes: Mapping[str, Any]) -> str:
  """The variant whose transformer (layers, width, heads, FFN) is `sizes`', else "base".

  The explicit sizes override the variant's in `build_model`; the variant is a label and picks
  the training recipe of a run built on the checkpoint, so a front end of another size (a text
  vocabulary, an image resolution) keeps the transformer's variant.
  """
  for variant in ("tiny", "base", "large"):
    known = variants.decode_variant(modality, variant)
    if all(sizes.get(k) == known[k] for k in ("num_layers", "dim", "num_heads", "mlp_dim")):
      return variant
  return "base"


# ----------------------------------------------------------------------------- import


def any_contains(keys: Collection[str], *parts: str) -> bool:
  """Whether any of `keys` contains any of `parts` (for hints about unknown keys)."""
  return any(part in k for k in keys for part in parts)


def prefix_hints(unknown: Collection[str], prefix: str, task_prefixes: Sequence[str]) -> list[str]:
  """Hints for unknown keys that a task-model prefix explains.

  Without `prefix`: keys under one of `task_prefixes` (pass it). With it: keys outside it (task
  heads, which are reported rather than dropped).
  """
  hints = []
  if not prefix:
    for task_prefix in task_prefixes:
      if any(k.startswith(task_prefix) for k in unknown):
        hints.append(f"hint: task-model keys; pass prefix={task_prefix!r}")
  if prefix and any(not k.startswith(prefix) for k in unknown):
    hints.append(f"hint: keys outside {prefix!r} (task heads) must be dropped before converting")
  return hints


def check_state_dict(
  state_dict: Mapping[str, Any],
  shapes: Mapping[str, tuple[int, ...]],
  *,
  what: str,
  prefix: str = "",
  optional: Collection[str] = (),
  missing_ok: bool = False,
  unchecked: Collection[str] = (),
  hints: Callable[[list[str], str], list[str]] | None = None,
  extra: Callable[[dict[str, Any]], list[str]] | None = None,
  head_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, Any]:
  """Sorts a state dict (HF's, or a fairseq checkpoint's) into the keys a converter reads, or
  raises listing every problem.

  Args:
    state_dict: HF name -> array (numpy, or anything `np.shape` accepts).
    shapes: every key the converter reads (without `prefix`) -> its shape in HF.
    what: the checked dict in the error message, e.g. "HF Data2VecAudio state dict".
    prefix: prefix of the base-model keys in a task model's state dict. Keys outside it (task
      heads) are reported as unknown, not dropped.
    optional: keys of `shapes` that may be absent.
    missing_ok: every key of `shapes` may be absent (a partial dict such as an EMA teacher's).
    unchecked: further keys that are accepted as they are (not shape-checked, may be absent): a
      buffer that `extra` validates.
    hints: (unknown keys, prefix) -> explanations, listed right after the unknown keys.
    extra: the accepted keys -> further problems, listed last (e.g. a buffer that differs from
      ours); called whatever else is wrong.
    head_shapes: a task head's keys (full names, prefix included where HF has it) -> shapes;
      all required.

  Returns:
    {key without `prefix`: value} for every key of `shapes` or `unchecked` that is present, and
    {full name: value} for the head's keys, in the order of `state_dict`.

  Raises:
    ConversionError: listing every unknown, missing or mis-shaped key and `extra`'s problems.
  """
  head_shapes = dict(head_shapes or {})
  given, unknown = {}, []
  for key, value in state_dict.items():
    name = key[len(prefix) :] if key.startswith(prefix) else None
    if key in head_shapes:
      given[key] = value
    elif name in shapes or name in unchecked:
      given[name] = value
    else:
      unknown.append(key)
  missing = (
    [] if missing_ok else [prefix + k for k in shapes if k not in given and k not in optional]
  )
  missing += [k for k in head_shapes if k not in given]
  full_names = {**{prefix + k: v for k, v in shapes.items()}, **head_shapes}
  misshaped = [
    f"{k}: got {tuple(np.shape(v))}, expected {full_names[k]}"
    for k, v in ((k if k in head_shapes else prefix + k, v) for k, v in given.items())
    if k in full_names and tuple(np.shape(v)) != full_names[k]
  ]
  problems = extra(given) if extra is not None else []
  if unknown or missing or misshaped or problems:
    lines = []
    if unknown:
      lines.append(f"unknown keys ({len(unknown)}): " + ", ".join(sorted(unknown)))
      if hints is not None:
        lines += hints(unknown, prefix)
    if missing:
      lines.append(f"missing keys ({len(missing)}): " + ", ".join(sorted(missing)))
    if misshaped:
      lines.append(f"mis-shaped keys ({len(misshaped)}): " + "; ".join(sorted(misshaped)))
    lines += problems
    raise ConversionError(f"{what} does not match:\n  " + "\n  ".join(lines))
  return given


def convert(given: Mapping[str, Any], table: Mapping[str, Entry]) -> dict[tuple[str, ...], Any]:
  """HF arrays -> our flat tree {path: float32 array}, for the keys of `given` that `table` lists
  (in the order of `given`); stacked entries (`Entry.index`) are stacked in index order."""
  flat, stacks = {}, {}
  for k, v in given.items():
    if k not in table:
      continue
    entry = table[k]
    value = entry.to_ours(np.asarray(v, dtype=np.float32))
    if entry.index is None:
      flat[entry.path] = value
    else:
      stacks.setdefault(entry.path, {})[entry.index] = value
  for path, parts in stacks.items():
    flat[path] = np.stack([parts[i] for i in sorted(parts)])
  return flat


def params_tree(
  converted: Mapping[tuple[str, ...], Any],
  init_params: Mapping[str, Any] | None = None,
  *,
  from_init: Collection[str] = FROM_INIT,
) -> dict:
  """Our nested `params` from the converted leaves, completed from `init_params` if given.

  With `init_params` (our model's tree; the leaves HF replaces may be `jax.ShapeDtypeStruct`s),
  every converted leaf must be in it with its shape, and every leaf of it must be converted
  unless its top-level entry is one of `from_init` (then it is taken from `init_params`).

  Raises:
    ConversionError: listing every leaf that does not line up.
  """
  if init_params is None:
    return traverse_util.unflatten_dict(dict(converted))
  init = traverse_util.flatten_dict(dict(init_params))
  problems = [
    f"{'/'.join(p)}: converted {v.shape}, model {np.shape(init[p])}"
    for p, v in converted.items()
    if p in init and v.shape != np.shape(init[p])
  ]
  problems += [f"{'/'.join(p)}: not in the model" for p in converted if p not in init]
  allowed = {(name,) for name in from_init}
  for p in init:
    if p not in converted and p[:1] not in allowed:
      problems.append(f"{'/'.join(p)}: in the model but not filled by the converter")
  if problems:
    raise ConversionError("Converted tree does not match the model:\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict({p: converted.get(p, np.asarray(init[p])) for p in init})


def init_shapes_and_head(model: Any, inputs: Sequence[Any], seed: int) -> dict:
  """`init_params` for `params_tree`: the full tree as shapes, real values for what HF lacks.

  `inputs` are example arguments of `model.__call__` (any small size). Only shapes (tracing, no
  XLA compile: RNG-heavy init compiles slowly on CPU) for what HF replaces; running just
  `predict` creates `final_proj` and, through `setup`, `mask_emb`; flax derives each module's
  init RNG from its path, so they equal a full `model.init` with the same seed.
  """
  rngs = {"params": jax.random.key(seed)}
  shapes = jax.eval_shape(lambda: model.init(rngs, *inputs))["params"]
  head = model.init(rngs, jnp.zeros((1, model.dim)), method="predict")["params"]
  return {**shapes, **jax.device_get(head)}


def classifier_shape(c: Mapping[str, Any], state_dict: Mapping[str, Any], key: str) -> tuple:
  """(classes, input width) of a classifier's [C, D] weight `key`; C must agree with the
  config's `id2label` where it has one."""
  num_outputs, dim = np.shape(state_dict[key])
  labels = c.get("id2label") or {}
  if labels and len(labels) != num_outputs:
    raise ConversionError(
      f"{key} has {num_outputs} outputs but the config's id2label has {len(labels)}"
    )
  return int(num_outputs), int(dim)


def label_fields(num_outputs: int) -> dict:
  """HF's `id2label` / `label2id` config fields for `num_outputs` unnamed classes."""
  return dict(
    id2label={str(i): f"LABEL_{i}" for i in range(num_outputs)},
    label2id={f"LABEL_{i}": i for i in range(num_outputs)},
  )


def init_task_params(model: Any, inputs: Sequence[Any], seed: int) -> dict:
  """`init_params` of a fine-tuning model (`FineTuneModel`): shapes for every leaf, and a real
  value for `mask_emb` (speech), which HF task models lack when no SpecAugment probability is
  set. No XLA compile, as in `init_shapes_and_head`."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(seed), *inputs))["params"]
  if "mask_emb" in shapes:
    mask_key = jax.random.fold_in(jax.random.key(seed), 1)
    shapes = {**shapes, "mask_emb": np.asarray(model.mask_init(mask_key, (model.dim,)))}
  return shapes


def task_params(
  given: Mapping[str, Any],
  table: Mapping[str, Entry],
  head: Head | None,
  init_params: Mapping[str, Any] | None,
) -> dict:
  """`params_tree` of a base model (`head` None: `final_proj` may come from `init_params`) or a
  task model (the head's keys converted too; only `mask_emb` may come from `init_params`)."""
  if head is None:
    return params_tree(convert(given, table), init_params)
  converted = convert(given, {**table, **head.keys})
  return params_tree(converted, init_params, from_init=("mask_emb",))


# ----------------------------------------------------------------------------- export


def export_state_dict(
  params: Mapping[str, Any],
  table: Mapping[str, Entry],
  *,
  model_name: str,
  prefix: str = "",
) -> dict[str, np.ndarray]:
  """Our `params` -> an HF state dict (float32, contiguous) with the keys of `table`.

  `NOT_IN_HF` entries are dropped; `prefix` (a task model's) is prepended to every key.

  Raises:
    ConversionError: if `params` has leaves `table` does not cover (other than `NOT_IN_HF`), or
      lacks some it needs.
  """
  flat = traverse_util.flatten_dict(dict(params))
  paths = {e.path for e in table.values()}
  extra = [p for p in flat if p not in paths and p[:1] not in {(n,) for n in NOT_IN_HF}]
  absent = [e.path for e in table.values() if e.path not in flat]
  if extra or absent:
    raise ConversionError(
      f"params do not match an HF {model_name} model:\n  "
      + "\n  ".join(
        [f"no HF counterpart: {'/'.join(p)}" for p in extra]
        + [f"missing: {'/'.join(p)}" for p in absent]
      )
    )

  def leaf(e: Entry) -> np.ndarray:
    value = np.asarray(flat[e.path], dtype=np.float32)
    return value if e.index is None else value[e.index]

  return {prefix + k: np.ascontiguousarray(e.to_hf(leaf(e))) for k, e in table.items()}
