"""Config values checked before anything is built or compiled, and config changes on resume.

`validate` (issue 23): every numeric field of the pretraining and fine-tuning configs has a range
here; a value outside it is a `ConfigError` naming the field, the value and the range, raised at
start-up instead of a ZeroDivisionError after compilation, a run that silently does nothing
(`total_steps=-5`) or one that silently trains wrong (`lr=-1`, `ema.decay=1.5`). The test
`tests/test_config_check.py` holds every shipped config's numeric fields to this table.

`record`: a resumed run compares its config with the one its work directory last ran;
fields that change the train state's structure are refused, the rest are listed old -> new in a
warning, and `config_history.jsonl` keeps each config the run has run with.
"""

import dataclasses
import fnmatch
import json
import math
import pathlib
import time

from absl import logging

from d2v_jax import checkpoint

INF = math.inf


class ConfigError(ValueError):
  """A config value is out of range, or a resumed run changed a field it cannot."""


@dataclasses.dataclass(frozen=True)
class Range:
  """lo <= x <= hi (`open_lo`/`open_hi`: strict), an integer if `integer`, or one of `also`
  (sentinels such as -1 = "derive it")."""

  lo: float
  hi: float = INF
  integer: bool = False
  open_lo: bool = False
  open_hi: bool = False
  also: tuple = ()

  def holds(self, x) -> bool:
    if x in self.also:
      return True
    if self.integer and not float(x).is_integer():
      return False
    if not math.isfinite(x) and not (x == INF and self.hi == INF and not self.open_hi):
      return False
    above = x > self.lo if self.open_lo else x >= self.lo
    below = x < self.hi if self.open_hi else x <= self.hi
    return above and below

  def describe(self) -> str:
    kind = "an integer" if self.integer else "a number"
    lo = f"{'>' if self.open_lo else '>='} {self.lo:g}"
    hi = "" if self.hi == INF else f" and {'<' if self.open_hi else '<='} {self.hi:g}"
    also = f", or {' or '.join(map(repr, self.also))}" if self.also else ""
    return f"{kind} {lo}{hi}{also}"


def count(lo: int = 0, **kw) -> Range:
  return Range(lo, integer=True, **kw)


PROB = Range(0.0, 1.0)  # a probability or a fraction of the run
DROPOUT = Range(0.0, 1.0, open_hi=True)  # 1.0 would drop everything
POSITIVE = Range(0.0, open_lo=True)
NONNEG = Range(0.0)
EPS = Range(0.0, 1.0, open_lo=True, open_hi=True)
DECAY = Range(0.0, 1.0)  # EMA decay: 1 freezes the teacher, which 2.0's large recipe ends at

# Field patterns (fnmatch on the dotted path) -> range; the first match applies. Tuple values
# are checked element by element.
RULES: tuple[tuple[str, Range], ...] = (
  ("seed", count()),
  ("version", Range(1, 2, integer=True)),
  # loop
  ("loop.total_steps", count(1)),
  ("loop.log_every", count(1)),
  ("loop.checkpoint_every", count(1)),
  ("loop.keep_checkpoints", count(1)),  # 0 would delete every checkpoint, the final one too
  ("loop.collapse_check_after", count()),
  ("loop.min_target_std", NONNEG),
  ("loop.min_pred_std", NONNEG),
  ("loop.fsdp", count(1)),
  ("loop.fsdp_min_mb", NONNEG),
  ("loop.micro_batches", count(1)),
  ("loop.profile_first_step", count()),
  ("loop.profile_steps", count(1)),
  ("eval.every", count()),
  ("probe.every", count()),
  ("probe.batch_size", count(1)),
  ("probe.seeds", count()),
  ("probe.l2_grid", POSITIVE),
  ("probe.knn_k", count(1)),
  ("probe.knn_temperature", POSITIVE),
  ("probe.max_train", count()),
  ("probe.max_test", count()),
  ("extract.batch_size", count(1)),
  # optimiser and schedule
  ("optim.lr", POSITIVE),
  ("optim.end_lr", NONNEG),
  ("optim.init_lr_scale", NONNEG),
  ("optim.final_lr_scale", NONNEG),
  ("optim.b1", Range(0.0, 1.0, open_hi=True)),
  ("optim.b2", Range(0.0, 1.0, open_hi=True)),
  ("optim.eps", POSITIVE),
  ("optim.weight_decay", NONNEG),
  ("optim.clip_norm", NONNEG),  # 0 = no clipping
  ("optim.layer_decay", Range(0.0, 1.0, open_lo=True)),
  ("optim.warmup_steps", count()),
  ("optim.freeze_steps", count()),
  ("optim.*_frac", PROB),
  # EMA teacher
  ("ema.decay", DECAY),
  ("ema.end_decay", DECAY),
  ("ema.anneal_steps", count()),
  # targets and loss
  ("targets.top_k", count(1)),
  ("loss.beta", NONNEG),  # 0 = L2
  ("loss.scale", Range(0.0, open_lo=True, also=(-1, None))),  # -1 / None: 1/sqrt(D)
  ("loss.cls_weight", NONNEG),
  # masking
  ("masking.mask_id", count(also=(-1,))),
  ("masking.special_ids", count()),
  ("masking.num_clones", count(1)),
  ("masking.ratio", Range(0.0, 1.0, open_hi=True)),
  ("masking.adjust", Range(0.0, 1.0, open_hi=True)),
  ("masking.min_aspect", POSITIVE),
  ("masking.*_prob", PROB),
  ("masking.prob", PROB),
  ("masking.min_masks", count()),
  ("masking.masked_patches", count()),
  ("masking.*", count(1)),  # lengths, blocks and patch counts
  ("mixup.*_alpha", NONNEG),
  ("mixup.label_smoothing", Range(0.0, 1.0, open_hi=True)),
  ("mixup.*prob", PROB),
  # model
  ("model.*dropout", DROPOUT),
  ("model.decoder.input_dropout", DROPOUT),
  ("model.layerdrop", DROPOUT),
  ("model.drop_path_rate", DROPOUT),
  ("model.*_eps", EPS),
  ("model.layer_scale_init", NONNEG),
  ("model.mask_noise_std", NONNEG),
  ("model.feature_grad_mult", NONNEG),
  ("model.vocab_size", count(1, also=(-1,))),
  ("model.pad_id", count()),
  ("model.prenet_depth", count()),
  ("model.*", count(1)),  # sizes: layers, widths, heads, kernels, groups, positions
  # fine-tuning head
  ("head.num_outputs", count(1, also=(-1,))),
  ("head.dropout", DROPOUT),
  ("head.label_smoothing", Range(0.0, 1.0, open_hi=True)),
  ("head.layer_norm_eps", EPS),
  ("head.init_scale", POSITIVE),
  # input pipelines
  ("input.max_length", count(1, also=(-1,))),
  ("input.min_length", count()),
  ("input.max_train_examples", count()),  # 0 = all
  ("input.num_workers", count()),
  ("input.crop_scale", Range(0.0, 1.0, open_lo=True)),
  ("input.crop_ratio", POSITIVE),
  ("input.eval_crop_pct", Range(0.0, 1.0, open_lo=True)),
  ("input.*_prob", PROB),
  ("input.color_jitter", NONNEG),
  ("input.mean", PROB),
  ("input.std", POSITIVE),
  ("input.*", count(1)),  # batch sizes, lengths, sizes, sample rate
)


def rule_for(path: str) -> Range | None:
  for pattern, rule in RULES:
    if fnmatch.fnmatchcase(path, pattern):
      return rule
  return None


def numeric_fields(config, prefix: str = "") -> dict:
  """{dotted path: value} of every number (or tuple of numbers) in `config`; booleans excluded."""
  found = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    if hasattr(value, "items"):
      found.update(numeric_fields(value, path + "."))
    elif _is_number(value) or (
      isinstance(value, (tuple, list)) and value and all(_is_number(v) for v in value)
    ):
      found[path] = value
    elif value is None and rule_for(path) is not None:
      found[path] = value
  return found


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(config) -> None:
  """Raises ConfigError for the first numeric field of `config` outside its range."""
  for path, value in numeric_fields(config).items():
    rule = rule_for(path)
    if rule is None:
      continue
    values = value if isinstance(value, (tuple, list)) else (value,)
    if not all(rule.holds(v) for v in values):
      raise ConfigError(f"config.{path}={value!r} is out of range: use {rule.describe()}")


# Fields whose change alters the train state's tree, so the checkpoint cannot be restored into
# it. What the checkpoint describes itself (modality, version, mode, the model's sizes) is
# refused by `checkpoint.check_compatible` on restore, which names the checkpoint's values.
STRUCTURE_FIELDS = ("ema.teacher_params", "optim.name")


def _described_by_checkpoint(field: str) -> bool:
  if field in ("modality", "version", "mode", "head.task", "head.num_outputs"):
    return True
  group, _, name = field.partition(".")
  return group == "model" and name.split(".")[0] not in checkpoint.TRAINING_ONLY_MODEL_FIELDS


HISTORY_FILE = "config_history.jsonl"


def _flat(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return flat


def record(workdir, config, *, resuming: bool, write: bool) -> list[str]:
  """Compares `config` with `<workdir>/config.json` (the config the run last ran with) when
  `resuming`: raises ConfigError naming changed structure fields and warns about the others
  (old -> new). With `write` (process 0), appends `config` to `config_history.jsonl` when the
  run starts afresh or its config changed. Returns the changes."""
  workdir = pathlib.Path(workdir)
  current = json.loads(config.to_json_best_effort())
  previous_file = workdir / "config.json"
  changes = []
  if resuming and previous_file.exists():
    old, new = _flat(json.loads(previous_file.read_text())), _flat(current)
    unset = "<unset>"
    changed = sorted(k for k in set(old) | set(new) if old.get(k, unset) != new.get(k, unset))
    if any(_described_by_checkpoint(k) for k in changed):
      return changes  # the restore refuses it, naming the checkpoint's values
    refused = [k for k in changed if k in STRUCTURE_FIELDS]
    if refused:
      raise ConfigError(
        f"Resuming {workdir} with changed {', '.join(refused)} "
        f"({'; '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in refused)}): these "
        "change the train state's structure. Set them back, or use a fresh --workdir."
      )
    changes = [f"{k}: {old.get(k, unset)!r} -> {new.get(k, unset)!r}" for k in changed]
    if changes:
      logging.warning("Resuming %s with a changed config: %s", workdir, "; ".join(changes))
  history = workdir / HISTORY_FILE
  if write and (not resuming or changes or not history.exists()):
    workdir.mkdir(parents=True, exist_ok=True)
    with open(history, "a") as f:
      f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": current}) + "\n")
  return changes
