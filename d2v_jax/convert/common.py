"""What the HF converters (`hf_audio`, `hf_image`, `hf_text`) share.

Each converter describes its HF model as a `KeyTable`: HF key -> `Entry` (our path, HF's shape and
the layout conversion each way), built with the `KeyTable.add_*` helpers for the layouts every
transformer has (LayerNorm, Linear, attention heads). This module does the rest the same way for
all of them:

- `config_dict`, `Requirements`, `variant_for`: reading and validating the HF config.
- `check_state_dict`: sorts a state dict against the expected keys (under a task-model `prefix`)
  and raises one `ConversionError` listing every unknown, missing and mis-shaped key, with the
  converter's hints (`prefix_hints` gives those about task-model prefixes).
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
  """One HF parameter: where it goes in our tree, HF's shape, and the layout conversions."""

  path: tuple[str, ...]  # path in our params tree
  hf_shape: tuple[int, ...]  # expected shape in the state dict
  to_ours: Callable[[np.ndarray], np.ndarray]  # HF layout -> ours
  to_hf: Callable[[np.ndarray], np.ndarray]  # ours -> HF layout


class KeyTable(dict[str, Entry]):
  """HF key -> `Entry` for every parameter of an HF model, in the order added.

  The `add_*` helpers name the layouts every converter maps: torch Linear [out, in] -> Dense
  [in, out]; q/k/v Linear -> DenseGeneral [D, H, Dh] (torch splits heads as `view(..., H, Dh)`, so
  output unit h*Dh + d is head h, dim d); the attention output -> [H, Dh, D].
  """

  def shapes(self) -> dict[str, tuple[int, ...]]:
    """HF key -> its shape (for `check_state_dict`)."""
    return {k: e.hf_shape for k, e in self.items()}

  def add(self, hf_name, path, hf_shape, to_ours=_same, to_hf=_same):
    """`hf_name` -> `path` ("a/b/c" in our tree); the conversions default to "as is"."""
    self[hf_name] = Entry(tuple(path.split("/")), tuple(hf_shape), to_ours, to_hf)

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
  """The variant whose sizes are `sizes`, else "base".

  The explicit sizes override the variant's in `build_model`; the variant is only a label, so
  name the one that matches if any.
  """
  return next(
    (v for v in ("tiny", "base", "large") if variants.decode_variant(modality, v) == sizes), "base"
  )


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
  model_name: str,
  prefix: str = "",
  optional: Collection[str] = (),
  unchecked: Collection[str] = (),
  hints: Callable[[list[str], str], list[str]] | None = None,
  extra: Callable[[dict[str, Any]], list[str]] | None = None,
) -> dict[str, Any]:
  """Sorts an HF state dict into the keys a converter reads, or raises listing every problem.

  Args:
    state_dict: HF name -> array (numpy, or anything `np.shape` accepts).
    shapes: every key the converter reads (without `prefix`) -> its shape in HF.
    model_name: the HF model in the error message, e.g. "Data2VecAudio".
    prefix: prefix of the base-model keys in a task model's state dict. Keys outside it (task
      heads) are reported as unknown, not dropped.
    optional: keys of `shapes` that may be absent.
    unchecked: further keys that are accepted as they are (not shape-checked, may be absent): a
      buffer that `extra` validates.
    hints: (unknown keys, prefix) -> explanations, listed right after the unknown keys.
    extra: the accepted keys -> further problems, listed last (e.g. a buffer that differs from
      ours); called whatever else is wrong.

  Returns:
    {key without `prefix`: value} for every key of `shapes` or `unchecked` that is present, in
    the order of `state_dict`.

  Raises:
    ConversionError: listing every unknown, missing or mis-shaped key and `extra`'s problems.
  """
  given, unknown = {}, []
  for key, value in state_dict.items():
    name = key[len(prefix) :] if key.startswith(prefix) else None
    if name in shapes or name in unchecked:
      given[name] = value
    else:
      unknown.append(key)
  missing = [prefix + k for k in shapes if k not in given and k not in optional]
  misshaped = [
    f"{prefix + k}: got {tuple(np.shape(v))}, expected {shapes[k]}"
    for k, v in given.items()
    if k in shapes and tuple(np.shape(v)) != shapes[k]
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
    raise ConversionError(f"HF {model_name} state dict does not match:\n  " + "\n  ".join(lines))
  return given


def convert(given: Mapping[str, Any], table: Mapping[str, Entry]) -> dict[tuple[str, ...], Any]:
  """HF arrays -> our flat tree {path: float32 array}, for the keys of `given` that `table` lists
  (in the order of `given`)."""
  return {
    table[k].path: table[k].to_ours(np.asarray(v, dtype=np.float32))
    for k, v in given.items()
    if k in table
  }


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
  return {
    prefix + k: np.ascontiguousarray(e.to_hf(np.asarray(flat[e.path], dtype=np.float32)))
    for k, e in table.items()
  }
