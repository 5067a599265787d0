"""The config a work directory's run was written with (its `config.json`), to continue that run.

    python main.py --config=configs/workdir.py:runs/imported --workdir=runs/imported

Every run writes its full config to `<workdir>/config.json`, and so does
`python -m d2v_jax.convert import` (issue 6): this reads it back, so a converted checkpoint
resumes pretraining (or a stopped run continues) with exactly its settings. Overrides work as
with any config (`--config.loop.total_steps=...`). JSON lists become tuples, as the configs
write them.
"""

import json
import pathlib

import ml_collections


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if not arg:
    raise ValueError("configs/workdir.py needs the work directory: configs/workdir.py:<workdir>")
  path = pathlib.Path(arg).expanduser() / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: no run (or converted checkpoint) was written there")
  return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))
