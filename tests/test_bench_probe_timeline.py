"""bench/probe_timeline.py reads a run's absl log: probe durations, training time and the target
mark, on log lines written with the loop's own formatter (d2v_jax/metrics.format_line)."""

import pytest

from bench import probe_timeline
from d2v_jax import metrics


def _line(clock: str, source: str, message: str) -> str:
  return f"I1124 {clock} 140448902318976 {source}] {message}"


def _step(clock: str, step: int, steps_per_sec: float, probe_acc=None) -> str:
  scalars = {"loss": 0.5, "steps_per_sec": steps_per_sec, "data_wait_frac": 0.01}
  if probe_acc is not None:
    scalars.update(probe_acc=probe_acc, probe_knn_acc=0.4)
  return _line(clock, "loop.py:171", metrics.format_line(step, scalars))


LOG = [
  "WARNING: a line without absl's prefix is skipped",
  _line("02:00:00.000000", "main.py:75", "Process 0 of 1"),
  _line("02:00:10.000000", "loop.py:61", "Fresh start: 1,829,088 parameters"),
  # 10 steps at 0.5/s (20 s of training) and a probe: 30 s after the loop started
  _step("02:00:40.000000", 10, 0.5, probe_acc=0.88),
  _step("02:00:50.000000", 20, 1.0),  # 10 s, all training
  # 10 steps at 1/s and an 8 s probe
  _step("02:01:08.000000", 30, 1.0, probe_acc=0.9183),
]


def test_probe_time_is_excluded_and_the_loop_start_anchors_the_first_probe():
  first, second = probe_timeline.timeline(LOG)
  assert (first.step, first.accuracy) == (10, 0.88)
  assert first.probe_s == pytest.approx(10.0)  # 40 s - 10 s start-up - 20 s of steps
  assert first.wall_s == pytest.approx(40.0)
  assert first.training_s == pytest.approx(30.0)  # the start-up before the loop counts
  assert second.step == 30
  assert second.probe_s == pytest.approx(8.0)
  assert second.wall_s == pytest.approx(68.0)
  assert second.training_s == pytest.approx(50.0)


def test_main_marks_the_first_probe_at_the_target(tmp_path, capsys):
  log = tmp_path / "run.log"
  log.write_text("\n".join(LOG) + "\n")
  assert probe_timeline.main([str(log), "--target=0.9"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2
  assert "reaches the target" not in lines[0]
  assert lines[1].startswith("update     30  probe  91.83%") and "reaches the target" in lines[1]

  assert probe_timeline.main([str(log), "--target=0.95"]) == 0
  assert "was not reached" in capsys.readouterr().out


def test_a_log_without_probes_is_an_error(tmp_path, capsys):
  log = tmp_path / "run.log"
  log.write_text(_step("02:00:40.000000", 10, 0.5) + "\n")
  assert probe_timeline.main([str(log)]) == 1
  assert "no in-loop probe lines" in capsys.readouterr().err
