"""Logging and run health: JSONL + TensorBoard scalars, NaN and collapse checks (spec §0.7).

Metrics come out of the jitted step as device scalars and are fetched only at log steps, so the
loop never waits on the device in between.
"""

import json
import math
import pathlib


class TrainingHealthError(RuntimeError):
  """The run produced a non-finite loss or its targets collapsed."""


class MetricWriter:
  """Writes one JSON object per log step to `<workdir>/metrics.jsonl` and TensorBoard events.

  A run resumed at `start_step` (0 for a fresh one) first drops the rows a stopped run wrote
  after that step, since the resumed run writes them again; TensorBoard's `purge_step` hides
  the events past it. The file then reads as an uninterrupted run's.
  """

  def __init__(self, workdir, start_step: int = 0, enable_tensorboard: bool = True):
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "metrics.jsonl"
    _drop_rows_after(path, start_step)
    self._jsonl = open(path, "a")  # closed in close()
    self._tb = None
    if enable_tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1)

  def write(self, step: int, scalars: dict) -> None:
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in row.items():
        if key != "step":
          self._tb.add_scalar(key, value, int(step))
      self._tb.flush()

  def close(self) -> None:
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _drop_rows_after(path: pathlib.Path, step: int) -> None:
  """Rewrites `path` (atomically) without its rows past `step`, or a torn last line."""
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # the line a killed run was writing
      continue
    if row.get("step", 0) <= step:
      kept.append(line)
  tmp = path.with_suffix(".jsonl.tmp")
  tmp.write_text("".join(line + "\n" for line in kept))
  tmp.replace(path)


def format_line(step: int, scalars: dict) -> str:
  """A compact log line: `step 120 | loss 0.512 | target_var 0.843 | ...`."""
  parts = [f"step {step}"]
  for key, value in scalars.items():
    parts.append(f"{key} {value:.4g}")
  return " | ".join(parts)


def check_health(step: int, scalars: dict, loop_cfg, saved_step: int | None = None) -> None:
  """Raises TrainingHealthError on a non-finite loss or (after warm-up) collapsed targets;
  `saved_step`: the newest checkpoint's step (None: none was written yet), which it names."""
  bad = [
    k for k in ("loss", "grad_norm", "param_norm") if k in scalars and not math.isfinite(scalars[k])
  ]
  if bad:
    kept = (
      "No checkpoint was written yet"
      if saved_step is None
      else f"The checkpoint of step {saved_step} is kept and a rerun resumes from it"
    )
    raise TrainingHealthError(
      f"Non-finite {', '.join(bad)} at step {step}. {kept}. Lower config.optim.lr, enable "
      "clipping (config.optim.clip_norm), or use float32 compute."
    )
  if step < loop_cfg.collapse_check_after:
    return
  target_std, pred_std = scalars.get("target_var"), scalars.get("pred_var")
  if target_std is not None and target_std < loop_cfg.min_target_std:
    raise TrainingHealthError(
      f"Target collapse at step {step}: target std {target_std:.4f} < "
      f"config.loop.min_target_std={loop_cfg.min_target_std}. The teacher's representations "
      "have become constant; lower config.optim.lr or raise config.ema.decay (spec §0.7)."
    )
  if pred_std is not None and pred_std < loop_cfg.min_pred_std:
    raise TrainingHealthError(
      f"Prediction collapse at step {step}: prediction std {pred_std:.4f} < "
      f"config.loop.min_pred_std={loop_cfg.min_pred_std}; lower config.optim.lr (spec §0.7)."
    )
