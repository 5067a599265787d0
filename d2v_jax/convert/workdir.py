"""Converted checkpoints as d2v-jax work directories, and work directories back to HF (issue 6).

`import_checkpoint(src, out_dir)` reads an HF model directory or a fairseq / BEiT `.pt` file
(data2vec 1.0, or 2.0 into our `version=2` models) and writes a work directory that every entry
point reads:
  out_dir/checkpoints/0/   the train state (orbax) and its self-description, as a run writes them
  out_dir/config.json      the run's full config: the modality's pretraining config, or the
                           task's fine-tuning config, at the checkpoint's sizes
  out_dir/conversion.json  the source, the dropped keys (with reasons), where the teacher came from
  out_dir/tokenizer/       text: vocab.json + merges.txt (+ dict.txt) if the source has them
  out_dir/dict.ltr.txt     CTC: the letters of the head's outputs, if the source has them
so that `python -m d2v_jax.extract out_dir ...`, fine-tuning with
`--config.init.pretrained=out_dir` and resumed pretraining (`configs/workdir.py:out_dir`) work as
on our own runs. The state has a fresh optimiser at step 0 and no data position; a pretraining
state's EMA teacher is the checkpoint's (fairseq `_ema`, BEiT `model_ema`) where it has one, else
a copy of the student (HF checkpoints carry no teacher).

`export_checkpoint(workdir, out_dir)` writes a run's newest student (pretrained encoder, or a
fine-tuned model with its head) as `config.json` + `model.safetensors` for
`Data2Vec*Model.from_pretrained(out_dir)` (or the task model's class).
"""

import dataclasses
import importlib
import json
import pathlib
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from safetensors import numpy as safetensors_numpy

from d2v_jax import checkpoint, ctc, optim, pretrained, teacher
from d2v_jax import state as state_lib
from d2v_jax.convert import (
  common,
  fairseq_export,
  fairseq_recipe,
  fairseq_v1,
  fairseq_v2,
  files,
  hf,
  torch_pickle,
)
from d2v_jax.data import tokenizer as tokenizer_lib
from d2v_jax.models import data2vec

# Fine-tuning config per (modality, head task): the module in configs/ and its argument.
_FINETUNE_CONFIGS = {
  ("audio", "ctc"): ("audio_ctc", ""),
  ("image", "classify"): ("image_cls", ""),
  ("text", "classify"): ("text_cls", ""),
  ("text", "regress"): ("text_cls", "task=stsb"),
}
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "dict.txt")


def read_source(src: str | pathlib.Path, *, seed: int = 0) -> tuple[hf.Imported, str]:
  """(our model converted from `src`, what `src` was: "hf" | "fairseq" | "fairseq-v2").

  `src` is an HF model directory, or a fairseq / BEiT PyTorch file: data2vec 2.0 files map onto
  our 2.0 models (`fairseq_v2`), data2vec 1.0 ones are renamed to HF names first (`fairseq_v1`).
  The result's `teacher` holds the checkpoint's EMA teacher where it has one.
  """
  src = pathlib.Path(src).expanduser()
  if not src.exists():
    raise FileNotFoundError(f"{src} does not exist")
  if src.is_dir():
    state_dict, hf_config = files.load_hf_dir(src)
    return hf.from_hf(state_dict, hf_config, seed=seed), "hf"
  ckpt = files.load_torch_file(src)
  model_dict, cfg, task_cfg, ema = _fairseq_parts(ckpt, src)
  if fairseq_v2.is_v2(model_dict):
    imported = fairseq_v2.from_fairseq(model_dict, cfg, seed=seed)
    return dataclasses.replace(imported, recipe=(cfg, task_cfg)), "fairseq-v2"
  named = fairseq_v1.to_hf(model_dict, cfg)
  teacher_dict = named.teacher
  if ema is not None:  # BEiT keeps its EMA as a whole second model
    teacher_dict = fairseq_v1.to_hf(ema, cfg).state_dict
  imported = hf.from_hf(named.state_dict, named.hf_config, seed=seed)
  teacher = _hf_teacher_leaves(imported.modality, teacher_dict, named.hf_config)
  dropped, params, kept = (*named.dropped, *imported.dropped), imported.params, ()
  head, head_keys = fairseq_recipe.regression_head(imported.modality, model_dict)
  if head is not None and imported.head_cfg is None:  # a pretraining file: keep its head
    fairseq_recipe.check_head_shapes(head, params["final_proj"])
    params, kept = {**params, "final_proj": head}, tuple(head_keys)
    dropped = tuple(d for d in dropped if d.split(":")[0] not in head_keys)
    ema_head, _ = fairseq_recipe.regression_head(imported.modality, ema or {})
    if ema_head is not None and teacher is not None:  # BEiT's teacher has its own lm_head
      teacher.update({("final_proj", k): v for k, v in ema_head.items()})
  imported = dataclasses.replace(
    imported, params=params, dropped=dropped, teacher=teacher, kept=kept, recipe=(cfg, task_cfg)
  )
  return imported, "fairseq"


def _hf_teacher_leaves(modality: str, teacher_dict: dict | None, hf_config: dict) -> dict | None:
  """An EMA teacher in HF base-model names -> its leaves in our tree ({path tuple: array})."""
  if not teacher_dict:
    return None
  table = hf.MODALITY_CONVERTERS[modality].expected_keys(common.config_dict(hf_config))
  # Vision's position-index buffers: constants our model computes (checked on the student).
  teacher_dict = {k: v for k, v in teacher_dict.items() if "relative_position_index" not in k}
  unknown = sorted(k for k in teacher_dict if k not in table)
  if unknown:
    raise common.ConversionError("EMA teacher keys with no counterpart: " + ", ".join(unknown))
  return common.convert(teacher_dict, table)


def _fairseq_parts(ckpt: dict, src: pathlib.Path):
  """(model state dict, model config dict or None, task config dict or None, BEiT EMA state
  dict or None) of a `.pt`."""
  for key in ("model", "module"):  # fairseq and BEiT pretraining; BEiT (DeepSpeed) fine-tuning
    if isinstance(ckpt.get(key), dict):
      full = ckpt.get("cfg")
      cfg = full.get("model", full) if isinstance(full, dict) else ckpt.get("args")
      task = full.get("task") if isinstance(full, dict) else None
      ema = ckpt.get("model_ema") if isinstance(ckpt.get("model_ema"), dict) else None
      cfg = cfg if isinstance(cfg, dict) else None
      return ckpt[key], cfg, task if isinstance(task, dict) else None, ema
  raise common.ConversionError(
    f"{src}: expected a fairseq or BEiT checkpoint (a dict with 'model' or 'module'); its keys "
    f"are {sorted(ckpt)[:10]}"
  )


def run_config(imported: hf.Imported) -> ml_collections.ConfigDict:
  """The full config of a run with the imported model: pretraining, or the head's fine-tuning."""
  if imported.head_cfg is None:
    name, arg = imported.modality, ""
  else:
    key = (imported.modality, imported.head_cfg.task)
    name, arg = _FINETUNE_CONFIGS[key]
  if imported.version == 2 and imported.head_cfg is None:
    arg = "version=2"
  module = importlib.import_module(f"configs.{name}")
  variant = imported.model_cfg.variant
  try:
    config = module.get_config(",".join(filter(None, (f"variant={variant}", arg))))
  except ValueError:  # e.g. no text-large recipe: the base recipe, at the checkpoint's sizes
    config = module.get_config(",".join(filter(None, ("variant=base", arg))))
  if imported.version == 2 and imported.head_cfg is not None:
    # A fine-tuning config is built on data2vec 1.0's model: take the 2.0 encoder's fields as
    # fine-tuning from a 2.0 run does, keeping this config's training fields (dropouts).
    config.version = 2
    config.model = pretrained.merge_model_config(config.model, imported.model_cfg.to_dict())
  else:
    config.model.update(imported.model_cfg.to_dict())
  if imported.head_cfg is not None:
    config.head.update(imported.head_cfg.to_dict())
  # Targets come from the main blocks (data2vec 2.0's prenet blocks are not among them).
  num_layers = data2vec.model_sizes(config.modality, config.model)["num_layers"]
  num_layers -= config.model.get("prenet_depth", 0)
  if "targets" in config and config.targets.top_k > num_layers:  # shallower than the recipe's
    logging.info("targets.top_k %d -> %d (the model's blocks)", config.targets.top_k, num_layers)
    config.targets.top_k = num_layers
  return config


def _teacher(config, student: dict, leaves: dict | None) -> tuple:
  """(the EMA teacher tree, where it came from): the checkpoint's EMA leaves over a student copy."""
  names = tuple(config.ema.teacher_params)
  tree = teacher.init_teacher(student, names)
  if not leaves:
    return tree, "a copy of the student (the checkpoint has no EMA teacher)"
  flat = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
  paths = {tuple(k.key for k in path): path for path in flat}
  outside = sorted("/".join(p) for p in leaves if p not in paths)
  if outside:
    raise common.ConversionError("EMA teacher leaves outside our teacher: " + ", ".join(outside))
  filled = {paths[p]: np.asarray(v) for p, v in leaves.items()}
  leaves_out = [filled.get(path, value) for path, value in flat.items()]
  tree = jax.tree_util.tree_unflatten(jax.tree.structure(tree), leaves_out)
  return tree, f"the checkpoint's EMA ({len(filled)} of {len(flat)} leaves; the rest copied)"


def _state(config, imported: hf.Imported) -> tuple:
  """(train state at step 0 with a fresh optimiser, where the teacher came from)."""
  num_layers = data2vec.model_sizes(config.modality, config.model)["num_layers"]
  params = jax.tree.map(np.asarray, imported.params)
  if config.mode == "finetune":
    tx, _ = optim.make_optimizer(config.optim, config.loop.total_steps, num_layers=num_layers)
    ema_tree, origin = None, "none (a fine-tuned model)"
  else:
    tx, _ = optim.make_optimizer(config.optim, config.loop.total_steps)
    ema_tree, origin = _teacher(config, params, imported.teacher)
  state = state_lib.TrainState(
    step=np.zeros((), np.int32), params=params, teacher=ema_tree, opt_state=tx.init(params)
  )
  return state, origin


def _copy_side_files(src: pathlib.Path, out_dir: pathlib.Path, config, imported) -> list[str]:
  """Tokenizer files (text) and CTC letters next to the checkpoint; returns what was written."""
  written = []
  if imported.modality == "text" and src.is_dir() and (src / "vocab.json").exists():
    target = out_dir / "tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
      if (src / name).exists():
        shutil.copy(src / name, target / name)
        written.append(f"tokenizer/{name}")
    config.input.tokenizer = str(target.resolve())
  if imported.head_cfg is not None and imported.head_cfg.task == "ctc":
    vocab = src / "vocab.json" if src.is_dir() else None
    if vocab is not None and vocab.exists():
      letters = ctc_letters_from_hf_vocab(json.loads(vocab.read_text()), imported.head_cfg)
      letters.save(out_dir / "dict.ltr.txt")
      written.append("dict.ltr.txt")
  return written


def ctc_letters_from_hf_vocab(vocab: dict[str, int], head_cfg) -> ctc.LetterVocabulary:
  """Our CTC vocabulary for an HF CTC tokenizer's `vocab.json`: id 0 is the blank (HF's pad),
  and every other id, specials included, is a symbol in id order."""
  by_id = sorted(vocab.items(), key=lambda kv: kv[1])
  if [i for _, i in by_id] != list(range(head_cfg.num_outputs)):
    raise common.ConversionError(
      f"vocab.json's ids are not 0..{head_cfg.num_outputs - 1} (the CTC head's outputs)"
    )
  return ctc.LetterVocabulary([token for token, _ in by_id[1:]])


def import_checkpoint(src, out_dir, *, seed: int = 0) -> dict:
  """Converts `src` into the work directory `out_dir` (which must not hold checkpoints yet).

  Returns the conversion report written to `conversion.json`.
  """
  src, out_dir = pathlib.Path(src).expanduser(), pathlib.Path(out_dir).expanduser()
  if (out_dir / "checkpoints").exists() and any((out_dir / "checkpoints").iterdir()):
    raise FileExistsError(
      f"{out_dir} already holds checkpoints; choose an empty directory (nothing was written)"
    )
  imported, kind = read_source(src, seed=seed)
  config = run_config(imported)
  recipe = []
  if imported.recipe is not None and imported.head_cfg is None:
    recipe = fairseq_recipe.apply_recipe(
      config, imported.modality, *imported.recipe, version=imported.version
    )
  state, teacher_origin = _state(config, imported)
  written = _copy_side_files(src, out_dir, config, imported)
  ckpt = checkpoint.Checkpointer(out_dir, config, keep=config.loop.keep_checkpoints)
  ckpt.save(0, state)
  ckpt.wait()
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  report = {
    "source": str(src.resolve()),
    "source_kind": kind,
    "modality": imported.modality,
    "version": imported.version,
    "mode": config.mode,
    "head": imported.head_cfg.to_dict() if imported.head_cfg is not None else None,
    "model": imported.model_cfg.to_dict(),
    "teacher": teacher_origin,
    "kept": list(imported.kept),
    "recipe": recipe,
    "dropped": list(imported.dropped),
    "files": ["checkpoints/0", "config.json", *written],
  }
  (out_dir / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
  for line in report["dropped"]:
    logging.info("dropped %s", line)
  return report


def export_checkpoint(workdir, out_dir) -> dict:
  """Writes the newest student of `workdir` as an HF model directory (data2vec 1.0), or in
  fairseq's layout (2.0: HF has no class for it); returns the written config."""
  run = pretrained.load_pretrained(workdir)
  if run.meta["version"] == 2:
    return _export_fairseq_v2(run, pathlib.Path(out_dir).expanduser())
  meta = run.meta
  head = meta.get("head")
  head_cfg = ml_collections.ConfigDict(head) if head else None
  model_cfg = ml_collections.ConfigDict(meta["model"])
  state_dict, hf_config = hf.to_hf(run.modality, run.params, model_cfg, head_cfg)
  out_dir = pathlib.Path(out_dir).expanduser()
  files.save_hf_dir(out_dir, state_dict, hf_config)
  _export_side_files(out_dir, run)
  is_ctc = head_cfg is not None and run.modality == "audio" and head_cfg.task == "ctc"
  if head_cfg is None or is_ctc:  # and the released layout (fairseq's, data2vec_vision's)
    config = _run_config(run)
    try:
      if is_ctc:
        ckpt = fairseq_export.ctc_v1_checkpoint(config, run.params)
      else:
        ckpt = fairseq_export.v1_checkpoint(config, run.params, run.teacher)
    except common.ConversionError as error:
      logging.info("No fairseq checkpoint.pt: %s", error)
    else:
      torch_pickle.save(ckpt, out_dir / FAIRSEQ_CHECKPOINT)
  return hf_config


def _run_config(run) -> ml_collections.ConfigDict:
  """The run's full config (`config.json` beside its checkpoints): the recipe a fairseq cfg
  carries."""
  config_file = run.directory.parents[1] / "config.json"
  if not config_file.exists():
    raise common.ConversionError(f"{config_file} is missing: the run's recipe goes into the cfg")
  return ml_collections.ConfigDict(json.loads(config_file.read_text()))


FAIRSEQ_CHECKPOINT = "checkpoint.pt"


def _export_fairseq_v2(run, out_dir: pathlib.Path) -> dict:
  """`checkpoint.pt` (fairseq's `Data2VecMultiModel` layout, teacher as `_ema`), the same
  tensors as `model.safetensors` (the teacher's under `_ema.`) and `config.json` (the cfg)."""
  config = _run_config(run)
  if run.meta.get("head"):
    raise common.ConversionError(
      "exporting a fine-tuned data2vec 2.0 model to fairseq's layout is not supported"
    )
  ckpt = fairseq_export.checkpoint_dict(config, run.params, run.teacher)
  out_dir.mkdir(parents=True, exist_ok=True)
  torch_pickle.save(ckpt, out_dir / FAIRSEQ_CHECKPOINT)
  flat = {k: v for k, v in ckpt["model"].items() if k != "_ema"}
  flat |= {f"_ema.{k}": v for k, v in ckpt["model"].get("_ema", {}).items()}
  safetensors_numpy.save_file(flat, out_dir / files.HF_WEIGHTS, metadata={"format": "fairseq"})
  (out_dir / "config.json").write_text(json.dumps(ckpt["cfg"], indent=2) + "\n")
  return {"architectures": ["fairseq Data2VecMultiModel"], **ckpt["cfg"]["model"]}


def _export_side_files(out_dir: pathlib.Path, run) -> None:
  """The run's tokenizer files (text), so the HF directory holds what its tokenizer needs."""
  config_file = run.directory.parents[1] / "config.json"
  if run.modality != "text" or not config_file.exists():
    return
  tokenizer = json.loads(config_file.read_text()).get("input", {}).get("tokenizer", "")
  directory = pathlib.Path(tokenizer) if tokenizer else tokenizer_lib.EMBEDDED_TOKENIZER_DIR
  for name in _TOKENIZER_FILES:
    if (directory / name).exists():
      shutil.copy(directory / name, out_dir / name)


def describe(report: dict[str, Any], out_dir) -> str:
  """What was written and the commands that use it."""
  modality, out = report["modality"], str(out_dir)
  lines = [f"Wrote {out} ({modality}, {report['mode']}); teacher: {report['teacher']}"]
  lines.append(f"  dropped {len(report['dropped'])} keys (see {out}/conversion.json)")
  lines.append(
    f"  features:  python -m d2v_jax.extract --checkpoint={out} --input=INPUT --output=OUTPUT"
  )
  if report["mode"] == "pretrain":
    lines.append(
      f"  fine-tune: python main.py --config=configs/<task>.py --config.init.pretrained={out}"
    )
  lines.append(f"  continue:  python main.py --config=configs/workdir.py:{out} --workdir={out}")
  return "\n".join(lines)
