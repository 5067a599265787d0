"""The pretraining loop: setup -> resume -> steps with logging, checkpoints and probes.

Resume order: the newest checkpoint in `<workdir>/checkpoints` (state + data position), else a
fresh start from `config.seed`. Keys: the seed is split once into init / data / loop streams;
step k uses `fold_in(loop_key, k)`, so a resumed run draws the same masks and dropout.
"""

import functools
import json
import pathlib

import jax
import ml_collections
import numpy as np
from absl import logging

from d2v_jax import (
  checkpoint,
  config_check,
  loop,
  metrics,
  optim,
  sharding,
  steps,
  steps_v2,
  workdir_lock,
)
from d2v_jax import evaluate as evaluate_lib
from d2v_jax import state as state_lib
from d2v_jax.data import audio as audio_data
from d2v_jax.data import image as image_data
from d2v_jax.data import text as text_data
from d2v_jax.models import data2vec, data2vec2

# config.version -> (model builder, pretraining step builder): data2vec 1.0 and 2.0 (spec §1, §2).
_VERSIONS = {
  1: (data2vec.build_model, steps.make_pretrain_step),
  2: (data2vec2.build_model, steps_v2.make_pretrain_step),
}


def _version(config):
  if config.version not in _VERSIONS:
    raise ValueError(f"config.version={config.version}: use 1 or 2")
  return _VERSIONS[config.version]


def step_builder(config):
  """`make_pretrain_step(model, tx, schedule, config)` of `config.version`."""
  return _version(config)[1]


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


def setup(config: ml_collections.ConfigDict):
  """Builds the model, the optimiser with its schedule, and `make_state()`.

  `make_state()` initialises the train state from `config.seed`; it is what a fresh run jits,
  what `jax.eval_shape` turns into a restore target, and the probe's random-init baseline.
  The fields that come from the data are filled first (`complete_config`).
  """
  complete_config(config)
  return build(config)


def build(config: ml_collections.ConfigDict):
  """`setup` for a config whose data-derived fields are already set (benchmarks, bench/)."""
  model = _version(config)[0](config.modality, config.model)
  tx, schedule = optim.make_optimizer(config.optim, config.loop.total_steps)
  init_key, _, _ = split_seed(config.seed)
  make_state = functools.partial(
    state_lib.create_train_state,
    model,
    tx,
    init_key,
    *data2vec.example_inputs(config.modality, config.model),
    tuple(config.ema.teacher_params),
  )
  return model, tx, schedule, make_state


def record_config(workdir: pathlib.Path, config, ckpt: checkpoint.Checkpointer) -> None:
  """Before a resume, refuses structure changes against the run's last config and warns about
  the others; keeps the run's config history (`config_check.record`, written by process 0)."""
  resuming = bool(checkpoint.step_dirs(ckpt.directory))
  config_check.record(workdir, config, resuming=resuming, write=jax.process_index() == 0)


def write_config(workdir: pathlib.Path, config) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains until `config.loop.total_steps`; returns the last logged metrics.

  Every process of a multi-host run calls this with the same config: each loads its rows of
  every global batch, all of them step and checkpoint together, process 0 alone writes the
  config, metrics and probe report. Process 0 holds the work directory's lock throughout.
  """
  config_check.validate(config)
  with workdir_lock.hold_for_run(workdir) as lock:
    return _train_and_evaluate(config, pathlib.Path(workdir), lock)


def _train_and_evaluate(config, workdir: pathlib.Path, lock) -> dict:
  mesh = sharding.mesh_from_config(config)
  sharding.check_batch_size(config.input.batch_size, mesh)
  logging.info(
    "Mesh: %s; global batch %d, %d rows per process",
    sharding.describe(mesh),
    config.input.batch_size,
    config.input.batch_size // jax.process_count(),
  )
  _, data_seed, loop_key = split_seed(config.seed)
  model, tx, schedule, make_state = setup(config)
  data_iter = iter(make_dataset(config, data_seed))

  state_sharding = sharding.train_state_shardings(make_state, mesh, config)
  ckpt = checkpoint.Checkpointer(workdir, config, keep=config.loop.keep_checkpoints, lock=lock)
  record_config(workdir, config, ckpt)
  state, _ = loop.start(ckpt, make_state, data_iter, state_sharding)
  if jax.process_index() == 0:  # only now: a refused checkpoint leaves its run's config alone
    write_config(workdir, config)
  initial_params = None
  if config.probe.enabled:  # the encoder at initialisation is the probe's baseline
    initial = jax.jit(make_state, out_shardings=state_sharding)()
    initial_params = sharding.local_copy(initial.params, mesh)

  make_step = step_builder(config)
  train_step = loop.jit_step(make_step(model, tx, schedule, config), mesh, state_sharding)
  probe_sets = evaluate_lib.load_probe_sets(config) if config.probe.enabled else None

  last_probe = {}  # the newest periodic probe's step and scores

  def probe(state):
    params = sharding.local_copy(state.params, mesh)
    scores = evaluate_lib.probe_scores(model, params, config.probe, *probe_sets)
    last_probe.update(step=int(state.step), scores=scores)
    return {"probe_acc": float(np.mean(scores["linear"])), "probe_knn_acc": scores["knn"]}

  writer = metrics.MetricWriter(workdir, int(state.step)) if jax.process_index() == 0 else None
  try:
    state, last = loop.run(
      config,
      state,
      train_step,
      data_iter,
      mesh,
      loop_key,
      ckpt,
      writer,
      evaluate=probe if config.probe.enabled else None,
      eval_every=config.probe.every,
    )
  finally:
    if writer:
      writer.close()
  if config.probe.enabled:
    params = sharding.local_copy(state.params, mesh)
    # When the loop's last probe scored this very state, its scores are reused (same features,
    # same seeds: the same numbers) instead of probing the same parameters twice.
    done = last_probe["scores"] if last_probe.get("step") == int(state.step) else None
    result = probe_report(model, initial_params, params, config.probe, probe_sets, done)
    if jax.process_index() == 0:
      (workdir / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    last.update(probe_pretrained=result["pretrained_mean"], probe_random=result["random_mean"])
  return last


def probe_report(model, initial_params, params, probe_cfg, probe_sets, trained=None) -> dict:
  """Linear-probe (per seed, mean) and kNN accuracies of the encoder at initialisation and now;
  `trained`: the scores of `params` when they are already known."""
  random = evaluate_lib.probe_scores(model, initial_params, probe_cfg, *probe_sets)
  if trained is None:
    trained = evaluate_lib.probe_scores(model, params, probe_cfg, *probe_sets)
  result = {
    "seeds": list(probe_cfg.seeds),
    "random": random["linear"],
    "pretrained": trained["linear"],
    "random_mean": float(np.mean(random["linear"])),
    "pretrained_mean": float(np.mean(trained["linear"])),
    "random_l2": random["l2"],
    "pretrained_l2": trained["l2"],
    "random_knn": random["knn"],
    "pretrained_knn": trained["knn"],
  }
  logging.info(
    "Probe: random init %.2f%%, pretrained %.2f%% (linear, mean over seeds %s); "
    "kNN %.2f%% -> %.2f%%",
    100 * result["random_mean"],
    100 * result["pretrained_mean"],
    result["seeds"],
    100 * result["random_knn"],
    100 * result["pretrained_knn"],
  )
  return result


def probe_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`mode=probe`: the probe on the workdir's newest checkpoint against the same initialisation."""
  config_check.validate(config)
  workdir = pathlib.Path(workdir)
  # With the work directory free the probe holds its lock and may move a damaged step aside;
  # beside a live run it skips the step and leaves it in place.
  lock = workdir_lock.WorkdirLock(workdir)
  lock.try_acquire()
  try:
    ckpt = checkpoint.Checkpointer(workdir, config, keep=config.loop.keep_checkpoints, lock=lock)
    return _probe(config, workdir, ckpt)
  finally:
    lock.release()


def _probe(config, workdir: pathlib.Path, ckpt: checkpoint.Checkpointer) -> dict:
  latest = ckpt.newest_intact_step()
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
  if jax.process_index() == 0:  # several processes (main.py's flags) probe alike; one writes
    (workdir / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
  return result
