"""What the HF parity tests (`test_hf_{audio,image,text}_parity.py`) share.

- Reading a reference npz written by a fixture script (`load_reference`, `load_checkpoint`), and
  the module-scoped `small` / `ckpt` fixtures built from it (`small_fixture`, `ckpt_fixture`).
- Running a fixture script under a torch interpreter for the live tests (`run_fixture_script`).
  The interpreter is `$D2V_TORCH_PYTHON`, else this one if it has torch and transformers, else
  `.venv-torch/bin/python`; with none the test skips.
- Comparing our tensors with HF's: `max_abs_diffs`, `assert_within_tol` (max abs diff <= `TOL`).
- Checks every converter must pass, whatever the modality: a broken state dict raises
  (`conversion_error`) and offending keys are named, an init tree with an extra leaf is rejected,
  the export honours `prefix` and rejects unknown leaves.

The npz layout (`param/<HF state-dict name>`, `meta/hf_config`, `meta/versions`, ...) is the one
the fixture scripts write; see their docstrings.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

TOL = 1e-4  # max abs difference, fp32
ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
AUDIO_FIXTURE = FIXTURES / "hf_audio_small.npz"
IMAGE_FIXTURE = FIXTURES / "hf_image_small.npz"
TEXT_FIXTURE = FIXTURES / "hf_text_small.npz"


# ----------------------------------------------------------------------------- fixtures


def load_reference(path):
  """npz written by a fixture script -> (state dict, HF config dict, all arrays)."""
  with np.load(path) as data:
    arrays = {k: data[k] for k in data.files}
  state_dict = {k.removeprefix("param/"): v for k, v in arrays.items() if k.startswith("param/")}
  hf_config = json.loads(str(arrays["meta/hf_config"]))
  return state_dict, hf_config, arrays


def load_checkpoint(path):
  """(state dict, HF config dict) of the npz at `path`."""
  state_dict, hf_config, _ = load_reference(path)
  return state_dict, hf_config


def small_fixture(converter, path):
  """A module-scoped fixture, to assign to `small`: the reference at `path` and our model built
  from it by `converter` (an `hf_*` module), as a dict of state_dict, hf_config, ref, model,
  params and model_cfg."""

  @pytest.fixture(scope="module")
  def small():
    state_dict, hf_config, ref = load_reference(path)
    model, model_cfg, params = converter.build_from_hf(state_dict, hf_config)
    return dict(
      state_dict=state_dict,
      hf_config=hf_config,
      ref=ref,
      model=model,
      params=params,
      model_cfg=model_cfg,
    )

  return small


def ckpt_fixture(path):
  """A module-scoped fixture, to assign to `ckpt`: `load_checkpoint(path)`."""

  @pytest.fixture(scope="module")
  def ckpt():
    return load_checkpoint(path)

  return ckpt


def assert_versions_recorded(ref):
  """The fixture records the torch and transformers versions that wrote it."""
  versions = json.loads(str(ref["meta/versions"]))
  assert set(versions) == {"torch", "transformers"}, versions


# ----------------------------------------------------------------------------- comparison


def layer_outputs(aux, prefix=""):
  """Our per-block tensors under the reference's names: `hidden_states/<i+1>` (block i's output)
  and `ffn/<i>` (its FFN output before the residual), each name after `prefix`."""
  out = {}
  for i, layer in enumerate(aux["layers"]):
    out[f"{prefix}hidden_states/{i + 1}"] = layer["block"]
    out[f"{prefix}ffn/{i}"] = layer["ffn"]
  return out


def max_abs_diffs(ours, want, where=None):
  """{tensor name: max abs difference of `ours` from `want`} over every tensor of `want`.

  `where` (bool, over the leading axes) restricts each comparison to those positions. Every
  tensor of `want` needs a counterpart of the same shape in `ours` (broadcasting would hide a
  mismatch).
  """
  missing = sorted(set(want) - set(ours))
  assert not missing, f"our model produced no counterpart for {missing}"
  shapes = {k: (ours[k].shape, v.shape) for k, v in want.items() if ours[k].shape != v.shape}
  assert not shapes, f"shape mismatch (ours, HF): {shapes}"
  diffs = {}
  for k, v in want.items():
    error = np.abs(ours[k] - v)
    diffs[k] = float(np.max(error if where is None else error[where]))
  return diffs


def assert_within_tol(diffs, tol=TOL):
  """Every max abs diff is <= `tol` (NaN fails); the message lists them all. Returns `diffs`."""
  report = "\n".join(f"  {k}: {v:.3g}" for k, v in sorted(diffs.items()))
  bad = {k: v for k, v in diffs.items() if not v <= tol}  # `not <=` also catches NaN
  assert not bad, f"max abs diff > {tol} for {sorted(bad)}; all diffs:\n{report}"
  return diffs


def swap(state_dict, a, b):
  """Swaps two entries of `state_dict` in place (a negative control's conversion mistake)."""
  state_dict[a], state_dict[b] = state_dict[b], state_dict[a]


# ----------------------------------------------------------------------------- converter checks


def conversion_error(converter, ckpt, *, drop=(), add=None, match=None):
  """The message of the `ConversionError` that `converter.params_from_hf` must raise (matching
  `match`, if given) for the checkpoint `ckpt` with the keys `drop` deleted and `add` set."""
  missing = sorted(set(drop) - set(ckpt[0]))
  assert not missing, f"not in the checkpoint: {missing}"
  state_dict = {k: v for k, v in ckpt[0].items() if k not in drop}
  state_dict.update(add or {})
  with pytest.raises(converter.ConversionError, match=match) as err:
    converter.params_from_hf(state_dict, ckpt[1])
  return str(err.value)


def assert_names_offending_key(converter, ckpt, key, value, expected):
  """Deletes `key` (value None) or sets it to `value`: `params_from_hf` must raise a
  `ConversionError` that matches `expected` and names `key`."""
  change = dict(drop=[key]) if value is None else dict(add={key: value})
  message = conversion_error(converter, ckpt, match=expected, **change)
  assert key in message, message


def assert_rejects_extra_leaf(converter, small, init):
  """`params_from_hf` with an `init_params` tree that has a leaf HF does not fill must name it."""
  extra = jax.ShapeDtypeStruct((3,), jnp.float32)
  wrong = {**init, "encoder": {**init["encoder"], "extra": extra}}
  with pytest.raises(converter.ConversionError, match="encoder/extra"):
    converter.params_from_hf(small["state_dict"], small["hf_config"], init_params=wrong)


def assert_export_prefix_and_extra(converter, params):
  """`params_to_hf` prepends `prefix` to every key and rejects a leaf it cannot map."""
  prefixed = converter.params_to_hf(params, prefix=converter.TASK_MODEL_PREFIX)
  assert all(k.startswith(converter.TASK_MODEL_PREFIX) for k in prefixed), sorted(prefixed)
  with pytest.raises(converter.ConversionError, match="no HF counterpart: encoder/extra"):
    converter.params_to_hf({**params, "encoder": {**params["encoder"], "extra": np.zeros(3)}})


# ----------------------------------------------------------------------------- live HF models


def torch_python():
  """An interpreter with torch and transformers, or None (see the module docstring)."""
  if os.environ.get("D2V_TORCH_PYTHON"):
    return os.environ["D2V_TORCH_PYTHON"]
  if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
    return sys.executable
  venv = ROOT / ".venv-torch" / "bin" / "python"
  return str(venv) if venv.exists() else None


def run_fixture_script(script, args):
  """Runs the fixture script `script` with `args` and `--seed 3` under `torch_python()`, offline;
  skips the test if there is no such interpreter."""
  python = torch_python()
  if python is None:
    pytest.skip("no interpreter with torch + transformers (set D2V_TORCH_PYTHON or .venv-torch)")
  cmd = [python, str(script), *args, "--seed", "3"]
  proc = subprocess.run(
    cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"


def assert_export_round_trip(converter, small, fields):
  """`params_to_hf` inverts `params_from_hf` exactly (float32, every key), the exported config
  has the HF config's `fields`, converting the export again gives the same params, and the
  export honours `prefix` and rejects unknown leaves."""
  sd, hf_config, params = small["state_dict"], small["hf_config"], small["params"]
  exported = converter.params_to_hf(params)
  assert set(exported) == set(sd)
  for k, v in sd.items():
    assert exported[k].dtype == np.float32, k
    np.testing.assert_array_equal(exported[k], v, err_msg=k)
  config = converter.hf_config_from_params(params)
  assert {k: config[k] for k in fields} == {k: hf_config[k] for k in fields}
  again = converter.params_from_hf(exported, config, init_params=params)
  jax.tree.map(np.testing.assert_array_equal, again, jax.device_get(params))
  assert_export_prefix_and_extra(converter, params)
