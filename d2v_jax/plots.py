"""Training curves of a work directory, for notebooks and quick looks (issue 9, notebooks/).

`read_metrics(workdir)` reads the rows the training loop appends to `metrics.jsonl` (one JSON
object per logged step: loss, learning rate, probe accuracies on probe steps, ...);
`plot_run(workdir)` draws the loss and, where logged, the linear and kNN probe accuracies
(pretraining) or the dev-set scores (fine-tuning) against the update. matplotlib is imported
only here.
"""

import json
import pathlib

# Scores logged at evaluation steps: pretraining probes, fine-tuning dev-set metrics.
_SCORE_PREFIXES = ("probe_", "dev_")


def read_metrics(workdir) -> list[dict]:
  """The rows of `<workdir>/metrics.jsonl`, in order (a resumed run appends; later rows win)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: has the run logged a step yet?")
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  by_step = {row["step"]: row for row in rows}
  return [by_step[step] for step in sorted(by_step)]


def series(rows: list[dict], name: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the rows that logged `name`."""
  kept = [row for row in rows if name in row]
  return [row["step"] for row in kept], [row[name] for row in kept]


def plot_run(workdir, title: str | None = None):
  """Loss (left) and scores (right) of a run against the update; returns the figure."""
  import matplotlib.pyplot as plt

  rows = read_metrics(workdir)
  scores = sorted({name for row in rows for name in row if name.startswith(_SCORE_PREFIXES)})
  fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(10 if scores else 5, 3.5))
  axes = list(axes) if scores else [axes]
  axes[0].plot(*series(rows, "loss"), marker=".")
  axes[0].set(xlabel="update", ylabel="loss", yscale="log", title="training loss")
  for name in scores:
    axes[1].plot(*series(rows, name), marker="o", label=name)
  if scores:
    axes[1].set(xlabel="update", ylabel="score", title="evaluation")
    axes[1].legend()
  fig.suptitle(title or str(workdir))
  fig.tight_layout()
  return fig
