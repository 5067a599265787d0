"""The training loop shared by pretraining and fine-tuning (DESIGN.md, "Core contracts").

`start` restores the newest checkpoint of the work directory (state and data position) or makes
a fresh state; `run` steps until `config.loop.total_steps` with the progress bar, log lines,
JSONL/TensorBoard rows, health checks, periodic evaluation and checkpoints. Step k uses
`fold_in(loop_key, k)` inside the jitted step, so a resumed run draws the same masks and dropout.
`StepTrace` records a `jax.profiler` trace of chosen steps, and each step runs under a transfer
guard: an implicit host-device copy in its dispatch (a host array or scalar where a device
array belongs, a device value read on the host) fails loudly instead of stalling every step.
"""

import dataclasses
import pathlib
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from d2v_jax import checkpoint, metrics, sharding

# Per-step metrics that are summed into rates, not averaged into the log line.
_COUNTERS = ("valid_inputs", "num_masked")


@dataclasses.dataclass(frozen=True)
class Throughput:
  """How a modality counts its inputs: `name` for the rate, `unit` valid inputs per count."""

  name: str  # e.g. "audio_seconds_per_sec"
  unit: float  # valid inputs per counted thing (samples per second of audio; 1 otherwise)


def throughput_of(config) -> Throughput:
  """audio-seconds/s for speech, images/s for vision, tokens/s for text."""
  if config.modality == "audio":
    return Throughput("audio_seconds_per_sec", float(config.input.sample_rate))
  if config.modality == "image":
    return Throughput("images_per_sec", 1.0)
  return Throughput("tokens_per_sec", 1.0)


def start(ckpt: checkpoint.Checkpointer, make_state, data_iter, state_sharding, fresh=None):
  """(state, resumed): the newest checkpoint restored onto `make_state`'s shapes, or a fresh one.

  `state_sharding` (one sharding, or a pytree of them like the state's: `sharding.
  train_state_shardings`) is the layout of the returned state; a checkpoint written under
  another mesh (other device or process count, other `fsdp`) is read straight into it.
  `fresh(state_sharding)` builds the fresh state (default: `make_state` jitted); fine-tuning
  passes one that loads pretrained weights.
  """
  latest = ckpt.newest_intact_step()
  if latest is None:
    if fresh is not None:
      state = fresh(state_sharding)
    else:
      state = jax.jit(make_state, out_shardings=state_sharding)()
    count = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("Fresh start: %s parameters", f"{count:,}")
    return state, False
  abstract = checkpoint.abstract_state(make_state, sharding=state_sharding)
  state = ckpt.restore(latest, abstract, data_iter)
  logging.info("Resumed from step %d", latest)
  return state, True


class StepTrace:
  """A `jax.profiler` trace of steps `first` .. `first + count - 1` (1-based, as logged) into
  `directory`; `first` = 0 traces nothing. The trace ends after the last traced step's result
  is ready, so it holds whole steps, the input pipeline's work between them included."""

  def __init__(self, first: int, count: int, directory: pathlib.Path):
    self.first, self.last, self.directory = first, first + count - 1, directory
    self.active = False
    if first and count < 1:
      raise ValueError(f"config.loop.profile_steps={count}: trace at least one step")

  def before(self, step: int) -> None:
    """Called before step number `step` runs."""
    if self.first and step == self.first:
      jax.profiler.start_trace(str(self.directory))
      self.active = True

  def after(self, step: int, state) -> None:
    """Called after step number `step` was dispatched; `state` is its output."""
    if self.active and step >= self.last:
      jax.block_until_ready(state)
      self.stop()
      logging.info("Profile of steps %d-%d written to %s", self.first, step, self.directory)

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def jit_step(step_fn, mesh, state_sharding=None):
  """`step_fn(state, batch, loop_key)` jitted: the state laid out by `state_sharding` (default
  replicated) in and out, the batch split over the mesh, key and metrics replicated, the old
  state's buffers donated to the new one."""
  replicated = sharding.replicated(mesh)
  state_sharding = replicated if state_sharding is None else state_sharding
  return jax.jit(
    step_fn,
    in_shardings=(state_sharding, sharding.batch_sharded(mesh), replicated),
    out_shardings=(state_sharding, replicated),
    donate_argnums=(0,),
  )


def run(
  config,
  state,
  train_step: Callable,
  data_iter,
  mesh,
  loop_key,
  ckpt: checkpoint.Checkpointer,
  writer: metrics.MetricWriter | None,
  *,
  evaluate: Callable | None = None,
  eval_every: int = 0,
):
  """Steps `state` to `config.loop.total_steps`; returns (state, the last logged metrics).

  `evaluate(state) -> dict` runs every `eval_every` steps (0 = never); its scalars join that
  step's log row. Checkpoints are written every `loop.checkpoint_every` steps and at the end.
  """
  loop = config.loop
  throughput = throughput_of(config)
  loop_key = sharding.put_global(loop_key, sharding.replicated(mesh))
  progress = tqdm(
    total=loop.total_steps,
    initial=int(state.step),
    disable=not loop.progress_bar or jax.process_index() != 0,
    unit="step",
    dynamic_ncols=True,
  )
  trace = StepTrace(
    loop.get("profile_first_step", 0),
    loop.get("profile_steps", 1),
    ckpt.directory.parent / "profile",
  )
  pending, last, data_wait = [], {}, 0.0
  window_start = time.perf_counter()
  step = int(state.step)
  saved_step = ckpt.latest_step()  # named by a health stop
  next_save = min(loop.total_steps, (step // loop.checkpoint_every + 1) * loop.checkpoint_every)
  ckpt.check_space(state, next_save)  # before compiling: the disk holds the next checkpoint
  try:
    while step < loop.total_steps:
      trace.before(step + 1)
      t0 = time.perf_counter()
      batch = sharding.put_batch(next(data_iter), mesh, config.input.batch_size)
      data_wait += time.perf_counter() - t0
      with jax.transfer_guard("disallow"):  # a step never waits on the host (issue 7)
        state, step_metrics = train_step(state, batch, loop_key)
      pending.append(step_metrics)
      step += 1
      trace.after(step, state)
      progress.update(1)
      is_ckpt = step % loop.checkpoint_every == 0 or step == loop.total_steps
      is_eval = evaluate is not None and eval_every and step % eval_every == 0
      is_log = step % loop.log_every == 0 or is_ckpt or is_eval
      if is_log:
        last = summarise(jax.device_get(pending), window_start, data_wait, throughput)
        metrics.check_health(step, last, loop, saved_step)
        if is_eval:
          last.update(evaluate(state))
        if writer:
          writer.write(step, last)
        logging.info(metrics.format_line(step, last))
        progress.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
      if is_ckpt:
        ckpt.save(step, state, data_iter)
        saved_step = step
      if is_log:
        # Rates cover training only: evaluation and the checkpoint's blocking part are excluded.
        pending, data_wait, window_start = [], 0.0, time.perf_counter()
  finally:
    trace.stop()  # a run that ends (or fails) inside the traced steps keeps its trace
    progress.close()
    ckpt.wait()
  return state, last


def summarise(window: list[dict], start_time: float, data_wait: float, throughput) -> dict:
  """Averages a window of per-step metrics and adds rates."""
  elapsed = max(time.perf_counter() - start_time, 1e-9)
  summary = {k: float(np.mean([m[k] for m in window])) for k in window[0] if k not in _COUNTERS}
  summary["steps_per_sec"] = len(window) / elapsed
  valid = float(sum(m["valid_inputs"] for m in window))
  summary[throughput.name] = valid / throughput.unit / elapsed
  summary["data_wait_frac"] = data_wait / elapsed
  return summary
