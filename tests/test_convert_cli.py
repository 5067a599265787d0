"""`python -m d2v_jax.convert import/export`: work directories from HF and fairseq checkpoints, and
back (issue 6; d2v_jax/convert/workdir.py, files.py, __main__.py).

HF directories are written from the committed task-model fixtures (random `Data2Vec*For*`
models, `tests/fixtures/hf_heads_*`). fairseq files cannot be pickled without torch, so the
fairseq test hands the loader's result (a synthetic `data2vec_audio` checkpoint with `_ema`, from
`test_convert_fairseq`) to the same import path; a torch-marked test pickles it for real.
"""

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hf_parity import FIXTURES, TOL, load_reference
from test_convert_fairseq import audio_cfg, fairseq_audio, with_ema

from configs import workdir as workdir_config
from d2v_jax import checkpoint, extract, pretrained, train
from d2v_jax.convert import __main__ as cli
from d2v_jax.convert import files, workdir


def _hf_dir(tmp_path, task) -> pathlib.Path:
  state_dict, hf_config, _ = load_reference(FIXTURES / f"hf_heads_{task}_small.npz")
  files.save_hf_dir(tmp_path / f"hf_{task}", state_dict, hf_config)
  return tmp_path / f"hf_{task}"


def test_import_writes_a_work_directory_every_entry_point_reads(tmp_path, capsys):
  """An HF text classifier -> checkpoint, config and report; the extractor then reproduces HF's
  hidden states, and the config reads back through configs/workdir.py."""
  src, out = _hf_dir(tmp_path, "text_cls"), tmp_path / "ours"
  assert cli.main(["import", str(src), str(out)]) == 0
  assert "continue:  python main.py --config=configs/workdir.py:" in capsys.readouterr().out
  report = json.loads((out / "conversion.json").read_text())
  assert (report["modality"], report["mode"], report["head"]["task"]) == (
    "text",
    "finetune",
    "classify",
  )
  run = pretrained.load_pretrained(out)
  assert run.step == 0 and run.meta["mode"] == "finetune" and run.meta["head"]["num_outputs"] == 3
  config = workdir_config.get_config(str(out))
  assert config.mode == "finetune" and config.model.vocab_size == 100
  assert isinstance(config.ema.teacher_params if "ema" in config else (), tuple)

  _, _, ref = load_reference(FIXTURES / "hf_heads_text_cls_small.npz")
  extractor = extract.Extractor(run)
  tokens, padding = ref["input/input_ids"], ref["input/attention_mask"] == 0
  features = extractor(tokens, padding, layers="last")
  valid = ~padding
  got = np.asarray(features.layers[-1])[valid]
  want = ref["out/hidden_states/3"][valid]
  assert np.max(np.abs(got - want)) <= TOL


@pytest.mark.parametrize("task", ["image_cls", "audio_ctc"])
def test_import_then_export_gives_the_same_files(tmp_path, task):
  src, out, back = _hf_dir(tmp_path, task), tmp_path / "ours", tmp_path / "back"
  assert cli.main(["import", str(src), str(out)]) == 0
  assert cli.main(["export", str(out), str(back)]) == 0
  original, original_config = files.load_hf_dir(src)
  exported, exported_config = files.load_hf_dir(back)
  assert exported.keys() == original.keys()
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  assert exported_config["architectures"] == original_config["architectures"]


def test_import_never_overwrites_a_checkpoint(tmp_path, capsys):
  src, out = _hf_dir(tmp_path, "image_cls"), tmp_path / "ours"
  assert cli.main(["import", str(src), str(out)]) == 0
  before = sorted(p.name for p in (out / "checkpoints").iterdir())
  assert cli.main(["import", str(src), str(out)]) == 1
  assert "already holds checkpoints" in capsys.readouterr().err
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_bad_sources_are_clear_errors(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  assert cli.main(["import", str(tmp_path / "empty"), str(tmp_path / "out")]) == 1
  assert "no config.json" in capsys.readouterr().err
  (tmp_path / "weights_only").mkdir()
  (tmp_path / "weights_only" / "config.json").write_text(json.dumps({"model_type": "bert"}))
  assert cli.main(["import", str(tmp_path / "weights_only"), str(tmp_path / "out")]) == 1
  assert "neither model.safetensors" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_fairseq_pretraining_checkpoint_keeps_its_ema_teacher(tmp_path, monkeypatch):
  """A `data2vec_audio` checkpoint with `_ema`: the student and the teacher both land, the
  regression head is kept, and the state restores for resumed pretraining."""
  fixture = fairseq_audio()
  ckpt = {"model": with_ema(fixture, "_ema"), "cfg": {"model": audio_cfg()}}
  monkeypatch.setattr(files, "load_torch_file", lambda path: ckpt)
  src = tmp_path / "audio_base_ls.pt"
  src.write_bytes(b"")
  out = tmp_path / "ours"
  report = workdir.import_checkpoint(src, out)
  assert report["mode"] == "pretrain" and report["source_kind"] == "fairseq"
  assert report["teacher"].startswith("the checkpoint's EMA")
  # The regression head is kept (issue 24): continued pretraining starts from its loss.
  assert report["kept"] == ["final_proj.0.weight", "final_proj.0.bias"]
  assert not any(line.startswith("final_proj") for line in report["dropped"])

  config = workdir_config.get_config(str(out))
  restored = _restore_state(out, config, 0)
  layer = "encoder/blocks/layer_01/fc1/kernel".split("/")
  student = restored["params"]
  teacher = restored["teacher"]
  ema_fc1 = np.asarray(fixture.ema["layers.1.fc1.weight"]).T
  np.testing.assert_array_equal(_leaf(teacher, layer), ema_fc1)
  np.testing.assert_array_equal(
    _leaf(student, layer), np.asarray(fixture.state["encoder.layers.1.fc1.weight"]).T
  )
  assert not np.array_equal(_leaf(teacher, layer), _leaf(student, layer))
  assert set(teacher) == set(config.ema.teacher_params)  # speech: the encoder only (spec §1.4)


def _restore_state(out, config, step):
  manager = checkpoint.Checkpointer(out, config).manager
  return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def _leaf(tree, path):
  for key in path:
    tree = tree[key]
  return np.asarray(jax.device_get(tree))


def test_imported_pretrained_model_resumes_pretraining(tmp_path):
  """An HF vision model (32² images, the embedded digits' size) -> work directory -> pretraining
  continues from it with its own config (configs/workdir.py), starting from the HF weights."""
  state_dict, hf_config, _ = load_reference(FIXTURES / "hf_image_small.npz")
  files.save_hf_dir(tmp_path / "hf", state_dict, hf_config)
  out = tmp_path / "ours"
  report = workdir.import_checkpoint(tmp_path / "hf", out)
  assert report["mode"] == "pretrain" and report["teacher"].startswith("a copy of the student")
  config = workdir_config.get_config(str(out))
  with config.unlocked():
    config.loop.update(total_steps=2, progress_bar=False)  # update 0 has LR 0 (warm-up)
    config.probe.enabled = False
    config.input.batch_size = 4
  train.train_and_evaluate(config, out)
  state = _restore_state(out, config, 2)
  assert int(state["step"]) == 2
  before = state_dict["encoder.layer.0.intermediate.dense.weight"].T  # [in, out]
  after = np.asarray(state["params"]["encoder"]["blocks"]["layer_00"]["fc1"]["kernel"])
  assert 0 < np.max(np.abs(after - before)) < 0.1  # a small update from the HF weights
