"""Time to accuracy from a pretraining run's log (issue 8's efficiency measure). Run by hand.

    .venv/bin/python main.py --config=configs/image.py:version=2 --config.probe.every=10 \
        --config.loop.log_every=10 --workdir=runs/image_v2_tiny 2> image_v2.log
    .venv/bin/python -m bench.probe_timeline image_v2.log [--target=0.8995]

For every in-loop probe (`config.probe.every`) it prints the update, the linear probe's mean
accuracy, the wall time since the log's first line, and that wall time less every probe run so
far ("training alone": start-up, compilation, steps and checkpoints). A probe's duration is the
time between its log line and the step line before it, less the training time of the steps
between them, which the loop logs as `steps_per_sec` over a window that excludes the probe
(d2v_jax/loop.py). The first probe's span starts at the loop's "Fresh start" line, so the
random-init baseline and the loading of the probe sets count as probe time; start-up before it
counts as training.
With `--target`, the first probe at or above it is marked: the time 2.0 needs to reach 1.0's
accuracy, as the README's efficiency tables report it.
"""

import argparse
import dataclasses
import datetime
import re
import sys

# absl's prefix: severity, MMDD, time, thread id, file:line].
_PREFIX = re.compile(r"^[IWEF]\d{4} (\d\d:\d\d:\d\d\.\d+) +\d+ ")
_STEP = re.compile(r"loop\.py:\d+\] step (\d+) \|.*\| steps_per_sec ([0-9.e+-]+)")
_PROBE = re.compile(r"\| probe_acc ([0-9.e+-]+)")
_LOOP_START = re.compile(r"loop\.py:\d+\] (Fresh start|Resumed from)")


@dataclasses.dataclass(frozen=True)
class ProbePoint:
  step: int
  accuracy: float  # mean linear-probe accuracy over the probe seeds, in [0, 1]
  wall_s: float  # since the log's first line
  training_s: float  # wall_s less every probe's duration up to this one, this one included
  probe_s: float  # this probe's duration


def _clock(line: str) -> datetime.datetime | None:
  match = _PREFIX.match(line)
  return datetime.datetime.strptime(match.group(1), "%H:%M:%S.%f") if match else None


def timeline(lines) -> list[ProbePoint]:
  """The probe points of one run's log lines, in order (a run that crosses midnight is not
  supported: absl's prefix has no year and the clock would run backwards)."""
  start = previous = None
  previous_step, probes_s, points = 0, 0.0, []
  for line in lines:
    clock = _clock(line)
    if clock is None:
      continue
    if start is None:
      start = previous = clock
    if _LOOP_START.search(line):  # what follows until the loop starts serves the probe only
      previous = clock
    step_match = _STEP.search(line)
    if not step_match:
      continue
    step, steps_per_sec = int(step_match.group(1)), float(step_match.group(2))
    probe_match = _PROBE.search(line)
    if probe_match:
      window_training_s = (step - previous_step) / steps_per_sec
      probe_s = max((clock - previous).total_seconds() - window_training_s, 0.0)
      probes_s += probe_s
      wall_s = (clock - start).total_seconds()
      points.append(
        ProbePoint(step, float(probe_match.group(1)), wall_s, wall_s - probes_s, probe_s)
      )
    previous, previous_step = clock, step
  return points


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("log", help="the run's stderr (absl log lines)")
  parser.add_argument("--target", type=float, default=None, help="accuracy to reach, in [0, 1]")
  args = parser.parse_args(argv)
  with open(args.log, encoding="utf-8", errors="replace") as f:
    points = timeline(f)
  if not points:
    print(f"{args.log}: no in-loop probe lines (set --config.probe.every)", file=sys.stderr)
    return 1
  reached = next((p for p in points if args.target is not None and p.accuracy >= args.target), None)
  for p in points:
    mark = "  <- reaches the target" if p is reached else ""
    print(
      f"update {p.step:6d}  probe {100 * p.accuracy:6.2f}%  wall {p.wall_s / 60:6.2f} min  "
      f"training alone {p.training_s / 60:6.2f} min  (probe {p.probe_s:.0f} s){mark}"
    )
  if args.target is not None and reached is None:
    print(f"the target {100 * args.target:.2f}% was not reached")
  return 0


if __name__ == "__main__":
  sys.exit(main())
