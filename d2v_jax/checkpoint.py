"""Checkpoints in the work directory: train state, data-iterator position and a self-description.

One orbax `CheckpointManager` step holds three items:
  - `state`: the TrainState (student, EMA teacher, optimiser, step), restored against an abstract
    target so optax's NamedTuples survive;
  - `data`: the grain iterator's state, so a resumed run reads exactly the batches it would have;
  - `meta`: JSON naming the modality, version and model config; a checkpoint of another model
    fails with a message that lists the differing fields instead of an error deep in orbax.

orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact. The loop never saves a non-finite state.

Integrity (issue 23): each step carries `digest.json` (`d2v_jax/digest.py`), written in orbax's
commit thread before the rename. `newest_intact_step` checks steps newest first; a damaged one is
named in one warning, moved to `<workdir>/damaged_checkpoints/` by the process holding the work
directory (`d2v_jax/workdir_lock.py`; never deleted), and the next older intact step is used.
Having moved it out of `checkpoints/`, orbax's `keep_checkpoints` no longer counts it.

Multi-host (issue 9): every process calls `save` and `restore`. orbax writes each
array's shards from the processes that hold them and the JSON `meta` from process 0 only; the
data position is one small JSON file per process. A restore reads the arrays straight into the
target's shardings (`abstract_state(..., sharding=...)`), so a checkpoint written under one mesh
(say 2 processes x 2 devices with fsdp=2) restores under another (1 device, fsdp=1). The data
position is the index of the next global batch, the same on every process (each process loads
its rows of that batch), so a process count the checkpoint was not written with reads process 0's.
"""

import dataclasses
import errno
import json
import pathlib
import re
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from d2v_jax import digest

META_KEYS = ("modality", "version", "model")
DAMAGED_DIR = "damaged_checkpoints"  # beside checkpoints/: where damaged steps are moved


class CheckpointError(RuntimeError):
  """No intact checkpoint to read, or one that cannot be restored; the message says which."""


def step_dirs(directory: pathlib.Path) -> list[int]:
  """The step numbers of `directory`'s step folders, oldest first (orbax's temporary folders
  of an unfinished save are not steps)."""
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def move_aside(step_dir: pathlib.Path) -> pathlib.Path:
  """Moves a damaged step folder to `<workdir>/damaged_checkpoints/<step>[.n]`; returns where."""
  target_dir = step_dir.parent.parent / DAMAGED_DIR
  target_dir.mkdir(exist_ok=True)
  target, n = target_dir / step_dir.name, 0
  while target.exists():
    n += 1
    target = target_dir / f"{step_dir.name}.{n}"
  shutil.move(str(step_dir), str(target))
  return target


def newest_intact_step(directory: pathlib.Path, *, may_move: bool) -> int | None:
  """The newest step of `directory` that `digest.problem` finds intact; None when there is no
  step at all. A damaged newer step is named in a warning and, with `may_move` (this process
  holds the work directory), moved aside. Raises CheckpointError when every step is damaged."""
  directory = pathlib.Path(directory)
  steps = step_dirs(directory)
  damaged = []
  for step in reversed(steps):
    wrong = digest.problem(directory / str(step))
    if wrong is None:
      return step
    damaged.append(step)
    where = f"moved to {move_aside(directory / str(step))}" if may_move else "left in place"
    logging.warning("Skipping damaged checkpoint %s: %s (%s)", directory / str(step), wrong, where)
  if damaged:
    raise CheckpointError(
      f"No intact checkpoint in {directory}: step(s) {', '.join(map(str, damaged))} are damaged "
      "(see the warnings above). Use a fresh --workdir to start again."
    )
  return None


def state_kind(mode: str) -> str:
  """The train state a run of `mode` reads or writes: "finetune", else "pretrain".

  `probe` and `extract` read the pretraining state, so a pretraining checkpoint serves them.
  """
  return "finetune" if mode == "finetune" else "pretrain"


def describe(config) -> dict:
  """What must match for a checkpoint to load into `config`'s model and train state."""
  meta = {
    "modality": config.modality,
    "version": config.version,
    "mode": state_kind(config.get("mode", "pretrain")),
    "model": json.loads(config.model.to_json()),
  }
  if "head" in config:  # fine-tuning: the head's task and width shape the parameters
    meta["head"] = {"task": config.head.task, "num_outputs": config.head.num_outputs}
  return meta


def _differences(saved: dict, expected: dict, prefix: str = "") -> list[str]:
  diffs = []
  for key in sorted(set(saved) | set(expected)):
    a, b = saved.get(key, "<missing>"), expected.get(key, "<missing>")
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += _differences(a, b, f"{prefix}{key}.")
    elif a != b and not (isinstance(a, list) and tuple(a) == tuple(b)):
      diffs.append(f"{prefix}{key}: checkpoint has {a!r}, config has {b!r}")
  return diffs


# Model fields that change training, not the weights: a resumed run or a fine-tuning run may
# set them differently from the checkpoint.
TRAINING_ONLY_MODEL_FIELDS = (
  "dropout",
  "attention_dropout",
  "activation_dropout",
  "layerdrop",
  "drop_path_rate",
  "dtype",
  "remat",
  "fused_attention",
  "feature_grad_mult",
)


# Model fields a fine-tuning config chooses whatever the pretraining run used (they change the
# layout of some weights, which `pretrained.merge_encoder` converts); unlike the training-only
# fields, a resumed run must match them.
FINETUNE_LAYOUT_FIELDS = ("relative_bias",)


class DataPositionHandler(grain.checkpoint.CheckpointHandler):
  """grain's iterator handler, restoring across process counts.

  grain names its file `process_<i>-of-<n>.json` and refuses another `n`; the iterators here walk
  global batch indices (`batching.endless_batches`), so every process saved the same position
  and any of the files serves any process.
  """

  def restore(self, directory, item=None, args=None):
    index, count = jax.process_index(), jax.process_count()
    if (pathlib.Path(directory) / f"process_{index}-of-{count}.json").exists():
      return super().restore(directory, item=item, args=args)
    item = item or args.item
    saved = sorted(pathlib.Path(directory).glob("process_*-of-*.json"))
    if not saved:
      raise FileNotFoundError(f"No data position in {directory}")
    source = min(saved, key=lambda p: int(re.match(r"process_(\d+)-", p.name).group(1)))
    logging.info("Data position from %s (written by another process count)", source.name)
    item.set_state(json.loads(source.read_text()))
    item.start_prefetch()
    return item


@ocp.args.register_with_handler(DataPositionHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: Any  # a grain DatasetIterator


@ocp.args.register_with_handler(DataPositionHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any  # the grain DatasetIterator to move to the saved position


class Checkpointer:
  """Saves and restores (state, data iterator) in `<workdir>/checkpoints`.

  `lock`: the work directory's `WorkdirLock`; only while it is held are damaged steps moved
  aside (a reader beside a live run leaves them where they are).
  """

  def __init__(self, workdir, config, keep: int = 2, lock=None):
    self.directory = pathlib.Path(workdir).resolve() / "checkpoints"
    self.config = config
    self.lock = lock
    self._saving = None  # the step whose save is in flight (its digest is written on commit)
    self._verified = None  # the step `newest_intact_step` last checked
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        async_options=ocp.options.AsyncOptions(post_finalization_callback=self._write_digest),
      ),
      item_names=("state", "data", "meta"),
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": DataPositionHandler(),
        "meta": ocp.JsonCheckpointHandler(),
      },
    )

  def _write_digest(self) -> None:
    # orbax calls this on process 0 after every file of the step is written, before it renames
    # `<step>.orbax-checkpoint-tmp` into place.
    digest.write(self.directory / f"{self._saving}.orbax-checkpoint-tmp")

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def newest_intact_step(self) -> int | None:
    """`newest_intact_step` of this directory; damaged steps are moved aside only by process 0
    while it holds the lock, and every process waits for that before reading."""
    may_move = self.lock is not None and self.lock.held and jax.process_index() == 0
    step = newest_intact_step(self.directory, may_move=may_move)
    self._verified = step
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("d2v_jax.checkpoint.newest_intact_step")
    self.manager.reload()
    return step

  def save(self, step: int, state, data_iterator=None) -> None:
    """Saves `state` (and the data position, if an iterator is given: a converted checkpoint
    has none) with the config's self-description."""
    self.check_space(state, step)
    meta = {**describe(self.config), "step": int(step), digest.META_FIELD: "sha256"}
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items["data"] = DataSave(data_iterator)
    self.manager.wait_until_finished()  # the previous step's digest names its own folder
    self._saving = int(step)
    self.manager.save(step, args=ocp.args.Composite(**items))

  def check_space(self, state, step: int) -> None:
    """Raises OSError(ENOSPC) naming the folder when the disk cannot hold one more checkpoint
    of `state`: orbax's failed writes otherwise print a traceback per array and event loop."""
    needed = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) * 1.05 + (4 << 20)
    if jax.process_count() > 1:
      needed /= jax.process_count()  # each process writes its own shards (an estimate)
    self.directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(self.directory).free
    if free < needed:
      raise OSError(
        errno.ENOSPC,
        f"No space left on device for checkpoint {step}: it needs about {needed / 2**20:.0f} MiB, "
        f"{free / 2**20:.0f} MiB are free",
        str(self.directory),
      )

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def check_compatible(self, step: int) -> None:
    """Raises ValueError naming every model field where checkpoint and config disagree."""
    saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    saved = dict(saved["meta"])
    expected = describe(self.config)
    for meta in (saved, expected):
      meta["model"] = {
        k: v for k, v in meta.get("model", {}).items() if k not in TRAINING_ONLY_MODEL_FIELDS
      }
    saved.setdefault("mode", "pretrain")  # written before fine-tuning existed
    diffs = _differences({k: saved.get(k) for k in expected}, expected)
    if diffs:
      raise ValueError(
        f"The checkpoint at {self.directory / str(step)} was written by a different model:\n  "
        + "\n  ".join(diffs)
        + "\nUse a fresh --workdir, or match these config fields."
      )

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state (onto `abstract_state`'s shardings) and, if given, the data position,
    after checking the step's files against its digest (CheckpointError names the first that
    differs)."""
    if step != self._verified:
      wrong = digest.problem(self.directory / str(step))
      if wrong:
        raise CheckpointError(f"Checkpoint {self.directory / str(step)} is damaged: {wrong}")
    self.check_compatible(step)
    logging.info("Restoring step %d from %s", step, self.directory)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None and (self.directory / str(step) / "data").exists():
      items["data"] = DataRestore(data_iterator)
    elif data_iterator is not None:  # a converted checkpoint
      logging.info("Step %d has no data position: the data starts from the beginning", step)
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
    except Exception as error:  # orbax's errors name its internals, not the user's files
      first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
      raise CheckpointError(
        f"{self.directory / str(step)} could not be restored into this run's train state: "
        f"{first[:300]}"
      ) from error


def abstract_state(state_fn, *args, sharding=None):
  """Shapes/dtypes of `state_fn(*args)` without computing it, and optionally the shardings to
  restore into: one `jax.sharding.Sharding` for every leaf, or a pytree of them like the state's.
  """
  shapes = jax.eval_shape(state_fn, *args)
  if sharding is None:
    return shapes
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, shapes)
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, sharding
  )
