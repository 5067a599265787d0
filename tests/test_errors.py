"""Messages a person reads (issue 23): one short message, the hint first, the path named."""

import collections
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from d2v_jax import checkpoint, errors, metrics
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _main(*flags, cwd=REPO):
  result = subprocess.run(
    [sys.executable, str(REPO / "main.py"), *flags],
    cwd=cwd,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=300,
  )
  return result.returncode, result.stderr.strip().splitlines()


def test_a_misspelt_config_field_is_one_line_with_the_hint_first(tmp_path):
  code, lines = _main("--config=configs/audio.py", "--config.optim.lrr=1", f"--workdir={tmp_path}")
  assert code == 1
  assert lines == [
    'error: Did you mean "lr" instead of "lrr"? (--config.optim.lrr: no config field \'lrr\')'
  ]


def test_a_missing_config_file_names_it(tmp_path):
  code, lines = _main("--config=configs/nope.py", f"--workdir={tmp_path}")
  assert code == 1 and len(lines) == 1
  assert "configs/nope.py" in lines[0] and "No such file" in lines[0]


def test_a_failing_config_argument_is_its_own_message(tmp_path):
  code, lines = _main("--config=configs/audio.py:variant=huge", f"--workdir={tmp_path}")
  assert code == 1 and len(lines) == 1
  assert "Unknown variant 'huge'" in lines[0] and "Traceback" not in lines[0]


def test_an_out_of_range_value_stops_before_compiling(tmp_path):
  code, lines = _main(
    "--config=configs/audio.py", "--config.loop.log_every=0", f"--workdir={tmp_path}"
  )
  assert code == 1 and len(lines) <= 4  # the process and work-directory log lines, the error
  assert lines[-1] == "error: config.loop.log_every=0 is out of range: use an integer >= 1"


def test_no_intact_checkpoint_exits_1_naming_the_folder(tmp_path):
  workdir = helpers.save_pretraining_checkpoint(tmp_path, helpers.tiny_config(), {"w": np.ones(3)})
  (workdir / "checkpoints" / "1" / "meta" / "metadata").write_text("garbage")
  code, lines = _main("--config=configs/audio.py", "--config.mode=probe", f"--workdir={workdir}")
  assert code == 1
  assert lines[-1].startswith(f"error: No intact checkpoint in {workdir / 'checkpoints'}")
  assert any("Skipping damaged checkpoint" in line for line in lines)
  assert not any("Traceback" in line for line in lines)


def test_a_full_disk_is_named_before_orbax_writes(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(tmp_path, helpers.tiny_config())
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: usage(1 << 30, 1 << 30, 1 << 10))
  with pytest.raises(OSError) as raised:
    ckpt.save(1, {"w": np.zeros((1000, 1000), np.float32)})
  message = errors.user_message(raised.value)
  assert message.startswith("No space left on device for checkpoint 1: it needs about 8 MiB")
  assert str(tmp_path / "checkpoints") in message
  assert not checkpoint.step_dirs(tmp_path / "checkpoints")
  # tensorstore's own report, inside orbax's ValueError, is recognised too.
  ts = ValueError('RESOURCE_EXHAUSTED: Failed writing: "/x/d/abc": No space left on device')
  assert errors.user_message(ts).startswith("No space left on device (/x/d/abc)")


def test_a_bug_keeps_its_traceback():
  assert errors.user_message(KeyError("params")) is None
  assert errors.user_message(ValueError("config.x=1: use 2")) == "config.x=1: use 2"


@pytest.mark.parametrize("saved, says", [(None, "No checkpoint was written yet"), (4, "step 4")])
def test_the_nan_stop_says_what_is_kept(saved, says):
  loop_cfg = helpers.tiny_config().loop
  with pytest.raises(metrics.TrainingHealthError, match=says):
    metrics.check_health(7, {"loss": float("nan")}, loop_cfg, saved)
