"""One writer per work directory (issue 23): refused at once, released by the kernel on kill -9.

The refusal of a second `main.py` on a live run is tested in tests/test_train.py (the kill loop).
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from d2v_jax import train, workdir_lock
from tests import helpers

_HOLD = """
import sys, time
from d2v_jax import workdir_lock
workdir_lock.WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
  with workdir_lock.WorkdirLock(tmp_path):
    with pytest.raises(
      workdir_lock.WorkdirBusyError, match=f"{tmp_path} is in use .*pid {os.getpid()}"
    ):
      workdir_lock.WorkdirLock(tmp_path).acquire()
    with pytest.raises(workdir_lock.WorkdirBusyError):
      train.train_and_evaluate(helpers.tiny_config(), tmp_path)
  with workdir_lock.WorkdirLock(tmp_path):  # released on exit: free again
    pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLD, str(tmp_path)],
    stdout=subprocess.PIPE,
    text=True,
    env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])},
  )
  assert holder.stdout.readline().strip() == "held"
  assert not workdir_lock.WorkdirLock(tmp_path).try_acquire()
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  deadline = time.time() + 10
  lock = workdir_lock.WorkdirLock(tmp_path)
  while not lock.try_acquire() and time.time() < deadline:
    time.sleep(0.1)
  assert lock.held
  lock.release()


def test_a_reader_never_creates_a_missing_work_directory(tmp_path):
  assert not workdir_lock.WorkdirLock(tmp_path / "typo").try_acquire()
  assert not (tmp_path / "typo").exists()
