"""End-to-end tests of the pretraining loop: resume equivalence, NaN handling, kill and restart."""

import json
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import audio as audio_config
from configs import image as image_config
from d2v_jax import checkpoint, metrics, train

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(total_steps: int = 6, modality: str = "audio"):
  """The smallest run of `modality` that still exercises every part of the loop."""
  if modality == "audio":
    config = audio_config.get_config("variant=tiny")
  elif modality == "image_v2":  # data2vec 2.0
    config = image_config.get_config("variant=tiny,version=2")
  else:
    config = image_config.get_config("variant=tiny")
  with config.unlocked():
    config.model.update(num_layers=2, dim=32, num_heads=4, mlp_dim=64)
    config.targets.top_k = 2
    if modality == "image_v2":
      config.model.decoder.update(dim=16, layers=2)
      config.masking.num_clones = 2
    if modality == "audio":
      config.model.conv_dim = 16
      config.input.update(batch_size=8, crop_lengths=(4000, 8000), min_length=4000)
    else:
      config.model.image_size = 16  # 4x4 patches of 4x4
      config.input.batch_size = 8
    config.loop.update(
      total_steps=total_steps,
      log_every=1,
      checkpoint_every=3,
      keep_checkpoints=5,
      progress_bar=False,
    )
    config.probe.enabled = False
  return config


def restore_params(workdir, config, step):
  ckpt = checkpoint.Checkpointer(workdir, config)
  _, _, _, make_state = train.setup(config)
  return ckpt.restore(step, checkpoint.abstract_state(make_state))


@pytest.mark.parametrize("modality", ["audio", "image", "image_v2"])
def test_resumed_run_matches_uninterrupted(tmp_path, modality):
  config = tiny_config(total_steps=6, modality=modality)
  train.train_and_evaluate(config, tmp_path / "straight")

  interrupted = tmp_path / "interrupted"
  train.train_and_evaluate(config, interrupted)
  # Simulate a crash after the step-3 checkpoint: drop everything written after it.
  shutil.rmtree(interrupted / "checkpoints" / "6")
  train.train_and_evaluate(config, interrupted)

  a = restore_params(tmp_path / "straight", config, 6)
  b = restore_params(interrupted, config, 6)
  assert int(a.step) == int(b.step) == 6
  for x, y in zip(jax.tree.leaves((a.params, a.teacher)), jax.tree.leaves((b.params, b.teacher))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def _metric_steps(workdir) -> list[int]:
  rows = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(row)["step"] for row in rows]


def _tensorboard_purges(workdir) -> list[int]:
  """The steps of the SessionLog START events (TensorBoard drops the events at and after each
  one's step from the files before it) in `workdir/tensorboard`, oldest file first."""
  from tensorboardX.proto import event_pb2

  starts = []
  for path in sorted((pathlib.Path(workdir) / "tensorboard").iterdir()):
    data, at = path.read_bytes(), 0
    while at < len(data):  # TFRecord: length, its CRC, the Event, the Event's CRC
      (length,) = struct.unpack("<Q", data[at : at + 8])
      event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
      at += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        starts.append(event.step)
  return starts


def test_resume_skips_a_damaged_step_and_matches_uninterrupted(tmp_path, caplog):
  """Issue 23: flipped bytes in the newest step; the rerun moves it aside, resumes from the
  older one, and ends where an uninterrupted run ends, with its metrics rows once each."""
  config = tiny_config(total_steps=6)
  train.train_and_evaluate(config, tmp_path / "straight")
  damaged = tmp_path / "damaged"
  train.train_and_evaluate(config, damaged)
  array_files = (damaged / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d").iterdir()
  biggest = max(array_files, key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[100:108] = bytes(b ^ 0xFF for b in data[100:108])
  biggest.write_bytes(bytes(data))
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(config, damaged)
  assert "Skipping damaged checkpoint" in caplog.text and "checkpoints/6" in caplog.text
  assert (damaged / checkpoint.DAMAGED_DIR / "6").is_dir()
  a = restore_params(tmp_path / "straight", config, 6)
  b = restore_params(damaged, config, 6)
  for x, y in zip(jax.tree.leaves((a.params, a.teacher)), jax.tree.leaves((b.params, b.teacher))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  assert _metric_steps(damaged) == _metric_steps(tmp_path / "straight") == [1, 2, 3, 4, 5, 6]
  assert _tensorboard_purges(damaged)[-1] == 4  # resumed at 3: TensorBoard hides 4 onwards


def test_resume_with_a_changed_config_warns_and_keeps_its_history(tmp_path, caplog):
  config = tiny_config(total_steps=3)
  train.train_and_evaluate(config, tmp_path)
  with config.unlocked():
    config.loop.total_steps = 4
    config.optim.lr = 1e-4
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(config, tmp_path)
  assert "loop.total_steps: 3 -> 4" in caplog.text and "optim.lr: 0.0005 -> 0.0001" in caplog.text
  history = (tmp_path / "config_history.jsonl").read_text().splitlines()
  assert [json.loads(h)["config"]["optim"]["lr"] for h in history] == [5e-4, 1e-4]
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 1e-4
  with config.unlocked():
    config.loop.total_steps = 5
    config.ema.teacher_params = ("frontend", "encoder")
  with pytest.raises(ValueError, match=r"changed ema.teacher_params .*structure"):
    train.train_and_evaluate(config, tmp_path)


def test_divergence_stops_and_keeps_good_checkpoint(tmp_path):
  config = tiny_config(total_steps=3)
  train.train_and_evaluate(config, tmp_path)
  with config.unlocked():
    config.loop.total_steps = 9
    config.optim.lr = 1e38  # the first update overflows the parameters
  with pytest.raises(metrics.TrainingHealthError, match="Non-finite"):
    train.train_and_evaluate(config, tmp_path)
  assert checkpoint.Checkpointer(tmp_path, config).latest_step() == 3
  state = restore_params(tmp_path, config, 3)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_checkpoint_of_another_model_is_refused(tmp_path):
  config = tiny_config(total_steps=3)
  train.train_and_evaluate(config, tmp_path)
  other = tiny_config(total_steps=6)
  with other.unlocked():
    other.model.dim = 48
  with pytest.raises(ValueError, match="model.dim: checkpoint has 32, config has 48"):
    train.train_and_evaluate(other, tmp_path)
  with pytest.raises(ValueError, match="modality: checkpoint has 'audio', config has 'image'"):
    train.train_and_evaluate(tiny_config(total_steps=6, modality="image"), tmp_path)
  # The refused runs left the workdir's record of its own config alone.
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["modality"] == "audio" and saved["model"]["dim"] == 32


def test_killed_run_resumes_from_saved_step(tmp_path):
  """main.py killed (twice) after a checkpoint restarts from that step and data position, with
  each metrics row once; a second command on the live run's work directory is refused."""
  args = [
    sys.executable,
    "main.py",
    "--config=configs/audio.py",
    f"--workdir={tmp_path}",
    "--config.model.variant=tiny",
    "--config.input.batch_size=8",
    "--config.input.crop_lengths=(4000,8000)",
    "--config.loop.total_steps=60",
    "--config.loop.checkpoint_every=2",
    "--config.loop.log_every=2",
    "--config.loop.progress_bar=False",
    "--config.probe.enabled=False",
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  ckpts = tmp_path / "checkpoints"
  saved = 0
  for kill in range(2):
    proc = subprocess.Popen(
      args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      if checkpoint.step_dirs(ckpts) and max(checkpoint.step_dirs(ckpts)) >= saved + 4:
        break
      time.sleep(0.5)
    if kill == 0:  # issue 23: one writer per work directory, refused at once
      second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
      assert second.returncode == 1
      assert "is in use by another run (pid" in second.stderr.splitlines()[-1]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = max(checkpoint.step_dirs(ckpts))
    assert 0 < saved < 60

  args[args.index("--config.loop.total_steps=60")] = f"--config.loop.total_steps={saved + 2}"
  result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from step {saved}" in result.stderr
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert f'"step": {saved + 2}' in lines[-1]
  # Rows the killed runs logged past their checkpoints were dropped: each step once, in order.
  assert _metric_steps(tmp_path) == list(range(2, saved + 3, 2))
