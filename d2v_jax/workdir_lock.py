"""One writer per work directory (issue 23): an advisory lock held for the run's life.

Two runs on one work directory interleave their metrics and fight over checkpoints (one crashes,
the other hangs in orbax). A writer holds `flock` on `<workdir>/.lock`; the kernel drops it when
the process ends in any way, kill -9 included, so a stopped run never leaves a stale lock. The
file keeps the holder's pid, host and command, which the refusal quotes. Readers (probe,
extraction, fine-tuning initialisation) take the lock only when it is free: with it they may
move a damaged checkpoint aside, without it they leave the writer's folder alone.
"""

import contextlib
import fcntl
import os
import pathlib
import socket
import sys
import time

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another process holds the work directory."""


class WorkdirLock:
  """`flock(LOCK_EX)` on `<workdir>/.lock`; `release` (or the process's end) drops it."""

  def __init__(self, workdir):
    self.path = pathlib.Path(workdir) / LOCK_FILE
    self._fd = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def try_acquire(self, create: bool = False) -> bool:
    """Takes the lock if it is free; True when this process now holds it. A reader
    (`create=False`) neither creates a missing work directory nor fails on a read-only one."""
    if self._fd is not None:
      return True
    if create:
      self.path.parent.mkdir(parents=True, exist_ok=True)
    elif not self.path.parent.is_dir():
      return False
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
      if create:
        raise
      return False
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      return False
    os.ftruncate(fd, 0)
    holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%F %T')}: "
    os.write(fd, (holder + " ".join(sys.argv) + "\n").encode())
    self._fd = fd
    return True

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirBusyError naming the holder."""
    if not self.try_acquire(create=True):
      try:
        holder = self.path.read_text().strip() or "unknown"
      except OSError:
        holder = "unknown"
      raise WorkdirBusyError(
        f"{self.path.parent} is in use by another run ({holder}); wait for it to finish, "
        "stop it, or use another --workdir"
      )

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


@contextlib.contextmanager
def hold_for_run(workdir):
  """The lock of `workdir` for a training run: process 0 takes it (or raises WorkdirBusyError
  at once), the other processes of a multi-process run wait until it has."""
  import jax

  lock = WorkdirLock(workdir)
  if jax.process_index() == 0:
    lock.acquire()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("d2v_jax.workdir_lock")
  try:
    yield lock
  finally:
    lock.release()
