"""Reading the parts of a fairseq checkpoint that every data2vec generation stores alike.

Shared by `fairseq_v1` (data2vec 1.0 and BEiT, renamed to HF names) and `fairseq_v2`
(data2vec 2.0, mapped onto our tree): the model config, which may be a dict, an argparse
Namespace or absent (`as_dict`, `lookup`, `model_cfg`, `encoder_cfg`); the EMA teacher fairseq
keeps as one nested entry of the model dict (`split_ema`); layer counts read off key names
(`count_indices`); and the attention heads, which no weight shape holds (`num_heads`).
Pure Python and numpy: torch is never imported.
"""

import re
from collections.abc import Mapping
from typing import Any

from d2v_jax.convert import common

# Attention heads of the released models by width, when no config says (spec §1.1, §2.3: ViT-H
# is 1280 wide with 16 heads).
RELEASED_HEADS = {768: 12, 1024: 16, 1280: 16}


def split_ema(state_dict: Mapping[str, Any], ema_key: str) -> tuple[dict, dict | None]:
  """(the model dict without the EMA, the EMA dict or None).

  fairseq stores the EMA as one entry holding a dict; a flattened `<ema_key>.<name>` layout is
  accepted too.
  """
  model, ema = {}, None
  for key, value in state_dict.items():
    if ema_key and key == ema_key:
      ema = {**(ema or {}), **dict(value)}
    elif ema_key and key.startswith(ema_key + "."):
      ema = {**(ema or {}), key[len(ema_key) + 1 :]: value}
    else:
      model[key] = value
  return model, ema


def as_dict(cfg: Any) -> dict:
  """A config (mapping, argparse Namespace or None) as a plain dict."""
  if cfg is None:
    return {}
  if isinstance(cfg, Mapping):
    return dict(cfg)
  return dict(vars(cfg))


def child(node: Any, name: str) -> Any:
  """`node[name]` of a mapping or Namespace; None if absent or `node` is neither."""
  if isinstance(node, Mapping) or hasattr(node, "__dict__"):
    return as_dict(node).get(name)
  return None


def lookup(cfg: Mapping[str, Any], *paths: str, default=None):
  """The value of the first of the dotted `paths` that is set (not None) in `cfg`, else
  `default`."""
  for path in paths:
    node = cfg
    for name in path.split("."):
      node = child(node, name)
    if node is not None:
      return node
  return default


def count_indices(state_dict: Mapping[str, Any], pattern: str) -> int:
  """How many distinct indices `pattern` (with one `(\\d+)` group) matches among the keys."""
  compiled = re.compile(pattern)
  return len({m.group(1) for k in state_dict if (m := compiled.fullmatch(k))})


def num_heads(cfg: Mapping[str, Any], dim: int, *paths: str) -> int:
  """Attention heads from the config, else the released models' count for `dim`."""
  heads = lookup(cfg, *paths)
  if heads is not None:
    return int(heads)
  if dim not in RELEASED_HEADS:
    raise common.ConversionError(
      f"The number of attention heads is not stored in the weights and width {dim} is not a "
      f"released model's ({sorted(RELEASED_HEADS)}): pass the checkpoint's model config as cfg"
    )
  return RELEASED_HEADS[dim]


def model_cfg(cfg: Any) -> dict:
  """The model config as a dict: `cfg` itself, or the `model` part of a whole fairseq config."""
  cfg = as_dict(cfg)
  whole = isinstance(cfg.get("model"), Mapping) and "task" in cfg
  return as_dict(cfg["model"]) if whole else cfg


def encoder_cfg(cfg: Mapping[str, Any]) -> dict:
  """The pretraining model config: a CTC model's `w2v_args` (its `model` part), else `cfg`."""
  w2v_args = cfg.get("w2v_args")
  return model_cfg(w2v_args) if w2v_args is not None else dict(cfg)
