"""Errors a person reads (issue 23): one short message, the hint first, the file or field named.

The entry points (`main.py`, `python -m d2v_jax.extract`, `python -m d2v_jax.convert`) route
what goes wrong through `user_message`: a mistake in the command line, the config, the data, the
work directory or the disk becomes one message and exit code 1 instead of a traceback;
anything else (a bug) keeps its traceback. `--verbosity=1` shows the traceback of every error.
"""

import errno
import os
import re
import sys

from absl import logging


def user_errors() -> tuple[type, ...]:
  """What a user can mend from the message alone (imported here: the flag parser runs first
  and stays light)."""
  from d2v_jax import checkpoint, config_check, metrics, workdir_lock

  return (
    checkpoint.CheckpointError,
    config_check.ConfigError,
    workdir_lock.WorkdirBusyError,
    metrics.TrainingHealthError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    ValueError,
  )


def _clean(text: str) -> str:
  # ml_collections quotes its KeyError text, newline and all: '\'lrr\'\nDid you mean "lr"…'
  text = text.strip().strip("'\"").replace("\\n", "\n").replace("\\'", "'")
  return text


def _disk_full(what: str, where: str | None) -> str:
  where = f" ({where})" if where else ""
  return f"{what}{where}: free some space (or use another --workdir) and rerun"


def user_message(error: BaseException) -> str | None:
  """The message for `error` if a user caused it (and can mend it), else None."""
  if isinstance(error, OSError) and error.errno == errno.ENOSPC:
    what = error.strerror if "No space" in (error.strerror or "") else "No space left on device"
    return _disk_full(what, error.filename)
  if "No space left on device" in str(error):  # tensorstore's, inside orbax's ValueError
    path = re.search(r'(?:Failed writing|local file): "([^"]+)"', str(error))
    return _disk_full("No space left on device", path.group(1) if path else None)
  if isinstance(error, UnicodeDecodeError):
    return f"A file is not UTF-8 text ({error.reason} at byte {error.start})"
  if isinstance(error, user_errors()):
    return _clean(str(error)) or type(error).__name__
  cause = error.__cause__ or error.__context__
  if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
    return user_message(cause)
  return None


def exit_with(message: str) -> None:
  """Prints `message` (after the log, so it is the last thing on screen) and exits 1.

  `os._exit`: the interpreter's teardown would run the callbacks of orbax's and tensorstore's
  unfinished writes (a failed save) into closed event loops, one traceback each."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  os._exit(1)


def report(error: BaseException) -> None:
  """Exits with `error`'s one-line message when a user caused it; returns otherwise."""
  message = user_message(error)
  if message is None or logging.get_verbosity() >= logging.DEBUG:
    return
  exit_with(message)


def flag_error_message(error: BaseException, argv: list[str]) -> str:
  """One message for a command line that did not parse: the hint first, then the flag."""
  raw = str(error).strip()
  if "Error whilst parsing config file" in raw:  # get_config raised: keep its last line
    flag = raw.split(": Error whilst", 1)[0].removeprefix("flag ")
    return f"{flag}: {raw.splitlines()[-1]}"
  if "Failed loading config file" in raw:  # ml_collections' OSError for a missing file
    return f"Cannot load the config file: {raw.splitlines()[-1].strip()}"
  text = _clean(raw)
  # A missing config field: ml_collections says "'lrr'\nDid you mean "lr" instead of "lrr"?"
  lines = [line.strip().strip("'") for line in text.splitlines() if line.strip()]
  hint = next((line for line in lines if line.startswith("Did you mean")), "")
  key = lines[0] if lines else ""
  if key and re.fullmatch(r"[\w]+", key):
    flag = next((a for a in argv if re.search(rf"\.{key}(=|$)", a.split("=")[0] + "=")), "")
    flag = flag.split("=")[0]
    where = f"{flag}: no config field {key!r}" if flag else f"no config field {key!r}"
    return f"{hint} ({where})" if hint else where
  return " ".join(lines) if lines else type(error).__name__
