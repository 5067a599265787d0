"""Reading and writing checkpoint files for the converters, safely and without torch where possible.

- HF model directories: `config.json` with `model.safetensors` (or a sharded
  `model.safetensors.index.json`), read with `safetensors.numpy` (no torch), or
  `pytorch_model.bin`.
- PyTorch pickles (`.pt`, `.pth`, `.bin`): read without torch by `torch_pickle`, which rebuilds
  the tensors and turns fairseq's omegaconf / argparse configs into plain dicts, and refuses any
  other Python global the file names (so nothing in it runs).
- Writing an HF directory: `config.json` + `model.safetensors`.

Every tensor comes back as a float32 numpy array (bf16/fp16 widened), nested dicts as dicts.
"""

import json
import pathlib
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import numpy as safetensors_numpy

from d2v_jax.convert import common, torch_pickle

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_SHARD_INDEX = "model.safetensors.index.json"
HF_TORCH_WEIGHTS = "pytorch_model.bin"


def _to_numpy(value: Any) -> Any:
  """Arrays -> numpy, floating ones (bf16 and fp16 included) float32; integer buffers keep
  their type; dicts, lists and other values recurse or stay."""
  if isinstance(value, Mapping):
    return {k: _to_numpy(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return type(value)(_to_numpy(v) for v in value)
  if isinstance(value, np.ndarray) and (
    np.issubdtype(value.dtype, np.floating) or value.dtype == ml_dtypes.bfloat16
  ):
    return value.astype(np.float32)
  return value


def load_torch_file(path: str | pathlib.Path) -> dict:
  """A PyTorch checkpoint file (`torch.save`'s format), read without torch: tensors -> numpy
  (floating ones float32), configs -> plain dicts.

  Raises:
    common.ConversionError: the file is not a torch archive, or names a Python global beyond
      tensors and configs (the error names it; nothing from the file ran).
  """
  path = pathlib.Path(path)
  try:
    loaded = torch_pickle.plain(torch_pickle.load(path))
  except (pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError, EOFError) as error:
    message = str(error) if str(path) in str(error) else f"{path}: {error}"
    raise common.ConversionError(message) from error
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
