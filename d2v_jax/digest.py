"""Checkpoint integrity: the size and SHA-256 of every file of a checkpoint step (issue 23).

orbax checks neither: flipped bytes in an array file load as other numbers (or NaN), and a
truncated or missing file fails deep in tensorstore. `write` records `digest.json` in the step's
temporary directory after orbax has written every file and before it renames the directory into
place, so a step that exists has its digest; it runs in orbax's background commit thread, off the
train step's path. `problem` checks a step before anything of it is read and names the first
file that does not match, so a damaged step is skipped with one sentence instead of a traceback.
"""

import hashlib
import json
import os
import pathlib

DIGEST_FILE = "digest.json"
# Written into the step's `meta` item: a step whose meta says so and lacks `digest.json` is
# damaged; one without it predates digests and is read unverified.
META_FIELD = "digest"
_CHUNK = 1 << 22  # 4 MiB reads: hashlib releases the GIL on large updates
# orbax's step metadata (commit time) and commit marker, rewritten after the digest is taken:
# the first is checked as JSON instead, the second is not read on restore.
_WRITTEN_LATER = ("_CHECKPOINT_METADATA", "commit_success.txt", DIGEST_FILE)


def _files(step_dir: pathlib.Path) -> list[str]:
  names = (str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file())
  return sorted(name for name in names if name not in _WRITTEN_LATER)


def _json_problem(path: pathlib.Path, name: str) -> str | None:
  try:
    value = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    return f"its {name} is not valid JSON ({type(error).__name__})"
  return None if isinstance(value, dict) else f"its {name} is not a JSON object"


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def write(step_dir: pathlib.Path) -> None:
  """Records every file of `step_dir` (size and SHA-256) in `step_dir/digest.json`."""
  step_dir = pathlib.Path(step_dir)
  entries = {
    name: {"bytes": (step_dir / name).stat().st_size, "sha256": _sha256(step_dir / name)}
    for name in _files(step_dir)
  }
  tmp = step_dir / (DIGEST_FILE + ".tmp")
  tmp.write_text(json.dumps({"files": entries}, indent=1) + "\n")
  os.replace(tmp, step_dir / DIGEST_FILE)


def _read_meta(step_dir: pathlib.Path) -> tuple[dict | None, str | None]:
  """(the step's meta JSON, None) or (None, what is wrong with it)."""
  path = step_dir / "meta" / "metadata"
  if not path.is_file():
    return None, "its meta/metadata is missing"
  wrong = _json_problem(path, "meta/metadata")
  return (None, wrong) if wrong else (json.loads(path.read_text()), None)


def problem(step_dir: pathlib.Path) -> str | None:
  """What is wrong with the checkpoint step at `step_dir`, or None when it is intact (see
  `_problem`); a file that cannot be read (or vanishes meanwhile: another process moved the
  step aside) is what is wrong."""
  try:
    return _problem(pathlib.Path(step_dir))
  except OSError as error:
    return f"{error.filename or step_dir} cannot be read ({error.strerror or error})"


def _problem(step_dir: pathlib.Path) -> str | None:
  """What is wrong with the step at `step_dir`, or None.

  Intact: its meta and orbax's step metadata are readable JSON, `state/` exists, and every
  file `digest.json` lists has its recorded size and SHA-256 (a step written before digests,
  without the meta field, passes on the other checks alone).
  """
  if not step_dir.is_dir():
    return "it is not a folder"
  if not any(step_dir.iterdir()):
    return "the folder is empty"
  meta, wrong = _read_meta(step_dir)
  if wrong:
    return wrong
  if not (step_dir / "state").is_dir():
    return "its state/ folder is missing"
  step_meta = step_dir / "_CHECKPOINT_METADATA"
  if step_meta.exists() and (wrong := _json_problem(step_meta, step_meta.name)):
    return wrong
  digest_path = step_dir / DIGEST_FILE
  if not digest_path.is_file():
    return f"its {DIGEST_FILE} is missing" if meta.get(META_FIELD) else None
  try:
    entries = json.loads(digest_path.read_text())["files"]
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
    return f"its {DIGEST_FILE} is unreadable ({type(error).__name__})"
  for name, expected in entries.items():
    path = step_dir / name
    if not path.is_file():
      return f"{name} is missing"
    size = path.stat().st_size
    if size != expected["bytes"]:
      return f"{name} has {size} bytes, {expected['bytes']} were written"
    if _sha256(path) != expected["sha256"]:
      return f"{name} does not match its SHA-256 digest"
  return None
