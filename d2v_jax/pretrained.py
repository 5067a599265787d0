"""Reading a pretraining run back: the student's weights for fine-tuning and feature extraction.

spec §1.6: fine-tuning starts from the pretrained *student* (not the EMA teacher); its regression
head (`final_proj`, vision's `lm_head`) is dropped and the task head starts fresh. This module
finds a checkpoint from a work directory, reads its self-description and the student's
parameters, and merges them into a freshly initialised fine-tuning model, refusing (with every
offending key listed) a checkpoint whose weights do not fit.
"""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from d2v_jax import checkpoint, digest, workdir_lock

# Parameter groups a fine-tuning model takes from pretraining; everything else is the task's.
ENCODER_GROUPS = ("frontend", "encoder", "mask_emb")


@dataclasses.dataclass(frozen=True)
class PretrainedRun:
  """One pretraining checkpoint: where it is, what wrote it and the student's parameters."""

  directory: pathlib.Path  # the step directory, `<workdir>/checkpoints/<step>`
  step: int
  meta: dict  # {"modality", "version", "model": the model config} written with the checkpoint
  params: dict  # the student's parameters (nested dicts of arrays)
  teacher: dict | None = None  # the EMA teacher's (pretraining checkpoints), for exports

  @property
  def modality(self) -> str:
    return self.meta["modality"]

  def model_config(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(self.meta["model"])


def locate_checkpoint(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
  """(checkpoints directory, step) for a work directory, its `checkpoints/`, or one step in it.

  A work directory or `checkpoints/` resolves to its newest intact step (issue 23): a damaged
  newer step is skipped with a warning, and moved aside when no run holds the work directory.
  A step named explicitly must be intact.
  """
  path = pathlib.Path(path).expanduser().resolve()
  if not path.exists():
    raise FileNotFoundError(f"Pretrained checkpoint path {path} does not exist")
  if path.name.isdigit() and (path / "state").is_dir():
    wrong = digest.problem(path)
    if wrong:
      raise checkpoint.CheckpointError(f"Checkpoint {path} is damaged: {wrong}")
    return path.parent, int(path.name)
  directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  lock = workdir_lock.WorkdirLock(directory.parent)
  try:
    step = checkpoint.newest_intact_step(directory, may_move=lock.try_acquire())
  finally:
    lock.release()
  if step is None:
    raise FileNotFoundError(
      f"No checkpoint under {path}: expected a pretraining work directory (with checkpoints/), "
      "its checkpoints/ directory, or one step directory such as checkpoints/600"
    )
  return directory, step


def load_pretrained(path: str | pathlib.Path) -> PretrainedRun:
  """Reads the student's parameters and self-description of the checkpoint at `path`."""
  directory, step = locate_checkpoint(path)
  manager = ocp.CheckpointManager(
    directory,
    item_names=("state", "meta"),
    item_handlers={
      "state": ocp.StandardCheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler(),
    },
  )
  try:
    # Every leaf is read whole into host numpy on every process (the target's zeros only give
    # shapes and dtypes). Without a target orbax restores the saved device layout, which it
    # refuses ("Topology mismatch") under another process count: a one-process pretraining run
    # fine-tuned by several processes, or a multi-host one by a single process.
    target = jax.tree.map(
      lambda m: np.zeros(m.shape, m.dtype), manager.item_metadata(step)["state"]
    )
    restored = manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
    )
  except Exception as error:  # orbax's errors name its internals, not what the user passed
    raise ValueError(
      f"{directory / str(step)} is not a readable d2v-jax pretraining checkpoint: {error}"
    ) from error
  finally:
    manager.close()
  meta, state = dict(restored["meta"]), restored["state"]
  if not all(k in meta for k in checkpoint.META_KEYS) or "params" not in state:
    raise ValueError(
      f"{directory / str(step)} lacks a d2v-jax self-description (modality, version, model) "
      "or student parameters: was it written by d2v-jax pretraining?"
    )
  params = jax.tree.map(np.asarray, state["params"])
  teacher = jax.tree.map(np.asarray, state["teacher"]) if state.get("teacher") else None
  logging.info(
    "Pretrained %s model (version %s) from %s, step %d",
    meta["modality"],
    meta["version"],
    directory,
    step,
  )
  return PretrainedRun(directory / str(step), step, meta, params, teacher)


def merge_model_config(
  model_cfg: ml_collections.ConfigDict, pretrained_model: dict
) -> ml_collections.ConfigDict:
  """The fine-tuning model config: the pretraining run's sizes, this run's training fields.

  Fields listed in `checkpoint.TRAINING_ONLY_MODEL_FIELDS` (dropouts, layerdrop, drop path,
  dtype) and `checkpoint.FINETUNE_LAYOUT_FIELDS` (vision's relative bias layout) keep the
  fine-tuning config's values; every other field (variant, sizes, vocabulary, eps) comes from the
  checkpoint, so a fine-tuning config need not repeat them. Differences are logged.
  """
  merged = ml_collections.ConfigDict(model_cfg.to_dict())
  kept = (*checkpoint.TRAINING_ONLY_MODEL_FIELDS, *checkpoint.FINETUNE_LAYOUT_FIELDS)
  for key, value in pretrained_model.items():
    if key in kept:
      continue
    if key in merged and merged[key] != value:
      logging.info("config.model.%s: %r -> %r (from the pretraining run)", key, merged[key], value)
    if isinstance(value, list):
      value = tuple(value)
    merged[key] = value
  return merged


# Vision's relative position bias table: shared by every block in pretraining ([rows, H]); BEiT's
# fine-tuning gives each block its own, each starting as a copy of the shared one ([L, rows, H]).
RELATIVE_BIAS_TABLE = "encoder/rel_pos_bias/table"


def _expand_shared_bias(source: dict, target: dict) -> dict:
  """`source` with a shared relative bias table copied into every block if `target` has one per
  block (BEiT fine-tuning from a pretrained checkpoint)."""
  table, wanted = source.get(RELATIVE_BIAS_TABLE), target.get(RELATIVE_BIAS_TABLE)
  if table is None or wanted is None or np.ndim(table) != 2 or len(wanted.shape) != 3:
    return source
  logging.info("Copying the shared relative position bias into each of %d blocks", wanted.shape[0])
  expanded = np.broadcast_to(np.asarray(table), (wanted.shape[0], *np.shape(table)))
  return {**source, RELATIVE_BIAS_TABLE: expanded}


def merge_encoder(target_params, pretrained_params, groups=ENCODER_GROUPS):
  """`target_params` with every leaf under `groups` replaced by the pretrained one.

  A shared vision relative bias table is copied into every block when the target has one per
  block. Raises ValueError listing every target leaf that the checkpoint lacks or holds with
  another shape. Pretrained leaves the target does not use (the regression head, vision's final
  norm) are logged, not loaded. Returns (params, names of the unused pretrained leaves).
  """
  target = traverse_util.flatten_dict(target_params, sep="/")
  source = traverse_util.flatten_dict(pretrained_params, sep="/")
  source = _expand_shared_bias(source, target)
  wanted = [k for k in target if k.split("/")[0] in groups]
  if "mask_emb" in target and "mask_emb" not in source:  # data2vec 2.0 pretrains without one
    logging.info("The checkpoint has no mask embedding: the fine-tuning one starts fresh")
    wanted.remove("mask_emb")
  missing = [k for k in wanted if k not in source]
  mismatched = [
    f"{k}: checkpoint {tuple(source[k].shape)}, model {tuple(target[k].shape)}"
    for k in wanted
    if k in source and tuple(source[k].shape) != tuple(target[k].shape)
  ]
  if missing or mismatched:
    lines = [f"missing in the checkpoint: {k}" for k in missing]
    lines += [f"shape differs: {m}" for m in mismatched]
    shown = lines[:40] + ([f"... and {len(lines) - 40} more"] if len(lines) > 40 else [])
    raise ValueError(
      f"The pretrained weights do not fit the fine-tuning model ({len(lines)} keys):\n  "
      + "\n  ".join(shown)
    )
  merged = dict(target)
  for k in wanted:
    merged[k] = jnp.asarray(source[k], dtype=target[k].dtype)
  unused = sorted(k for k in source if k not in target)
  if unused:
    logging.info("Pretrained weights not used by the fine-tuning model: %s", ", ".join(unused))
  return traverse_util.unflatten_dict(merged, sep="/"), unused


def summary(run: PretrainedRun) -> dict:
  """Where the weights came from, for reports (eval.json)."""
  return {"checkpoint": str(run.directory), "step": run.step, **run.meta}
