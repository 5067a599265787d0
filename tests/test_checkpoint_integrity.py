"""Damaged checkpoints (issue 23): digests, fallback to the newest intact step, moved aside.

Two steps of a tiny pretraining state are written once per module; each case copies them,
damages the newer step the way a disk, a copy or a user does, and checks that every reader
(resume, probe, extraction and fine-tuning initialisation, conversion export) skips it with one
sentence naming it, and that only the work directory's lock holder moves it aside.
"""

import json
import logging
import shutil

import grain
import jax
import numpy as np
import pytest

from d2v_jax import checkpoint, digest, pretrained, train, workdir_lock
from tests import helpers


def _biggest_array_file(step_dir):
  files = (step_dir / "state" / "ocdbt.process_0" / "d").iterdir()
  return max(files, key=lambda p: p.stat().st_size)


def _flip_bytes(step_dir):
  path = _biggest_array_file(step_dir)
  data = bytearray(path.read_bytes())
  data[len(data) // 2 : len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2 :][:8])
  path.write_bytes(bytes(data))


def _truncate(path, keep: int):
  path.write_bytes(path.read_bytes()[:keep])


def _empty_folder(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


DAMAGE = {
  "flipped bytes": (_flip_bytes, "does not match its SHA-256 digest"),
  "truncated data file": (lambda d: _truncate(_biggest_array_file(d), 100), "bytes,"),
  "zero-filled data file": (
    lambda d: _biggest_array_file(d).write_bytes(bytes(_biggest_array_file(d).stat().st_size)),
    "does not match its SHA-256 digest",
  ),
  "ocdbt manifest deleted": (
    lambda d: (d / "state" / "ocdbt.process_0" / "manifest.ocdbt").unlink(),
    "manifest.ocdbt is missing",
  ),
  "checkpoint metadata truncated": (
    lambda d: _truncate(d / "_CHECKPOINT_METADATA", 10),
    "_CHECKPOINT_METADATA is not valid JSON",
  ),
  "array metadata truncated": (lambda d: _truncate(d / "state" / "_METADATA", 50), "_METADATA"),
  "data position truncated": (
    lambda d: _truncate(d / "data" / "process_0-of-1.json", 1),
    "process_0-of-1.json has 1 bytes",
  ),
  "garbage meta JSON": (
    lambda d: (d / "meta" / "metadata").write_text("{not json"),
    "meta/metadata is not valid JSON",
  ),
  "state deleted": (lambda d: shutil.rmtree(d / "state"), "state/ folder is missing"),
  "empty step folder": (_empty_folder, "the folder is empty"),
  "digest deleted": (lambda d: (d / digest.DIGEST_FILE).unlink(), "digest.json is missing"),
}


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  """A work directory with intact checkpoints at steps 1 and 2 (other parameters each)."""
  workdir = tmp_path_factory.mktemp("two_steps")
  config = helpers.tiny_config()
  ckpt = checkpoint.Checkpointer(workdir, config, keep=5)
  data = iter(grain.MapDataset.range(4).to_iter_dataset())
  params = helpers.tiny_params()
  for step in (1, 2):
    shifted = jax.tree.map(lambda x, s=step: x + s, params)
    state = {"params": shifted, "step": np.int32(step)}
    ckpt.save(step, state, data)
  ckpt.wait()
  train.write_config(workdir, config)
  return workdir, config


def _copy(two_steps, tmp_path):
  workdir, config = two_steps
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  return copy, config


def test_every_step_carries_a_digest_of_every_file(two_steps):
  workdir, _ = two_steps
  for step in (1, 2):
    step_dir = workdir / "checkpoints" / str(step)
    assert (step_dir / digest.DIGEST_FILE).is_file()
    assert digest.problem(step_dir) is None
  assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_newest_step_is_skipped_and_moved_aside(two_steps, tmp_path, case, caplog):
  workdir, config = _copy(two_steps, tmp_path)
  damage, reason = DAMAGE[case]
  damage(workdir / "checkpoints" / "2")
  lock = workdir_lock.WorkdirLock(workdir)
  assert lock.try_acquire()
  try:
    ckpt = checkpoint.Checkpointer(workdir, config, keep=1, lock=lock)
    with caplog.at_level(logging.WARNING):
      assert ckpt.newest_intact_step() == 1
  finally:
    lock.release()
  warning = [r.getMessage() for r in caplog.records if "Skipping damaged" in r.getMessage()]
  assert len(warning) == 1 and str(workdir / "checkpoints" / "2") in warning[0]
  assert reason in warning[0]
  # Moved, not deleted, and out of `keep_checkpoints`' count: only step 1 is left to count.
  assert (workdir / checkpoint.DAMAGED_DIR / "2").is_dir()
  assert checkpoint.step_dirs(workdir / "checkpoints") == [1]
  assert ckpt.latest_step() == 1


def test_flipped_bytes_are_refused_by_every_reader(two_steps, tmp_path):
  workdir, config = _copy(two_steps, tmp_path)
  _flip_bytes(workdir / "checkpoints" / "2")
  ckpt = checkpoint.Checkpointer(workdir, config)
  abstract = {"params": helpers.tiny_params(), "step": np.int32(0)}
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/2 is damaged: state/ocdbt"):
    ckpt.restore(2, abstract)
  with pytest.raises(checkpoint.CheckpointError, match="does not match its SHA-256"):
    pretrained.load_pretrained(workdir / "checkpoints" / "2")  # a step named explicitly
  # Extraction, fine-tuning initialisation and export read the work directory: step 1.
  run = pretrained.load_pretrained(workdir)
  assert run.step == 1
  np.testing.assert_array_equal(
    run.params["mask_emb"], np.asarray(helpers.tiny_params()["mask_emb"]) + 1
  )
  assert (workdir / checkpoint.DAMAGED_DIR / "2").is_dir()  # no run held the work directory


def test_a_reader_beside_a_live_run_leaves_the_damaged_step_in_place(two_steps, tmp_path):
  workdir, _ = _copy(two_steps, tmp_path)
  _flip_bytes(workdir / "checkpoints" / "2")
  with workdir_lock.WorkdirLock(workdir):  # the training run that owns the folder
    assert pretrained.load_pretrained(workdir).step == 1
  assert (workdir / "checkpoints" / "2").is_dir()
  assert not (workdir / checkpoint.DAMAGED_DIR).exists()


def test_no_intact_step_is_one_error_naming_the_folder(two_steps, tmp_path):
  workdir, config = _copy(two_steps, tmp_path)
  for step in (1, 2):
    _flip_bytes(workdir / "checkpoints" / str(step))
  with pytest.raises(checkpoint.CheckpointError, match="No intact checkpoint in .*checkpoints"):
    checkpoint.Checkpointer(workdir, config).newest_intact_step()


def test_a_step_written_before_digests_is_read_unverified(two_steps, tmp_path):
  workdir, _ = _copy(two_steps, tmp_path)
  step_dir = workdir / "checkpoints" / "2"
  (step_dir / digest.DIGEST_FILE).unlink()
  meta = step_dir / "meta" / "metadata"
  described = json.loads(meta.read_text())
  del described[digest.META_FIELD]
  meta.write_text(json.dumps(described))
  assert digest.problem(step_dir) is None
  assert pretrained.load_pretrained(workdir).step == 2
