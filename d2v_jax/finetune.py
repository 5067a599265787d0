"""Fine-tuning: data -> model (pretrained encoder + fresh head) -> the shared loop -> evaluation.

spec §1.6. `config.init.pretrained` names a pretraining work directory (or one checkpoint in
it); only the student's front end, encoder (and speech mask embedding) are loaded, the model's
sizes come from that run, and the head starts fresh. Without it the model trains from scratch,
which the log says. Resume, logging, checkpoints and health checks are pretraining's
(`loop.py`); the dev set is evaluated every `config.eval.every` updates and at the end, and the
final scores are written to `<workdir>/eval.json`.
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
  ctc,
  finetune_steps,
  loop,
  metrics,
  optim,
  pretrained,
  scores,
  sharding,
  train,
  workdir_lock,
)
from d2v_jax import state as state_lib
from d2v_jax.data import audio_tasks, image_tasks, text_tasks
from d2v_jax.models import finetune as finetune_models
from d2v_jax.models.data2vec import example_inputs, model_sizes


def load_pretrained_into_config(config) -> pretrained.PretrainedRun | None:
  """Reads `config.init.pretrained` (if set) and takes the model's sizes from that run."""
  path = config.init.pretrained
  if not path:
    logging.warning(
      "config.init.pretrained is empty: fine-tuning from a RANDOM initialisation (set it to a "
      "pretraining work directory to start from pretrained weights)"
    )
    return None
  run = pretrained.load_pretrained(path)
  if run.modality != config.modality:
    raise ValueError(
      f"config.init.pretrained={path} holds a {run.modality} model; this config fine-tunes "
      f"{config.modality}"
    )
  config.model = pretrained.merge_model_config(config.model, run.meta["model"])
  config.version = run.meta["version"]  # data2vec 1.0 or 2.0: which encoder to build
  if "image_size" in config.input and config.input.image_size != config.model.image_size:
    logging.info("config.input.image_size -> %d (the model's)", config.model.image_size)
    config.input.image_size = config.model.image_size
  return run


def fit_input_to_model(config) -> None:
  """Text rows must fit the model's learned positions; -1 takes all of them."""
  if config.modality != "text":
    return
  if config.input.max_length == -1:
    config.input.max_length = config.model.max_positions
  elif config.input.max_length > config.model.max_positions:
    raise ValueError(
      f"config.input.max_length={config.input.max_length} exceeds the model's "
      f"max_positions={config.model.max_positions}: lower config.input.max_length"
    )


def make_datasets(config, data_seed: int):
  """(training dataset, evaluation set) of `config.modality`; fills `config.head.num_outputs`."""
  where = dict(seed=data_seed, process_index=jax.process_index(), process_count=jax.process_count())
  split = config.eval.split
  if config.modality == "audio":
    data = audio_tasks.make_audio_finetune_dataset(config, **where)
    evals = audio_tasks.audio_eval_batches(
      config, split, vocabulary=data.vocabulary, class_names=data.class_names
    )
    outputs = data.num_outputs
  elif config.modality == "image":
    data = image_tasks.make_image_finetune_dataset(config, **where)
    evals = image_tasks.image_eval_batches(config, split)
    outputs = data.num_classes
  elif config.modality == "text":
    data = text_tasks.make_text_finetune_dataset(config, **where)
    evals = text_tasks.text_eval_batches(
      config, split, tokenizer=data.tokenizer, class_names=data.class_names
    )
    outputs = data.num_classes
    if config.model.vocab_size == -1:  # from scratch: the tokenizer sets the vocabulary
      config.model.vocab_size = data.tokenizer.vocab_size
  else:
    raise ValueError(f"No fine-tuning data for modality {config.modality!r}")
  if config.head.num_outputs == -1:
    config.head.num_outputs = outputs
  elif config.head.num_outputs != outputs:
    raise ValueError(
      f"config.head.num_outputs={config.head.num_outputs} but the data has {outputs} "
      "outputs; leave it at -1"
    )
  return data, evals


def evaluate(predict, params, eval_set, config) -> dict:
  """Scores the model on every example of `eval_set` (filler rows dropped)."""
  task = config.head.task
  outputs, targets, hypotheses, indices = [], [], [], []
  for batch in eval_set.batches():
    keep = np.asarray(batch["example_mask"])
    out, token_padding = jax.device_get(predict(params, batch))
    if task == "ctc":
      decoded = ctc.greedy_decode(out[keep], token_padding[keep])
      hypotheses += [eval_set.vocabulary.decode(ids) for ids in decoded]
      indices += list(np.asarray(batch["example_index"])[keep])
    else:
      outputs.append(out[keep])
      targets.append(np.asarray(batch["label" if task == "classify" else "target"])[keep])
  if task == "ctc":
    references = [eval_set.transcripts[i] for i in indices]
    return {
      "wer": scores.word_error_rate(references, hypotheses),
      "cer": scores.char_error_rate(references, hypotheses),
    }
  outputs, targets = np.concatenate(outputs), np.concatenate(targets)
  if task == "regress":
    return {
      "pearson": scores.pearson(outputs[:, 0], targets),
      "spearman": scores.spearman(outputs[:, 0], targets),
    }
  result = {"accuracy": scores.accuracy(outputs.argmax(-1), targets)}
  if config.modality == "image" and outputs.shape[-1] > 5:
    result["top5_accuracy"] = scores.top_k_accuracy(outputs, targets, 5)
  glue_task = config.eval.get("glue_task", "")
  if glue_task:
    result.update(scores.glue_scores(glue_task, outputs.argmax(-1), targets))
  return result


def setup(config, run):
  """(model, optimiser, schedule, make_state, fresh): `fresh(state_sharding=None)` loads the
  pretrained encoder and lays the state out by `state_sharding` (a pytree like the state's;
  None: on this process's first device)."""
  model = finetune_models.build_finetune_model(
    config.modality, config.model, config.head, config.version
  )
  num_layers = model_sizes(config.modality, config.model)["num_layers"]
  tx, schedule = optim.make_optimizer(config.optim, config.loop.total_steps, num_layers=num_layers)
  init_key, _, _ = train.split_seed(config.seed)
  make_state = functools.partial(
    state_lib.create_train_state,
    model,
    tx,
    init_key,
    *example_inputs(config.modality, config.model),
    None,
  )

  def fresh(state_sharding=None):
    if run is None:
      return jax.jit(make_state, out_shardings=state_sharding)()
    state = jax.jit(make_state)()  # on this process's first device; every process the same
    params, _ = pretrained.merge_encoder(state.params, run.params)
    logging.info("Encoder initialised from %s (step %d)", run.directory, run.step)
    state = state.replace(params=params, opt_state=tx.init(params))
    return state if state_sharding is None else sharding.put_global(state, state_sharding)

  return model, tx, schedule, make_state, fresh


def finetune_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fine-tunes to `config.loop.total_steps`, then scores the dev set; returns those scores.

  Process 0 holds the work directory's lock throughout."""
  config_check.validate(config)
  with workdir_lock.hold_for_run(workdir) as lock:
    return _finetune_and_evaluate(config, pathlib.Path(workdir), lock)


def _finetune_and_evaluate(config, workdir: pathlib.Path, lock) -> dict:
  mesh = sharding.mesh_from_config(config)
  sharding.check_batch_size(config.input.batch_size, mesh)
  logging.info("Mesh: %s; global batch %d", sharding.describe(mesh), config.input.batch_size)
  _, data_seed, loop_key = train.split_seed(config.seed)
  run = load_pretrained_into_config(config)
  fit_input_to_model(config)
  data, eval_set = make_datasets(config, data_seed)
  data_iter = iter(data)
  model, tx, schedule, make_state, fresh = setup(config, run)
  state_sharding = sharding.train_state_shardings(make_state, mesh, config)

  ckpt = checkpoint.Checkpointer(workdir, config, keep=config.loop.keep_checkpoints, lock=lock)
  train.record_config(workdir, config, ckpt)
  state, _ = loop.start(ckpt, make_state, data_iter, state_sharding, fresh=fresh)
  if jax.process_index() == 0:
    train.write_config(workdir, config)
    if config.head.task == "ctc":  # the letters the head's outputs stand for
      data.vocabulary.save(workdir / "dict.ltr.txt")

  train_step = loop.jit_step(
    finetune_steps.make_finetune_step(model, tx, schedule, config), mesh, state_sharding
  )
  # Every process scores the whole dev set on its first device, from a gathered copy.
  predict = jax.jit(finetune_steps.make_predict(model, config.modality))

  def dev_scores(state):
    params = sharding.local_copy(state.params, mesh)
    return {f"dev_{k}": v for k, v in evaluate(predict, params, eval_set, config).items()}

  writer = metrics.MetricWriter(workdir, int(state.step)) if jax.process_index() == 0 else None
  try:
    state, _ = loop.run(
      config,
      state,
      train_step,
      data_iter,
      mesh,
      loop_key,
      ckpt,
      writer,
      evaluate=dev_scores,
      eval_every=config.eval.every,
    )
  finally:
    if writer:
      writer.close()
  result = {
    "step": int(state.step),
    "split": config.eval.split,
    "examples": eval_set.num_examples,
    "init": pretrained.summary(run) if run else "random",
    **evaluate(predict, sharding.local_copy(state.params, mesh), eval_set, config),
  }
  logging.info("Evaluation on %s: %s", config.eval.split, json.dumps(result))
  if jax.process_index() == 0:
    (workdir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
  return result
