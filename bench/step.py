"""Pretraining step benchmark (issue 7, items 1 and 2). Run by hand, never as a test.

    .venv/bin/python -m bench.step --modality=audio --variant=tiny --version=1 --steps=5
    .venv/bin/python -m bench.step --modality=all --variant=tiny --version=1,2 --torch
    .venv/bin/python -m bench.step --modality=image --variant=base --batch_size=4 --torch
    .venv/bin/python -m bench.step --modality=text --dtype=float32,bfloat16 --remat=none,full

For each (modality, variant, version) it builds the step the training loop runs (the config of
`configs/<modality>.py:variant=...,version=...`, the model, optimiser and train state as
`d2v_jax/train.py` makes them, the step of `steps.py` / `steps_v2.py` jitted by `loop.jit_step`
with the state donated), feeds it a synthetic batch of the pipeline's keys and shapes, and reports:

- compile time (lower + compile) and the step time after compilation (median of `--steps`, each
  step waited for with `block_until_ready`), with throughput in the modality's unit (audio
  seconds, images or tokens per second);
- the process's peak resident memory (`ru_maxrss`: compilation included);
- the model FLOPs of one step counted analytically (`bench/flops.py`: 3 × student forward +
  teacher forward) next to XLA's `compiled.cost_analysis()["flops"];
- MFU: analytic FLOPs per second over a float32 and a bfloat16 matmul peak (a jitted square
  `jnp.dot`) measured in the same process just before the step.

Each configuration runs in its own child process, so memory peaks and compilation caches do not
mix. With `--torch` a PyTorch reference of the same architecture and batch (`bench/torch_ref.py`,
data2vec 1.0 only) runs next, in the torch interpreter (`--torch_python`, default
`$D2V_TORCH_PYTHON` or `.venv-torch/bin/python`) with the same thread count, and the table adds
its step time and the ratio of throughputs (ours / torch). With both versions (`--version=1,2`)
a second table puts data2vec 1.0 and 2.0 side by side (issue 8): FLOPs per sample and throughput.

`--dtype`, `--remat` and `--fused_attention` take comma lists (issue 7 item 3); every
combination is a job, and a third table compares each with its float32, no-remat, unfused
baseline of the same run: throughput, XLA's temporary memory of the compiled step
(`memory_analysis().temp_size_in_bytes`: the activations the backward pass keeps), peak RSS and
the largest relative loss difference over the steps on the same fixed batch.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODALITIES = ("audio", "image", "text")
UNITS = {"audio": "audio-s/s", "image": "images/s", "text": "tokens/s"}
RESULT_TAG = "BENCH_RESULT "
# RoBERTa's GPT-2 BPE: the base text model's vocabulary (the embedded tokenizer is tiny's).
ROBERTA_VOCAB = 50265


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--modality", default="all", help="audio, image, text, a comma list, or all")
  p.add_argument("--variant", default="tiny", help="tiny, base, large, or a comma list")
  p.add_argument("--version", default="1", help="1, 2, 1,2 or all")
  p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  p.add_argument("--batch_size", type=int, default=0, help="global batch; 0 = the config's")
  p.add_argument(
    "--audio_length", type=int, default=0, help="samples per clip; 0 = the longest crop"
  )
  p.add_argument("--text_length", type=int, default=0, help="tokens per block; 0 = max_length")
  p.add_argument("--dtype", default="float32", help="config.model.dtype(s): float32,bfloat16")
  p.add_argument("--remat", default="none", help="config.model.remat(s): none,full,dots")
  p.add_argument("--fused_attention", default="0", help="config.model.fused_attention: 0,1")
  p.add_argument("--peak_size", type=int, default=2048, help="side of the peak matmul")
  p.add_argument("--torch", action="store_true", help="also run the PyTorch reference (v1)")
  p.add_argument(
    "--torch_python",
    default=os.environ.get("D2V_TORCH_PYTHON", str(REPO / ".venv-torch/bin/python")),
    help="interpreter with torch and transformers",
  )
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  p.add_argument("--json", default="", help="also write every result to this JSON file")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # one job, in a child
  return p.parse_args(argv)


def expand(value: str, choices) -> list:
  if value == "all":
    return list(choices)
  items = [v.strip() for v in value.split(",") if v.strip()]
  for item in items:
    if item not in choices:
      raise SystemExit(f"{item!r} is not one of {', '.join(choices)}")
  return items


def make_jobs(args) -> list[dict]:
  fields = ("steps", "warmup", "batch_size", "audio_length", "text_length", "peak_size")
  common = {k: getattr(args, k) for k in fields}
  return [
    dict(common, modality=m, variant=v, version=int(n), dtype=d, remat=r, fused_attention=f == "1")
    for m in expand(args.modality, MODALITIES)
    for v in expand(args.variant, ("tiny", "base", "large"))
    for n in expand(args.version, ("1", "2"))
    for d in expand(args.dtype, ("float32", "bfloat16"))
    for r in expand(args.remat, ("none", "full", "dots"))
    for f in expand(args.fused_attention, ("0", "1"))
  ]


# What a job changes from the plain float32 step, and the values that make the baseline.
EXECUTION_DEFAULTS = dict(dtype="float32", remat="none", fused_attention=False)


def job_name(job: dict) -> str:
  """e.g. `text-base-v1` or `text-base-v1 bfloat16 remat=full`."""
  name = f"{job['modality']}-{job['variant']}-v{job['version']}"
  changed = [(k, job.get(k, v)) for k, v in EXECUTION_DEFAULTS.items() if job.get(k, v) != v]
  return " ".join([name] + [str(v) if k == "dtype" else f"{k}={v}" for k, v in changed])


# ------------------------------------------------------------------------------------------------
# The JAX step (runs in a child process, one configuration each)


def make_config(job: dict):
  """`configs/<modality>.py:variant=...,version=...` (as main.py's config flag builds it), with
  the benchmark's batch size, dtype and vocabulary."""
  import importlib

  module = importlib.import_module(f"configs.{job['modality']}")
  config = module.get_config(f"variant={job['variant']},version={job['version']}")
  if job["batch_size"]:
    config.input.batch_size = job["batch_size"]
  if job["text_length"] and config.modality == "text":
    config.input.max_length = job["text_length"]
  for field, default in EXECUTION_DEFAULTS.items():
    setattr(config.model, field, job.get(field, default))
  if config.modality == "text":
    if job["variant"] == "tiny":  # the embedded tokenizer's vocabulary, as a real run
      from d2v_jax import train

      train.complete_config(config)
    else:
      config.model.vocab_size = ROBERTA_VOCAB
      config.masking.mask_id = ROBERTA_VOCAB - 1
  return config


def input_length(config, job: dict) -> int:
  """Samples per clip (audio) or tokens per block (text); 0 for images."""
  if config.modality == "audio":
    return job["audio_length"] or max(config.input.crop_lengths)
  if config.modality == "text":
    return config.input.max_length
  return 0


def synthetic_batch(config, batch: int, length: int, seed: int = 0) -> dict:
  """A batch with the pipeline's keys, shapes and dtypes (DESIGN.md "Batches"), nothing padded."""
  rng = np.random.default_rng(seed)
  if config.modality == "audio":
    audio = rng.standard_normal((batch, length), np.float32)
    return {"audio": audio, "padding_mask": np.zeros((batch, length), bool)}
  if config.modality == "image":
    size = config.model.image_size
    return {"image": rng.standard_normal((batch, size, size, 3), np.float32)}
  from configs import text as text_config

  vocab = config.model.vocab_size
  tokens = rng.integers(text_config.UNK + 1, vocab - 1, (batch, length), dtype=np.int32)
  tokens[:, 0], tokens[:, -1] = text_config.BOS, text_config.EOS
  return {"tokens": tokens, "padding_mask": np.zeros((batch, length), bool)}


def inputs_per_step(config, batch: int, length: int) -> float:
  """Audio seconds, images or tokens in one batch (every position valid)."""
  if config.modality == "audio":
    return batch * length / config.input.sample_rate
  if config.modality == "image":
    return float(batch)
  return float(batch * length)


def build(config):
  """(model, tx, schedule, make_state, make_step): what training builds (`train.build`; the text
  vocabulary is already set, so the tokenizer check of `train.setup` is skipped)."""
  from d2v_jax import train

  return (*train.build(config), train.step_builder(config))


def matmul_peak(size: int, dtype: str, reps: int = 8) -> float:
  """FLOP/s of a jitted [size, size] @ [size, size] in `dtype`: the best of `reps` (a ceiling;
  the median would count the other jobs of a shared machine against it)."""
  import jax
  import jax.numpy as jnp

  a, b = (jax.random.normal(jax.random.key(i), (size, size), dtype) for i in (1, 2))
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2.0 * size**3 / min(times)


def xla_flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled executable (a dict, or a list of one per device)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def time_steps(compiled, state, batch, key, warmup: int, steps: int):
  """(state, step times in s, losses): each step blocked on; the loss read after the clock."""
  import jax

  times, losses = [], []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, key)
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - start
    losses.append(float(metrics["loss"]))
    if i >= warmup:
      times.append(elapsed)
  return state, times, losses


def compile_and_time(config, batch: dict, warmup: int, steps: int) -> dict:
  """`config`'s pretraining step as training builds it (`build`, `loop.jit_step`, the state
  donated), compiled for `batch` (host arrays, the whole global batch) and timed (`time_steps`):
  {compiled, compile_s, step_times, losses, num_params}."""
  import jax

  from d2v_jax import loop, sharding

  model, tx, schedule, make_state, make_step = build(config)
  mesh = sharding.make_mesh()
  replicated = sharding.replicated(mesh)
  state = jax.jit(make_state, out_shardings=replicated)()
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  batch = sharding.put_batch(batch, mesh)
  key = jax.device_put(jax.random.key(0), replicated)
  step = loop.jit_step(make_step(model, tx, schedule, config), mesh)

  start = time.perf_counter()
  lowered = step.lower(state, batch, key)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  _, times, losses = time_steps(compiled, state, batch, key, warmup, steps)
  return dict(
    compiled=compiled,
    compile_s=compile_s,
    step_times=times,
    losses=losses,
    num_params=int(num_params),
    temp_mib=memory.temp_size_in_bytes / 2**20 if memory else None,
  )


def run_jax(job: dict) -> dict:
  """Benchmarks one configuration's pretraining step in this process."""
  import jax

  jax.config.update("jax_threefry_partitionable", True)
  from bench import flops

  config = make_config(job)
  peaks = {d: matmul_peak(job["peak_size"], d) for d in ("float32", "bfloat16")}
  batch_size, length = config.input.batch_size, input_length(config, job)
  batch = synthetic_batch(config, batch_size, length)
  timed = compile_and_time(config, batch, job["warmup"], job["steps"])
  compiled, compile_s = timed["compiled"], timed["compile_s"]
  times, losses, num_params = timed["step_times"], timed["losses"], timed["num_params"]

  step_s = statistics.median(times)
  model_flops = flops.step_flops(config, batch_size, length)
  return dict(
    job,
    batch_size=batch_size,
    length=length,
    num_params=int(num_params),
    compile_s=compile_s,
    step_s=step_s,
    step_times=times,
    throughput=inputs_per_step(config, batch_size, length) / step_s,
    peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    temp_mib=timed["temp_mib"],
    flops=model_flops.total,
    student_forward_flops=model_flops.student_forward,
    teacher_forward_flops=model_flops.teacher_forward,
    xla_flops=xla_flops(compiled),
    peak_flops=peaks,
    losses=losses,
    loss_finite=bool(np.all(np.isfinite(losses))),
    devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    load_average=os.getloadavg()[0],  # other jobs on the machine, over the last minute
    torch_spec=torch_spec(config, batch_size, length, job),
  )


# ------------------------------------------------------------------------------------------------
# The PyTorch reference (bench/torch_ref.py in the torch interpreter)


def torch_spec(config, batch: int, length: int, job: dict) -> dict | None:
  """What `bench/torch_ref.py` needs to build the same architecture, batch and update (v1)."""
  if config.version != 1:
    return None
  from d2v_jax.models import data2vec

  m, t, o = config.model, config.targets, config.optim
  sizes = data2vec.model_sizes(config.modality, m)
  if config.modality == "audio":
    mask_fraction = 0.5  # about what span masking (p 0.65, spans of 5-10) leaves masked
  elif config.modality == "image":
    mask_fraction = config.masking.masked_patches / config.masking.reference_patches
  else:
    mask_fraction = config.masking.span_prob
  return dict(
    modality=config.modality,
    batch=batch,
    length=length,
    sizes={k: v for k, v in sizes.items() if isinstance(v, int | float)},
    dropout=m.dropout,
    attention_dropout=m.attention_dropout,
    drop_path=m.get("drop_path_rate", 0.0),
    layer_scale=m.get("layer_scale_init", 0.0),
    layer_norm_eps=m.get("layer_norm_eps", 1e-5),
    pad_id=m.get("pad_id", 1),
    top_k=t.top_k,
    layer_output=t.layer_output,
    layer_norm=t.layer_norm,
    final_norm=t.final_norm,
    beta=config.loss.beta,
    scale=None if config.loss.scale < 0 else config.loss.scale,
    reduce_dims=config.loss.reduce_dims,
    mask_fraction=mask_fraction,
    lr=o.lr,
    b1=o.b1,
    b2=o.b2,
    eps=o.eps,
    weight_decay=o.weight_decay,
    clip_norm=o.clip_norm,
    ema_decay=config.ema.decay,
    steps=job["steps"],
    warmup=job["warmup"],
  )


def run_torch(spec: dict, args) -> dict | None:
  if not Path(args.torch_python).exists():
    print(f"--torch: {args.torch_python} not found (bench/README.md says how to make it)")
    return None
  command = [args.torch_python, str(REPO / "bench/torch_ref.py"), "--threads", str(args.threads)]
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  return run_child(command + ["--spec", json.dumps(spec)], env)


# ------------------------------------------------------------------------------------------------
# The parent: machine, children, tables


def run_child(command: list[str], env=None) -> dict | None:
  """Runs `command`, passing its stderr through; returns the dict its RESULT_TAG line holds."""
  proc = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_TAG):
      return json.loads(line[len(RESULT_TAG) :])
  print(f"{shlex.join(command[:3])} ... failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
  return None


def cpu_model() -> str:
  for line in Path("/proc/cpuinfo").read_text().splitlines():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or "unknown"


def machine() -> dict:
  import jax

  return dict(
    date=datetime.date.today().isoformat(),
    cpu=cpu_model(),
    cores=len(os.sched_getaffinity(0)),
    load_average=" ".join(f"{x:.1f}" for x in os.getloadavg()),
    python=platform.python_version(),
    jax=jax.__version__,
    device=f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})",
  )


def fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def rate(value: float) -> str:
  """Three significant digits, without an exponent below 10⁶."""
  return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def print_table(rows: list[dict]) -> None:
  header = (
    f"{'config':<34} {'batch':>12} {'compile s':>9} {'step ms':>9} {'throughput':>19} "
    f"{'RSS MiB':>8} {'GFLOP':>8} {'XLA/ana':>7} {'GFLOP/s':>8} {'MFU32':>6} {'MFU16':>6} "
    f"{'torch ms':>9} {'ours/torch':>10}"
  )
  print(header)
  print("-" * len(header))
  for r in rows:
    achieved = r["flops"] / r["step_s"]
    ratio = r["xla_flops"] / r["flops"] if r["xla_flops"] else None
    torch = r.get("torch") or {}
    speedup = torch["step_s"] / r["step_s"] if torch.get("step_s") else None
    shape = f"{r['batch_size']}x{r['length']}" if r["length"] else str(r["batch_size"])
    print(
      f"{job_name(r):<34} {shape:>12} {r['compile_s']:9.1f} "
      f"{1e3 * r['step_s']:9.1f} {rate(r['throughput']):>9} {UNITS[r['modality']]:<9} "
      f"{r['peak_rss_mib']:8.0f} {r['flops'] / 1e9:8.1f} {fmt(ratio, '7.2f')} "
      f"{achieved / 1e9:8.1f} {achieved / r['peak_flops']['float32']:6.1%} "
      f"{achieved / r['peak_flops']['bfloat16']:6.1%} "
      f"{fmt(torch.get('step_s') and 1e3 * torch['step_s'], '9.1f')} {fmt(speedup, '10.2f')}"
    )


def print_peaks(rows: list[dict]) -> None:
  for r in rows:
    p = r["peak_flops"]
    print(
      f"  {job_name(r)}: matmul peak "
      f"{p['float32'] / 1e9:.0f} GFLOP/s fp32, {p['bfloat16'] / 1e9:.0f} GFLOP/s bf16; "
      f"{r['num_params'] / 1e6:.1f} M params; step min {1e3 * min(r['step_times']):.1f} ms; "
      f"loss {r['losses'][0]:.4g} -> {r['losses'][-1]:.4g}; load {r['load_average']:.1f}"
      + ("" if r["loss_finite"] else "  NON-FINITE LOSS")
    )
    if r.get("torch"):
      t = r["torch"]
      print(
        f"    torch: step {1e3 * t['step_s']:.1f} ms (min {1e3 * min(t['step_times']):.1f}), "
        f"{t['num_params'] / 1e6:.1f} M params, load {t['load_average']:.1f}, "
        f"peak RSS {t['peak_rss_mib']:.0f} MiB, loss {t['losses'][0]:.4g} -> "
        f"{t['losses'][-1]:.4g}, attention {t['attention']}, torch {t['torch']}, "
        f"transformers {t['transformers']}, {t['threads']} threads"
      )


def print_versions(rows: list[dict]) -> None:
  """data2vec 1.0 and 2.0 side by side per (modality, variant): FLOPs per sample, throughput."""
  pairs = {}
  for r in rows:
    if any(r.get(k) != v for k, v in EXECUTION_DEFAULTS.items()):
      continue  # the float32 steps only
    pairs.setdefault((r["modality"], r["variant"]), {})[r["version"]] = r
  pairs = {k: v for k, v in pairs.items() if len(v) == 2}
  if not pairs:
    return
  print("\ndata2vec 1.0 vs 2.0 (per sample; v2 encodes M clones of K kept tokens + a decoder)")
  print(
    f"{'config':<12} {'GFLOP/sample v1':>16} {'v2':>8} {'v2/v1':>6} "
    f"{'throughput v1':>24} {'v2':>10} {'v2/v1':>6}"
  )
  for (modality, variant), pair in pairs.items():
    v1, v2 = pair[1], pair[2]
    per_sample = [p["flops"] / p["batch_size"] / 1e9 for p in (v1, v2)]
    print(
      f"{modality}-{variant:<6} {per_sample[0]:16.2f} {per_sample[1]:8.2f} "
      f"{per_sample[1] / per_sample[0]:6.2f} {rate(v1['throughput']):>14} {UNITS[modality]:<9} "
      f"{rate(v2['throughput']):>10} {v2['throughput'] / v1['throughput']:6.2f}"
    )


def print_execution(rows: list[dict]) -> None:
  """Each dtype / remat / fused-attention job against its float32 baseline of the same run."""
  base_key = lambda r: (r["modality"], r["variant"], r["version"])  # noqa: E731
  baselines = {
    base_key(r): r for r in rows if all(r.get(k) == v for k, v in EXECUTION_DEFAULTS.items())
  }
  others = [r for r in rows if base_key(r) in baselines and r is not baselines[base_key(r)]]
  if not others:
    return
  print("\nExecution choices against the float32 / remat=none / unfused step of this run")
  print(
    f"{'config':<34} {'speed x':>8} {'XLA temp MiB':>13} {'x':>6} {'RSS x':>6} "
    f"{'max loss diff':>13}"
  )
  for r in others:
    b = baselines[base_key(r)]
    temp = r.get("temp_mib")
    temp_ratio = temp / b["temp_mib"] if temp is not None and b.get("temp_mib") else None
    steps = min(len(r["losses"]), len(b["losses"]))
    loss_diff = max(abs(x - y) / abs(y) for x, y in zip(r["losses"][:steps], b["losses"][:steps]))
    print(
      f"{job_name(r):<34} {r['throughput'] / b['throughput']:8.2f} {fmt(temp, '13.0f')} "
      f"{fmt(temp_ratio, '6.2f')} {r['peak_rss_mib'] / b['peak_rss_mib']:6.2f} {loss_diff:13.2%}"
    )


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.worker:
    print(RESULT_TAG + json.dumps(run_jax(json.loads(args.worker))), flush=True)
    return
  info = machine()
  python = os.path.relpath(sys.executable, REPO)
  print("command:", shlex.join([python, "-m", "bench.step", *sys.argv[1:]]))
  print("machine:", ", ".join(f"{k} {v}" for k, v in info.items()))
  print(f"threads: XLA's CPU pool ({info['cores']} cores); torch.set_num_threads({args.threads})")
  rows = []
  for job in make_jobs(args):
    name = job_name(job)
    print(f"... {name}", flush=True)
    result = run_child([sys.executable, "-m", "bench.step", "--worker", json.dumps(job)])
    if result is None:
      continue
    spec = result.pop("torch_spec")
    if args.torch and spec is not None:
      print(f"... {name} torch", flush=True)
      result["torch"] = run_torch(spec, args)
    rows.append(result)
  print()
  print_table(rows)
  print_peaks(rows)
  print_versions(rows)
  print_execution(rows)
  if args.json:
    Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
  main()
