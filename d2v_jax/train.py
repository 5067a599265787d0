"""The pretraining loop: setup -> resume -> steps with logging, checkpoints and probes.

Resume order: the newest checkpoint in `<workdir>/checkpoints` (state + data position), else a
fresh start from `config.seed`. Keys: the seed is split once into init / data / loop streams;
step k uses `fold_in(loop_key, k)`, so a resumed run draws the same masks and dropout.
"""

import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from d2v_jax import checkpoint, metrics, optim, sharding, steps
from d2v_jax import evaluate as evaluate_lib
from d2v_jax import state as state_lib
from d2v_jax.data import audio as audio_data
from d2v_jax.data import image as image_data
from d2v_jax.data import text as text_data
from d2v_jax.models.data2vec import build_model

# Each modality's throughput: (name, valid inputs per unit): audio-seconds/s, images/s.
_THROUGHPUT = {
  "audio": ("audio_seconds_per_sec", lambda cfg: cfg.input.sample_rate),
  "image": ("images_per_sec", lambda cfg: 1),
  "text": ("tokens_per_sec", lambda cfg: 1),
}


def split_seed(seed: int):
  """(init key, data seed, loop key) from `config.seed`."""
  init_key, data_key, loop_key = jax.random.split(jax.random.key(seed), 3)
  data_seed = int(jax.random.randint(data_key, (), 0, 2**31 - 1))
  return init_key, data_seed, loop_key


_PRETRAIN_DATASETS = {
  "audio": audio_data.make_audio_pretrain_dataset,
  "image": image_data.make_image_pretrain_dataset,
  "text": text_data.make_text_pretrain_dataset,
}


def complete_config(config: ml_collections.ConfigDict) -> None:
  """Fills the fields that come from the data (text: the tokenizer's vocabulary and <mask> id).

  A value left at -1 is taken from the tokenizer; one that was set must agree with it.
  """
  if config.modality != "text":
    return
  tokenizer = text_data.load_tokenizer_for(config.input)
  for field, group, value in (
    ("vocab_size", config.model, tokenizer.vocab_size),
    ("mask_id", config.masking, tokenizer.mask_id),
  ):
    if group[field] == -1:
      group[field] = value
    elif group[field] != value:
      raise ValueError(
        f"config.{'model' if group is config.model else 'masking'}.{field}={group[field]} but "
        f"the tokenizer ({config.input.tokenizer or 'embedded'}) has {value}; leave it at -1"
      )


def make_dataset(config, data_seed: int):
  if config.modality not in _PRETRAIN_DATASETS:
    raise ValueError(f"No pretraining data pipeline for modality {config.modality!r}")
  return _PRETRAIN_DATASETS[config.modality](
    config.input,
    seed=data_seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )


def example_inputs(config):
  """A one-example (inputs, padding mask) of the smallest shape, for parameter initialisation."""
  if config.modality == "image":
    size = config.model.image_size
    return jnp.zeros((1, size, size, 3), jnp.float32), None
  if config.modality == "text":
    length = config.input.max_length
    return jnp.zeros((1, length), jnp.int32), jnp.zeros((1, length), bool)
  length = min(config.input.crop_lengths)
  return jnp.zeros((1, length), jnp.float32), jnp.zeros((1, length), bool)


def setup(config: ml_collections.ConfigDict):
  """Builds the model, the optimiser with its schedule, and `make_state()`.

  `make_state()` initialises the train state from `config.seed`; it is what a fresh run jits,
  what `jax.eval_shape` turns into a restore target, and the probe's random-init baseline.
  """
  complete_config(config)
  model = build_model(config.modality, config.model)
  tx, schedule = optim.make_optimizer(config.optim, config.loop.total_steps)
  init_key, _, _ = split_seed(config.seed)
  make_state = functools.partial(
    state_lib.create_train_state,
    model,
    tx,
    init_key,
    *example_inputs(config),
    tuple(config.ema.teacher_params),
  )
  return model, tx, schedule, make_state


def write_config(workdir: pathlib.Path, config) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains until `config.loop.total_steps`; returns the last logged metrics."""
  workdir = pathlib.Path(workdir)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.input.batch_size, mesh)
  logging.info(
    "Devices: %d (%s), processes: %d",
    jax.device_count(),
    jax.devices()[0].platform,
    jax.process_count(),
  )
  _, data_seed, loop_key = split_seed(config.seed)
  model, tx, schedule, make_state = setup(config)
  dataset = make_dataset(config, data_seed)
  data_iter = iter(dataset)

  replicated = sharding.replicated(mesh)
  ckpt = checkpoint.Checkpointer(workdir, config, keep=config.loop.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is None:
    state = jax.jit(make_state, out_shardings=replicated)()
    logging.info(
      "Fresh start: %s parameters", f"{sum(x.size for x in jax.tree.leaves(state.params)):,}"
    )
  else:
    abstract = checkpoint.abstract_state(make_state, sharding=replicated)
    state = ckpt.restore(latest, abstract, data_iter)
    logging.info("Resumed from step %d", latest)
  if jax.process_index() == 0:  # only now: a refused checkpoint leaves its run's config alone
    write_config(workdir, config)
  initial_params = None
  if config.probe.enabled:  # the encoder at initialisation is the probe's baseline
    initial_params = jax.jit(make_state, out_shardings=replicated)().params

  train_step = jax.jit(
    steps.make_pretrain_step(model, tx, schedule, config),
    in_shardings=(replicated, sharding.batch_sharded(mesh), replicated),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
  )
  loop_key = jax.device_put(loop_key, replicated)
  writer = metrics.MetricWriter(workdir) if jax.process_index() == 0 else None
  probe_sets = evaluate_lib.load_probe_sets(config) if config.probe.enabled else None
  loop = config.loop
  throughput_name, unit = _THROUGHPUT[config.modality]
  first_step = int(state.step)
  progress = tqdm(
    total=loop.total_steps,
    initial=first_step,
    disable=not loop.progress_bar,
    unit="step",
    dynamic_ncols=True,
  )

  pending, last, data_wait = [], {}, 0.0
  window_start = time.perf_counter()
  step = first_step
  try:
    while step < loop.total_steps:
      t0 = time.perf_counter()
      batch = sharding.put_batch(next(data_iter), mesh)
      data_wait += time.perf_counter() - t0
      state, step_metrics = train_step(state, batch, loop_key)
      pending.append(step_metrics)
      step += 1
      progress.update(1)
      is_ckpt = step % loop.checkpoint_every == 0 or step == loop.total_steps
      is_probe = config.probe.enabled and config.probe.every and step % config.probe.every == 0
      is_log = step % loop.log_every == 0 or is_ckpt or is_probe
      if is_log:
        last = _summarise(
          jax.device_get(pending), window_start, data_wait, throughput_name, unit(config)
        )
        metrics.check_health(step, last, loop)
        if is_probe:
          last["probe_acc"] = float(
            np.mean(evaluate_lib.probe_accuracy(model, state.params, config.probe, *probe_sets))
          )
        if writer:
          writer.write(step, last)
        logging.info(metrics.format_line(step, last))
        progress.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
      if is_ckpt:
        ckpt.save(step, state, data_iter)
      if is_log:
        # Rates cover training only: the probe and the checkpoint's blocking part are excluded.
        pending, data_wait, window_start = [], 0.0, time.perf_counter()
  finally:
    progress.close()
    ckpt.wait()
    if writer:
      writer.close()
  if config.probe.enabled:
    result = probe_report(model, initial_params, state.params, config.probe, probe_sets)
    if jax.process_index() == 0:
      (workdir / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    last.update(probe_pretrained=result["pretrained_mean"], probe_random=result["random_mean"])
  return last


def probe_report(model, initial_params, params, probe_cfg, probe_sets) -> dict:
  """Probe accuracies of the encoder at initialisation and now, per seed and mean."""
  random_acc = evaluate_lib.probe_accuracy(model, initial_params, probe_cfg, *probe_sets)
  trained_acc = evaluate_lib.probe_accuracy(model, params, probe_cfg, *probe_sets)
  result = {
    "seeds": list(probe_cfg.seeds),
    "random": random_acc,
    "pretrained": trained_acc,
    "random_mean": float(np.mean(random_acc)),
    "pretrained_mean": float(np.mean(trained_acc)),
  }
  logging.info(
    "Probe: random init %.2f%%, pretrained %.2f%% (mean over seeds %s)",
    100 * result["random_mean"],
    100 * result["pretrained_mean"],
    result["seeds"],
  )
  return result


def _summarise(
  window: list[dict], start: float, data_wait: float, throughput_name: str, unit: float
) -> dict:
  """Averages a window of per-step metrics and adds rates."""
  elapsed = max(time.perf_counter() - start, 1e-9)
  summary = {
    k: float(np.mean([m[k] for m in window]))
    for k in window[0]
    if k not in ("valid_inputs", "num_masked")
  }
  summary["steps_per_sec"] = len(window) / elapsed
  summary[throughput_name] = float(sum(m["valid_inputs"] for m in window)) / unit / elapsed
  summary["data_wait_frac"] = data_wait / elapsed
  return summary


def probe_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`mode=probe`: the probe on the workdir's newest checkpoint against the same initialisation."""
  workdir = pathlib.Path(workdir)
  ckpt = checkpoint.Checkpointer(workdir, config, keep=config.loop.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is None:
    raise FileNotFoundError(f"No checkpoint in {ckpt.directory}: pretrain first (mode=pretrain)")
  model, _, _, make_state = setup(config)
  state = ckpt.restore(latest, checkpoint.abstract_state(make_state))
  initial = jax.jit(make_state)()
  result = probe_report(
    model,
    initial.params,
    state.params,
    config.probe,
    evaluate_lib.load_probe_sets(config),
  )
  result["step"] = latest
  (workdir / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
  return result
