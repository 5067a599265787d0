"""The torch-free reader of `torch.save` files (d2v_jax/convert/torch_pickle.py, issue 24).

The fixture was written by torch 2.13's own `torch.save` (tests/fixtures/
make_torch_pickle_fixture.py): every tensor must come back as torch.load read it, the omegaconf
and argparse configs as the plain containers OmegaConf.to_container and vars() give, and a file
whose pickle would call a function must be refused without calling it.
"""

import json
import pathlib
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from d2v_jax.convert import common, files, torch_pickle

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
SMALL = FIXTURES / "torch_pickle_small.pt"


def _flatten(tree, prefix=""):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def test_tensors_come_back_as_torch_load_reads_them():
  loaded = torch_pickle.load(SMALL)
  expected = np.load(FIXTURES / "torch_pickle_small.npz")
  ours = _flatten({k: loaded[k] for k in ("model", "model_ema")})
  assert sorted(ours) == sorted(expected.files)
  dtypes = json.loads((FIXTURES / "torch_pickle_small.json").read_text())["dtypes"]
  for name in expected.files:
    value = ours[name]
    torch_dtype = dtypes.get(name.removeprefix("model/"))
    if torch_dtype:  # each keeps its own dtype (bfloat16 as ml_dtypes')
      want = ml_dtypes.bfloat16 if torch_dtype == "bfloat16" else np.dtype(torch_dtype)
      assert value.dtype == want, name
    np.testing.assert_array_equal(np.asarray(value, expected[name].dtype), expected[name])
  # Views keep their own offsets and strides, not their storage's layout.
  assert ours["model/encoder.layers.0.fc1.weight_t"].shape == (4, 6)
  assert ours["model/encoder.scalar"].shape == ()


def test_configs_come_back_as_plain_containers():
  loaded = torch_pickle.load(SMALL)
  expected = json.loads((FIXTURES / "torch_pickle_small.json").read_text())
  assert torch_pickle.plain(loaded["cfg"]) == expected["cfg"]
  assert torch_pickle.plain(loaded["args"]) == expected["args"]


def test_load_torch_file_gives_float32_arrays_and_plain_configs():
  ckpt = files.load_torch_file(SMALL)
  assert ckpt["model"]["encoder.pos.bf16"].dtype == np.float32
  assert ckpt["model"]["encoder.pos.half"].dtype == np.float32
  assert ckpt["model"]["encoder.index"].dtype == np.int64
  assert ckpt["model"]["_ema"]["layers.0.fc1.weight"].shape == (8, 4)
  assert ckpt["cfg"]["model"]["average_top_k_layers"] == 3
  assert ckpt["args"]["arch"] == "beit_base"


def test_a_pickle_that_calls_a_function_is_refused_unrun(tmp_path, capfd):
  with pytest.raises(common.ConversionError, match=r"names the global posix.system"):
    files.load_torch_file(FIXTURES / "torch_pickle_evil.pt")
  assert "this file ran code" not in capfd.readouterr().out
  # The same with a hand-made archive naming builtins.eval.
  payload = pickle.dumps({"x": _Eval()}, protocol=2)
  path = tmp_path / "eval.pt"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", payload)
  with pytest.raises(torch_pickle.UnsafePickleError, match=r"builtins.eval"):
    torch_pickle.load(path)


class _Eval:
  def __reduce__(self):
    return (eval, ("1 + 1",))


def test_files_that_are_no_torch_archive_are_one_error(tmp_path):
  legacy = tmp_path / "old.pt"
  legacy.write_bytes(pickle.dumps({"model": {}}, protocol=2))  # not a zip: torch < 1.6's format
  with pytest.raises(common.ConversionError, match=r"old.pt is not a torch zip archive"):
    files.load_torch_file(legacy)


def test_save_writes_what_load_reads(tmp_path):
  """The writer (exports; torch 2.13 reads its files with weights_only=True, checked by
  make_fairseq_fixtures.py --check-export) keeps dtypes, shapes, strides and plain values."""
  transposed = np.arange(6, dtype=np.float32).reshape(2, 3).T
  obj = {
    "model": {
      "w": transposed,
      "scalar": np.array(2.5, np.float32),
      "half": np.ones(3, np.float16),
      "ids": np.arange(4, dtype=np.int64),
      "flags": np.array([True, False]),
      "_ema": {"0.w": np.zeros((2, 2), np.float32)},
    },
    "cfg": {"model": {"depth": 3, "mlp_ratio": 2.0, "name": "x", "none": None, "on": True}},
    "list": [1, 1e-300, "a", (1, 2)],
  }
  torch_pickle.save(obj, tmp_path / "out.pt")
  back = torch_pickle.load(tmp_path / "out.pt")
  assert back["cfg"] == obj["cfg"] and back["list"] == obj["list"]
  for key, value in obj["model"].items():
    if key == "_ema":
      np.testing.assert_array_equal(back["model"][key]["0.w"], value["0.w"])
      continue
    assert back["model"][key].dtype == value.dtype and back["model"][key].shape == value.shape
    np.testing.assert_array_equal(back["model"][key], value)
  with pytest.raises(TypeError, match="cannot write"):
    torch_pickle.save({"x": object()}, tmp_path / "bad.pt")
