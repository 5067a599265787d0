"""Reading and writing checkpoint files for the converters, safely and without torch where possible.

- HF model directories: `config.json` with `model.safetensors` (or a sharded
  `model.safetensors.index.json`), read with `safetensors.numpy` (no torch), or
  `pytorch_model.bin`.
- PyTorch pickles (`.pt`, `.pth`, `.bin`): loaded only with `torch.load(weights_only=True)`,
  which refuses to run code from the file. torch is an optional extra: without it these files
  get an error saying how to install it. fairseq checkpoints hold their config as omegaconf /
  argparse objects, which `weights_only=True` refuses; the error says how to re-save such a file
  with plain Python types in an environment you trust.
- Writing an HF directory: `config.json` + `model.safetensors`.

Every tensor comes back as a float32 numpy array (bf16/fp16 widened), nested dicts as dicts.
"""

import json
import pathlib
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors import numpy as safetensors_numpy

from d2v_jax.convert import common

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_SHARD_INDEX = "model.safetensors.index.json"
HF_TORCH_WEIGHTS = "pytorch_model.bin"

RESAVE_RECIPE = """\
The file holds Python objects besides tensors (fairseq stores its config as omegaconf/argparse
objects), and d2v-jax loads pickles only with torch.load(weights_only=True), which will not run
code from a file. If you trust the file, re-save it with plain types once, e.g. with fairseq
installed:
    python -c "import torch; from omegaconf import OmegaConf as O; c = torch.load('IN.pt', \\
      weights_only=False); cfg = c.get('cfg'); torch.save({'model': c['model'], \\
      'cfg': O.to_container(cfg, resolve=True) if cfg is not None else \\
      {'model': vars(c['args'])}}, 'OUT.pt')"
and convert OUT.pt."""


def _to_numpy(value: Any) -> Any:
  """Tensors (torch or numpy) -> numpy, floating ones float32 (torch widens bf16/fp16, which
  numpy lacks); integer buffers keep their type; dicts, lists and other values recurse or stay."""
  if isinstance(value, Mapping):
    return {k: _to_numpy(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return type(value)(_to_numpy(v) for v in value)
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()
  if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
    return value.astype(np.float32)
  return value


def load_torch_file(path: str | pathlib.Path) -> dict:
  """A PyTorch pickle, loaded with `weights_only=True`; tensors -> numpy.

  Raises:
    common.ConversionError: torch is missing, or the file holds more than plain types.
  """
  path = pathlib.Path(path)
  try:
    import torch
  except ImportError as error:
    raise common.ConversionError(
      f"{path}: reading a PyTorch file needs torch, an optional extra of d2v-jax "
      "(pip install torch --index-url https://download.pytorch.org/whl/cpu); safetensors files "
      "convert without it"
    ) from error
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as error:
    raise common.ConversionError(f"{path}: {RESAVE_RECIPE}\n(torch said: {error})") from error
  if not isinstance(loaded, Mapping):
    raise common.ConversionError(f"{path}: expected a dict of tensors, got {type(loaded).__name__}")
  return _to_numpy(dict(loaded))


def _read_safetensors(directory: pathlib.Path) -> dict:
  index = directory / HF_SHARD_INDEX
  if index.exists():
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state_dict = {}
    for shard in shards:
      state_dict.update(safetensors_numpy.load_file(directory / shard))
    return state_dict
  return safetensors_numpy.load_file(directory / HF_WEIGHTS)


def load_hf_dir(directory: str | pathlib.Path) -> tuple[dict, dict]:
  """(state dict of float32 numpy arrays, config dict) of an HF model directory."""
  directory = pathlib.Path(directory)
  config_file = directory / HF_CONFIG
  if not config_file.exists():
    raise common.ConversionError(f"{directory} has no {HF_CONFIG}: not an HF model directory")
  config = json.loads(config_file.read_text())
  if (directory / HF_WEIGHTS).exists() or (directory / HF_SHARD_INDEX).exists():
    state_dict = _read_safetensors(directory)
  elif (directory / HF_TORCH_WEIGHTS).exists():
    state_dict = load_torch_file(directory / HF_TORCH_WEIGHTS)
  else:
    raise common.ConversionError(
      f"{directory} has neither {HF_WEIGHTS} ({HF_SHARD_INDEX}) nor {HF_TORCH_WEIGHTS}"
    )
  return _to_numpy(state_dict), config


def save_hf_dir(directory: str | pathlib.Path, state_dict: Mapping[str, np.ndarray], config: dict):
  """Writes `config.json` and `model.safetensors` (what `from_pretrained(directory)` reads)."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
  safetensors_numpy.save_file(tensors, directory / HF_WEIGHTS, metadata={"format": "pt"})
  (directory / HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
