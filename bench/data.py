"""Input pipeline benchmark (issue 7, item 4). Run by hand, never as a test.

    .venv/bin/python -m bench.data
    .venv/bin/python -m bench.data --modalities=image --workers=0,2 --batches=100 --version=2
    .venv/bin/python -m bench.data --quick          # smoke settings: seconds of pipeline time

For each modality it measures the grain pretraining pipeline that
`python main.py --config=configs/<modality>.py` builds by default (the tiny variant's embedded
data set, `train.make_dataset` with the data seed training derives from `config.seed`), once per
grain worker count (`config.input.num_workers`; 0 = read threads in this process):

- after `--warmup` batches (the first one includes the workers' start-up, reported apart), it
  times `--windows` windows of `--batches` batches each, a window lasting at least `--window_s`
  seconds (fast pipelines take more batches); the median over the windows of batches/s,
  records/s (rows) and the modality's unit/s (audio seconds of unpadded samples, images, tokens
  that are not padding: what the training loop's throughput counts) is reported;
- against it, the consumption of the pretraining step of the same config: `bench/step.py`'s
  `compile_and_time` (the model, optimiser and state of `train.build`, `loop.jit_step` with the
  state donated) on a batch the pipeline produced, the median of `--steps` steps. Speech batches
  come in one length per crop bucket: the step is timed for each length seen, and its batches/s
  is one over the mean step time over the buckets of the timed batches.

The ratio (pipeline batches/s over step batches/s) is what issue 7 asks to be at least
`TARGET_RATIO`. The pipeline is timed alone, with no step running: during training it shares the
cores with the step, so the ratio is its headroom, not a prediction of `data_wait_frac` (README).
Each modality runs in its own child process (pipelines first, then the step).
"""

import argparse
import collections
import importlib.metadata
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench import step as step_bench

MODALITIES = step_bench.MODALITIES
UNITS = step_bench.UNITS
VARIANT = "tiny"  # main.py's default variant: the embedded data sets
TARGET_RATIO = 5.0  # issue 7: the pipeline delivers at least this many times what the step uses
# --quick: a smoke run (the figures mean nothing): few batches, one timed step.
QUICK = dict(warmup=1, windows=2, batches=2, window_s=0.0, step_warmup=0, steps=1)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--modalities", default="all", help="audio, image, text, a comma list, or all")
  p.add_argument("--workers", default="0,1,2", help="grain worker counts, a comma list")
  p.add_argument("--version", default="1", help="data2vec version: 1, 2 or 1,2")
  p.add_argument("--batches", type=int, default=40, help="batches per timing window (at least)")
  p.add_argument("--windows", type=int, default=5, help="timing windows (the median reported)")
  p.add_argument("--window_s", type=float, default=1.0, help="shortest timing window, seconds")
  p.add_argument("--warmup", type=int, default=10, help="untimed batches first (>= prefetch)")
  p.add_argument("--steps", type=int, default=3, help="timed train steps (median reported)")
  p.add_argument("--step_warmup", type=int, default=1, help="untimed steps after compilation")
  p.add_argument("--quick", action="store_true", help="smoke settings: " + json.dumps(QUICK))
  p.add_argument("--json", default="", help="also write every result to this JSON file")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # one modality, in a child
  args = p.parse_args(argv)
  if args.quick:
    for name, value in QUICK.items():
      setattr(args, name, value)
  return args


def make_jobs(args) -> list[dict]:
  workers = [int(w) for w in args.workers.split(",") if w.strip()]
  if not workers or min(workers) < 0:
    raise SystemExit(f"--workers={args.workers!r}: a comma list of counts >= 0")
  timing = {
    k: getattr(args, k)
    for k in ("batches", "windows", "window_s", "warmup", "steps", "step_warmup")
  }
  return [
    dict(modality=m, version=int(v), workers=workers, **timing)
    for m in step_bench.expand(args.modalities, MODALITIES)
    for v in step_bench.expand(args.version, ("1", "2"))
  ]


# ------------------------------------------------------------------------------------------------
# One modality (in a child process, or in-process from a test)


def step_job(job: dict) -> dict:
  """The `bench/step.py` job of `job`: main.py's tiny config at its own batch and length, with
  the default execution choices."""
  return dict(
    modality=job["modality"],
    variant=VARIANT,
    version=job["version"],
    batch_size=0,  # the config's
    text_length=0,
  )


def job_name(job: dict) -> str:
  """e.g. `text-tiny-v1`."""
  return step_bench.job_name(step_job(job))


def make_config(job: dict):
  """`configs/<modality>.py:variant=tiny,version=...` as main.py builds it (the text vocabulary
  from the embedded tokenizer), through `bench/step.py`."""
  return step_bench.make_config(step_job(job))


def count_units(config, batch: dict) -> float:
  """Audio seconds, images or tokens in `batch`, padding left out (the loop's `valid_inputs`)."""
  if config.modality == "image":
    return float(len(batch["image"]))
  valid = float(np.count_nonzero(~batch["padding_mask"]))
  return valid / config.input.sample_rate if config.modality == "audio" else valid


def shape_key(batch: dict) -> str:
  """One key per compiled step: the batch's shapes (speech: one per crop length)."""
  return ",".join(f"{k}{list(v.shape)}" for k, v in sorted(batch.items()))


def measure_pipeline(config, num_workers: int, data_seed: int, job: dict) -> dict:
  """Builds the pretraining dataset with `num_workers` grain workers and times its iterator.

  Returns the timings and, per batch shape, how many timed batches had it and one such batch.
  """
  from d2v_jax import train

  config.input.num_workers = num_workers
  start = time.perf_counter()
  dataset = train.make_dataset(config, data_seed)
  build_s = time.perf_counter() - start
  iterator = iter(dataset)
  shapes, examples, windows = collections.Counter(), {}, []
  try:
    start = time.perf_counter()
    next(iterator)
    first_s = time.perf_counter() - start
    for _ in range(job["warmup"] - 1):
      next(iterator)
    for _ in range(job["windows"]):
      batches = records = 0
      units = 0.0
      start = time.perf_counter()
      while batches < job["batches"] or time.perf_counter() - start < job["window_s"]:
        batch = next(iterator)
        batches += 1
        records += len(next(iter(batch.values())))
        units += count_units(config, batch)
        key = shape_key(batch)
        shapes[key] += 1
        examples.setdefault(key, batch)
      seconds = time.perf_counter() - start
      windows.append(dict(batches=batches, records=records, units=units, seconds=seconds))
  finally:
    iterator.close()

  def median_rate(field: str) -> float:
    return statistics.median(w[field] / w["seconds"] for w in windows)

  return dict(
    workers=num_workers,
    build_s=build_s,
    first_batch_s=first_s,
    batches_per_s=median_rate("batches"),
    records_per_s=median_rate("records"),
    units_per_s=median_rate("units"),
    windows=windows,
    shapes=dict(shapes),
    examples=examples,
  )


def measure_step(config, shapes: dict, examples: dict, job: dict) -> dict:
  """The step's median time on one pipeline batch of each shape, and its batches/s over the
  mix of shapes the pipeline produced (`shapes`: timed batches per shape)."""
  per_shape = {}
  for key, example in examples.items():
    timed = step_bench.compile_and_time(config, example, job["step_warmup"], job["steps"])
    per_shape[key] = dict(
      batches=shapes[key],
      compile_s=timed["compile_s"],
      step_s=statistics.median(timed["step_times"]),
      step_times=timed["step_times"],
      loss_finite=bool(np.all(np.isfinite(timed["losses"]))),
    )
  total = sum(s["batches"] for s in per_shape.values())
  mean_step_s = sum(s["batches"] * s["step_s"] for s in per_shape.values()) / total
  return dict(shapes=per_shape, mean_step_s=mean_step_s, batches_per_s=1.0 / mean_step_s)


def run_modality(job: dict) -> dict:
  """Every pipeline measurement of `job` (one per worker count), then the step's consumption."""
  import jax
  from absl import flags
  from absl import logging as absl_logging

  from d2v_jax import train

  jax.config.update("jax_threefry_partitionable", True)
  if not flags.FLAGS.is_parsed():  # grain's worker processes read the absl flags
    flags.FLAGS.mark_as_parsed()
  absl_logging.set_verbosity(absl_logging.WARNING)  # the pipelines' summaries, once per build
  config = make_config(job)
  _, data_seed, _ = train.split_seed(config.seed)
  pipelines = [measure_pipeline(config, w, data_seed, job) for w in job["workers"]]
  shapes, examples = collections.Counter(), {}
  for p in pipelines:
    shapes.update(p.pop("shapes"))
    for key, example in p.pop("examples").items():
      examples.setdefault(key, example)
  step = measure_step(config, shapes, examples, job)
  return dict(
    job,
    batch_size=int(config.input.batch_size),
    unit=UNITS[config.modality],
    pipelines=pipelines,
    step=step,
    load_average=os.getloadavg()[0],  # other jobs on the machine, over the last minute
  )


# ------------------------------------------------------------------------------------------------
# The parent: machine, children, table


def table_rows(results: list[dict]) -> list[dict]:
  """One row per (modality, version, worker count)."""
  rows = []
  for r in results:
    step_rate = r["step"]["batches_per_s"]
    for p in r["pipelines"]:
      rows.append(
        dict(
          config=job_name(r),
          batch=r["batch_size"],
          workers=p["workers"],
          batches_per_s=p["batches_per_s"],
          records_per_s=p["records_per_s"],
          units_per_s=p["units_per_s"],
          unit=r["unit"],
          step_batches_per_s=step_rate,
          ratio=p["batches_per_s"] / step_rate,
        )
      )
  return rows


def format_table(rows: list[dict]) -> str:
  """A Markdown table of `table_rows`."""
  rate = step_bench.rate
  lines = [
    "| config | batch | workers | batches/s | records/s | unit/s | step batches/s | ratio |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    mark = "" if r["ratio"] >= TARGET_RATIO else f" (< {TARGET_RATIO:g})"
    lines.append(
      f"| {r['config']} | {r['batch']} | {r['workers']} | {rate(r['batches_per_s'])} | "
      f"{rate(r['records_per_s'])} | {rate(r['units_per_s'])} {r['unit']} | "
      f"{r['step_batches_per_s']:.3g} | {r['ratio']:.1f}{mark} |"
    )
  return "\n".join(lines)


def format_details(results: list[dict]) -> str:
  """Per modality: the start-up of each pipeline, the window rates, the step per batch shape."""
  lines = []
  for r in results:
    lines.append(f"{job_name(r)} (load {r['load_average']:.1f}):")
    for p in r["pipelines"]:
      window_rates = ", ".join(f"{w['batches'] / w['seconds']:.4g}" for w in p["windows"])
      lines.append(
        f"  {p['workers']} workers: build {p['build_s']:.2f} s, first batch "
        f"{p['first_batch_s']:.2f} s; batches/s per window: {window_rates}"
      )
    for key, s in r["step"]["shapes"].items():
      lines.append(
        f"  step on {key}: {1e3 * s['step_s']:.1f} ms (compile {s['compile_s']:.1f} s), "
        f"{s['batches']} of the timed batches" + ("" if s["loss_finite"] else "  NON-FINITE LOSS")
      )
  return "\n".join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.worker:
    print(step_bench.RESULT_TAG + json.dumps(run_modality(json.loads(args.worker))), flush=True)
    return
  info = dict(step_bench.machine(), grain=importlib.metadata.version("grain"))
  python = os.path.relpath(sys.executable, step_bench.REPO)
  print("command:", shlex.join([python, "-m", "bench.data", *sys.argv[1:]]))
  print("machine:", ", ".join(f"{k} {v}" for k, v in info.items()))
  results = []
  for job in make_jobs(args):
    print(f"... {job_name(job)}", flush=True)
    result = step_bench.run_child([sys.executable, "-m", "bench.data", "--worker", json.dumps(job)])
    if result is not None:
      results.append(result)
  print()
  print(format_table(table_rows(results)))
  print(format_details(results))
  print("load average at the end:", " ".join(f"{x:.1f}" for x in os.getloadavg()))
  if args.json:
    Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
  main()
