"""Labelled sentences and sentence pairs for GLUE-style fine-tuning (spec §1.6, "GLUE, v1").

data2vec v1 text is fine-tuned with RoBERTa's recipe (fairseq `sentence_prediction` task on the
GLUE data as `examples/roberta/preprocess_GLUE_tasks.sh` prepares it). Each field is stripped and
tokenized on its own, without special tokens, then laid out as
  one field:  `<s> a </s>`
  two fields: `<s> a </s> </s> b </s>`            (fairseq's separator before b is `</s>`)
and padded with `<pad>` to L = `config.input.max_length` (static shapes, the jitted step compiles
once). Ids: `<s>` 0, `<pad>` 1, `</s>` 2.

Truncation keeps the beginning of every field and cuts its END, so that a row always ends in
`</s>`. The content budget is L - 2 tokens for one field and L - 4 for two. Pairs are cut like HF's
`truncation="longest_first"`: a token at a time from the longer field, from the second one when
both are as long (`truncate_pair`). fairseq, with `truncate_sequence` set, instead cuts the
concatenated row at max_positions (losing the final `</s>`); both agree whenever nothing is cut.
The cut examples are counted (`stats.truncated`) and logged with the longest example seen, to
help choose L.

Batches are `{"tokens": int32[b, L], "padding_mask": bool[b, L] (True at <pad>), "label":
int32[b]}` for classification, with `"target": float32[b]` in place of `"label"` for regression
(`config.head.task == "regress"`, e.g. STS-B).

Sources (`config.input.source`):
  embedded  the verses of the embedded King James Bible with the genre of their book (six
            classes, `text_corpus.GENRES`); split train | test | all, by chapter. One field.
  tsv       `<path>/<split>.tsv`: UTF-8, tab-separated, a header row naming the columns (GLUE's
            layout). No quoting: a quote character is part of the text (GLUE's files are read
            so by HF's GLUE processors, csv with quotechar=None).
  jsonl     `<path>/<split>.jsonl`: one JSON object a line.
  tfds      `tfds.data_source(path, split=...)` (e.g. `glue/sst2`), read without TensorFlow;
            class names come from the label's ClassLabel feature.
The text fields are `config.input.text_fields` (one or two column / field / feature names;
`GLUE_TASKS` lists TFDS GLUE's) and the label `config.input.label_field`.

Labels. Regression: a number. Classification: a class id (an integer) or a class name (a string).
A string equal to one of the class names is that class; otherwise an integer is a class id. Class
names are, in this order of precedence: the source's own (embedded genres, a TFDS ClassLabel);
`config.input.label_names`; for files, the sorted distinct names of the TRAIN split
(`config.input.split`) when its labels are names, or "0" ... "C-1" when they are ids (C = the
largest id + 1). Evaluation maps labels the same way, so it reads the train split's labels too
(unless the caller passes the training set's `class_names`). A label that is not a known class is
an error naming its file and line. GLUE test splits hide their labels (-1): a clear error.

Bad input is skipped and counted (`LabelledTextStats`), each skip logged with its file:line (the
first `_LOG_FIRST`, then a total): an empty or whitespace-only text (`empty_texts`), a label that is
neither a class id nor a name, a negative id, or not a finite number for regression (`bad_labels`),
a malformed row (too few tab-separated fields, invalid JSON, a line that is not an object, a
missing field or a text that is not a string: `bad_rows`). Blank lines are counted and skipped;
bytes that are not UTF-8 become U+FFFD (counted lines). A missing file, or a column or feature
that the header / the first object / the dataset lacks, is an error listing what there is.

Every example is tokenized once at start-up (ids kept in memory, 4 bytes a token). At the
~250k tokens/s that `text.py` quotes, MNLI's 393k pairs (~15M tokens) take about a minute
(an estimate, not measured). Training (`make_text_finetune_dataset`): each epoch shuffles the
examples (seed from `(seed, epoch)`, `batching.EpochPlan`) and cuts them into full global batches
of `config.input.batch_size` (the remainder is dropped); a grain dataset over global batch indices
0, 1, 2, ... assembles the rows, so a batch is a pure function of its index and a restored
iterator continues exactly. Process p of P takes rows [p*b, (p+1)*b) of every global batch.
`config.input.max_train_examples` > 0 trains on a fixed subset (class-stratified for
classification, seed 0), e.g. for learning curves on the embedded set.

Evaluation (`text_eval_batches`): every example of a split once, in source order, in batches of
`config.input.eval_batch_size` (default `batch_size`); the last batch is filled up by repeating its
first example, with `example_mask` False on those filler rows. Every process gets the whole set
(the same batches): evaluation sets are small, and metrics such as MCC or F1 need all predictions.
"""

import dataclasses
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import grain
import numpy as np
from absl import logging

from d2v_jax.data import batching, text, text_corpus, text_sources
from d2v_jax.data.tokenizer import BOS, EOS, PAD  # RoBERTa's ids: <s> 0, <pad> 1, </s> 2

SOURCES = ("embedded", "tsv", "jsonl", "tfds")
TASK_KINDS = ("classify", "regress")
DEFAULT_TEXT_FIELDS = ("sentence",)
DEFAULT_LABEL_FIELD = "label"
EMBEDDED_EVAL_SPLIT = "test"
_LOG_FIRST = 10  # skipped rows logged one by one, per split; then one line with the total
_LOG_EVERY = 100_000  # TFDS records, for progress lines
# Assembling a batch is a few small copies; two threads keep a handful ready.
_READ_THREADS = 2
_PREFETCH_BATCHES = 8
_INTEGER = re.compile(r"[+-]?\d+")


class GlueTask(NamedTuple):
  """A GLUE task as TFDS (`glue/<name>`) stores it."""

  text_fields: tuple[str, ...]  # the TFDS text features, in order (first, second sentence)
  num_classes: int  # 1 for regression (STS-B)


# The eight tasks of spec §1.6 (the recipe's batch / LR / updates are there). The label feature is
# "label" in all of them; the dev split is "validation" ("validation_matched" and
# "validation_mismatched" for MNLI); "test" labels are hidden.
GLUE_TASKS = {
  "mnli": GlueTask(("premise", "hypothesis"), 3),
  "qnli": GlueTask(("question", "sentence"), 2),
  "qqp": GlueTask(("question1", "question2"), 2),
  "sst2": GlueTask(("sentence",), 2),
  "cola": GlueTask(("sentence",), 2),
  "mrpc": GlueTask(("sentence1", "sentence2"), 2),
  "rte": GlueTask(("sentence1", "sentence2"), 2),
  "stsb": GlueTask(("sentence1", "sentence2"), 1),
}


@dataclasses.dataclass
class LabelledTextStats:
  """What was read, skipped and cut, for one split.

  rows: rows read (file lines after the header, TFDS records, verses); blank lines not included.
  examples: examples kept.
  blank_lines: empty lines of a file, skipped.
  bad_rows: malformed rows (too few fields, invalid JSON, a missing field, a non-string text).
  empty_texts: rows with an empty or whitespace-only text field.
  bad_labels: rows whose label is missing, not a class id or name, negative, or not a number.
  non_utf8_lines: lines or records with bytes that are not UTF-8 (decoded as U+FFFD).
  left_out: examples left out by `config.input.max_train_examples`.
  truncated: examples cut to fit `config.input.max_length`.
  longest: the most tokens of any example before cutting, with its special tokens.
  """

  rows: int = 0
  examples: int = 0
  blank_lines: int = 0
  bad_rows: int = 0
  empty_texts: int = 0
  bad_labels: int = 0
  non_utf8_lines: int = 0
  left_out: int = 0
  truncated: int = 0
  longest: int = 0


def summarize(stats: LabelledTextStats) -> str:
  """One line for logs."""
  return (
    f"{stats.rows} rows -> {stats.examples} examples; skipped {stats.bad_rows} malformed rows, "
    f"{stats.empty_texts} empty texts, {stats.bad_labels} bad labels, {stats.blank_lines} blank "
    f"lines; {stats.non_utf8_lines} lines with invalid UTF-8 replaced; {stats.left_out} left out "
    f"by max_train_examples; {stats.truncated} truncated (longest {stats.longest} tokens)"
  )


class _SkipLog:
  """Counts skipped rows in `stats`, logging the first `_LOG_FIRST` with where they are."""

  def __init__(self, name: str, stats: LabelledTextStats, fields: Sequence[str] = ()):
    self.name = name
    self.stats = stats
    self.fields = tuple(fields)  # the text fields, to name an empty one
    self.count = 0

  def skip(self, counter: str, where: str, why: str) -> None:
    setattr(self.stats, counter, getattr(self.stats, counter) + 1)
    self.count += 1
    if self.count <= _LOG_FIRST:
      logging.warning("Skipping %s: %s", where, why)

  def close(self) -> None:
    if self.count > _LOG_FIRST:
      logging.warning("%s: skipped %d rows in all", self.name, self.count)


# ---------------------------------------------------------------------------------------------
# Reading a split: texts, raw labels and where each row came from.


@dataclasses.dataclass
class RawExamples:
  """The rows of one split with non-empty texts, before their labels are checked.

  Attributes:
    name: the file or dataset, for messages.
    texts: the stripped text fields of every row.
    labels: the label of every row as the source gives it (str, int, float, bytes, numpy, None).
    origins: "file:line" or "dataset record i" of every row.
    class_names: the class names the source itself defines (TFDS ClassLabel, embedded genres),
      else None.
  """

  name: str
  texts: list[tuple[str, ...]] = dataclasses.field(default_factory=list)
  labels: list = dataclasses.field(default_factory=list)
  origins: list[str] = dataclasses.field(default_factory=list)
  class_names: tuple[str, ...] | None = None


def _text_fields(input_cfg) -> tuple[str, ...]:
  fields = input_cfg.get("text_fields") or DEFAULT_TEXT_FIELDS
  if isinstance(fields, str):  # "sentence1,sentence2" from a command line
    fields = fields.split(",")
  fields = tuple(str(f).strip() for f in fields)
  if not 1 <= len(fields) <= 2 or not all(fields):
    raise ValueError(
      f"config.input.text_fields={fields!r}: give one or two field names (a sentence, or a pair)"
    )
  return fields


def _label_field(input_cfg) -> str:
  return input_cfg.get("label_field") or DEFAULT_LABEL_FIELD


def _wanted_fields(fields: Sequence[str], label_field: str) -> list[tuple[str, str]]:
  """(field, the config field that names it) of every field a row needs."""
  return [(f, "config.input.text_fields") for f in fields] + [
    (label_field, "config.input.label_field")
  ]


def _add_row(raw: RawExamples, texts, label, where: str, skips: _SkipLog) -> None:
  """Appends a row unless one of its texts is empty (counted in `empty_texts`)."""
  stripped = tuple(t.strip() for t in texts)
  for field, value in zip(skips.fields, stripped):
    if not value:
      skips.skip("empty_texts", where, f"empty text in {field!r}")
      return
  raw.texts.append(stripped)
  raw.labels.append(label)
  raw.origins.append(where)


def read_embedded(split: str, stats: LabelledTextStats) -> RawExamples:
  """The verses of one split of the embedded corpus, labelled with their genre."""
  if split not in text_sources.EMBEDDED_SPLITS:
    raise ValueError(
      f"config.input.split={split!r} (or the eval split) is not a split of the embedded text "
      f"corpus: {text_sources.EMBEDDED_SPLITS}"
    )
  data = text_corpus.load_embedded_probe_set(split)
  name = f"embedded King James Bible verses (split={split})"
  raw = RawExamples(name, class_names=tuple(data.class_names))
  skips = _SkipLog(name, stats, ("verse",))
  for i, (verse, label) in enumerate(zip(data.texts, data.labels.tolist())):
    stats.rows += 1
    _add_row(raw, (verse,), label, f"{name} verse {i}", skips)
  skips.close()
  return raw


def _split_file(input_cfg, split: str, suffix: str) -> Path:
  folder = Path(input_cfg.path)
  if not input_cfg.path or not folder.is_dir():
    raise FileNotFoundError(
      f"config.input.path={input_cfg.path!r} must be a folder holding <split>{suffix} files "
      f"(source={input_cfg.source!r})"
    )
  path = folder / f"{split}{suffix}"
  if not path.is_file():
    present = sorted(p.name for p in folder.glob(f"*{suffix}"))
    raise FileNotFoundError(
      f"{path} not found (config.input.path={input_cfg.path!r}, split {split!r}); the folder "
      f"has {present}"
    )
  return path


def _decoded_lines(path: Path, stats: LabelledTextStats) -> Iterator[tuple[int, str]]:
  """(line number, text without its line end) of every line; bad UTF-8 bytes become U+FFFD."""
  with path.open("rb") as f:
    for number, data in enumerate(f, start=1):
      line, replaced = text_sources.decode(data.rstrip(b"\r\n"))
      stats.non_utf8_lines += replaced
      yield number, line


def read_tsv(path: Path, fields: Sequence[str], label_field: str, stats: LabelledTextStats):
  """The rows of a tab-separated file with a header (GLUE's layout); see the module docstring.

  Raises:
    ValueError: the file is empty, or its header lacks a text or label column.
  """
  skips = _SkipLog(str(path), stats, fields)
  raw = RawExamples(str(path))
  lines = _decoded_lines(path, stats)
  first = next(lines, None)
  if first is None:
    raise ValueError(f"{path} is empty: a TSV file starts with a header row naming its columns")
  header = first[1].lstrip("\ufeff").split("\t")  # a byte-order mark would stick to column 1
  for field, what in _wanted_fields(fields, label_field):
    if field not in header:
      raise ValueError(f"{path}: no column {field!r} ({what}); the header has columns {header}")
  columns = [header.index(field) for field in (*fields, label_field)]
  needed = max(columns) + 1
  for number, line in lines:
    where = f"{path}:{number}"
    if not line.strip():
      stats.blank_lines += 1
      continue
    stats.rows += 1
    cells = line.split("\t")
    if len(cells) < needed:
      skips.skip("bad_rows", where, f"{len(cells)} fields, the header has {len(header)}")
      continue
    _add_row(raw, [cells[c] for c in columns[:-1]], cells[columns[-1]], where, skips)
  skips.close()
  _warn_non_utf8(path, stats)
  return raw


def read_jsonl(path: Path, fields: Sequence[str], label_field: str, stats: LabelledTextStats):
  """The rows of a file of JSON objects, one a line.

  Raises:
    ValueError: the first object lacks a text or label field (a config error, not a bad row).
  """
  skips = _SkipLog(str(path), stats, fields)
  raw = RawExamples(str(path))
  checked = False
  for number, line in _decoded_lines(path, stats):
    where = f"{path}:{number}"
    if not line.strip():
      stats.blank_lines += 1
      continue
    stats.rows += 1
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      skips.skip("bad_rows", where, f"invalid JSON ({e})")
      continue
    if not isinstance(record, dict):
      skips.skip("bad_rows", where, f"a JSON {type(record).__name__}, not an object")
      continue
    missing = [(f, what) for f, what in _wanted_fields(fields, label_field) if f not in record]
    if missing and not checked:  # the first object tells a config error from a bad row
      field, what = missing[0]
      raise ValueError(f"{where}: no field {field!r} ({what}); the object has {list(record)}")
    checked = True
    if missing:
      skips.skip("bad_rows", where, f"no field {missing[0][0]!r}")
      continue
    values = [record[f] for f in fields]
    wrong = [(f, v) for f, v in zip(fields, values) if v is not None and not isinstance(v, str)]
    if wrong:
      skips.skip("bad_rows", where, f"{wrong[0][0]!r} is a {type(wrong[0][1]).__name__}, not text")
      continue
    _add_row(raw, [v or "" for v in values], record[label_field], where, skips)
  skips.close()
  _warn_non_utf8(path, stats)
  return raw


def _warn_non_utf8(path, stats: LabelledTextStats) -> None:
  if stats.non_utf8_lines:
    logging.warning(
      "%s: %d lines had bytes that are not UTF-8 (decoded as U+FFFD)", path, stats.non_utf8_lines
    )


def read_tfds(
  name: str,
  split: str,
  data_dir: str | None,
  fields: Sequence[str],
  label_field: str,
  stats: LabelledTextStats,
) -> RawExamples:
  """Every record of a TFDS split prepared as ArrayRecord (e.g. `glue/sst2`), without TensorFlow.

  Text features may come as bytes or str. Class names come from a ClassLabel label feature.

  Raises:
    FileNotFoundError: no such dataset, or no such data_dir.
    ValueError: a missing feature, an unknown split, or a split whose labels are hidden (-1).
  """
  import tensorflow_datasets as tfds  # slow import; only this source needs it

  if data_dir and not Path(data_dir).is_dir():
    raise FileNotFoundError(f"TFDS data_dir {data_dir} not found (config.input.tfds_data_dir)")
  title = f"tfds {name} (split={split})"
  try:
    data = tfds.data_source(name, split=split, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise FileNotFoundError(
      f"TFDS dataset {name!r} (config.input.path) not found in "
      f"{data_dir or 'the default TFDS data dir'} (config.input.tfds_data_dir)"
    ) from e
  except (KeyError, ValueError) as e:  # an unknown split
    raise ValueError(f"{title}: cannot read the split ({e}; config.input.split)") from e
  features = data.dataset_info.features
  for field, what in _wanted_fields(fields, label_field):
    if field not in features:
      raise ValueError(f"{title}: no {field!r} feature ({what}); it has {list(features.keys())}")
  label_info = features[label_field]
  class_label = isinstance(label_info, tfds.features.ClassLabel)
  raw = RawExamples(title, class_names=tuple(label_info.names) if class_label else None)
  skips = _SkipLog(title, stats, fields)
  for index in range(len(data)):
    record = data[index]
    stats.rows += 1
    texts = []
    for field in fields:
      value, replaced = text_sources.decode(record[field])
      stats.non_utf8_lines += replaced
      texts.append(value)
    label = record[label_field]
    if class_label and int(label) < 0:
      raise ValueError(
        f"{title} record {index}: label {int(label)}: this split's labels are hidden (GLUE "
        "scores its test sets on its server); evaluate on a validation split instead"
      )
    _add_row(raw, texts, label, f"{title} record {index}", skips)
    if (index + 1) % _LOG_EVERY == 0:
      logging.info("%s: read %d of %d records", title, index + 1, len(data))
  skips.close()
  _warn_non_utf8(title, stats)
  return raw


def read_split(input_cfg, split: str, stats: LabelledTextStats) -> RawExamples:
  """The rows of `split` of the source `config.input` names (see the module docstring)."""
  kind = input_cfg.source
  if kind not in SOURCES:
    raise ValueError(f"Unknown config.input.source {kind!r} for labelled text: {SOURCES}")
  if kind == "embedded":
    if input_cfg.get("path"):
      raise ValueError(
        f"config.input.path={input_cfg.path!r} is not used by source='embedded' (the King James "
        "Bible verses): leave it empty, or use source=tsv, jsonl or tfds"
      )
    return read_embedded(split, stats)
  fields, label_field = _text_fields(input_cfg), _label_field(input_cfg)
  if kind == "tfds":
    if not input_cfg.get("path"):
      raise ValueError("config.input.path is required for source='tfds' (e.g. 'glue/sst2')")
    data_dir = input_cfg.get("tfds_data_dir") or None
    return read_tfds(input_cfg.path, split, data_dir, fields, label_field, stats)
  reader = read_tsv if kind == "tsv" else read_jsonl
  return reader(_split_file(input_cfg, split, f".{kind}"), fields, label_field, stats)


# ---------------------------------------------------------------------------------------------
# Labels.


def task_kind(config) -> str:
  """The task kind, classify or regress, from `config.head.task` (classify without a head)."""
  head = config.get("head")
  kind = (head.get("task") if head is not None else None) or "classify"
  if kind not in TASK_KINDS:
    raise ValueError(f"config.head.task={kind!r}: labelled text supports {TASK_KINDS}")
  return kind


def _scalar(value):
  """A source's label as a Python str / int / float / None (bytes decoded, numpy unwrapped)."""
  if isinstance(value, np.ndarray) and value.shape == ():
    value = value.item()
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, bytes):
    value = text_sources.decode(value)[0]
  return value


def class_label(value) -> int | str | None:
  """A label as a class id (int), a name or an integer string (str), or None if it is neither.

  None for: empty, null, booleans, fractions, lists, objects. Integral floats (JSON `1.0`) are ids.
  """
  value = _scalar(value)
  if value is None or isinstance(value, bool):
    return None
  if isinstance(value, int):
    return value
  if isinstance(value, float):
    return int(value) if value.is_integer() else None
  if isinstance(value, str):
    return value.strip() or None
  return None


def regression_target(value) -> float | None:
  """A label as a finite float, or None (empty, not a number, NaN or infinite)."""
  value = _scalar(value)
  if value is None or isinstance(value, bool) or not isinstance(value, int | float | str):
    return None
  try:
    target = float(value)
  except ValueError:
    return None
  return target if math.isfinite(target) else None


def _is_integer_string(label) -> bool:
  return isinstance(label, str) and _INTEGER.fullmatch(label) is not None


def infer_class_names(raw: RawExamples) -> tuple[str, ...]:
  """The classes of a file whose labels have no names given: its names, or its ids' range.

  Raises:
    ValueError: the labels mix class ids and names, or there is no usable label.
  """
  ids, names = {}, {}  # label -> first row with it
  for value, where in zip(raw.labels, raw.origins):
    label = class_label(value)
    if isinstance(label, int) or _is_integer_string(label):
      ids.setdefault(int(label), where)
    elif label is not None:
      names.setdefault(label, where)
  if ids and names:
    (name, name_at), (number, number_at) = next(iter(names.items())), next(iter(ids.items()))
    raise ValueError(
      f"{raw.name}: labels mix class names ({name!r} at {name_at}) and ids ({number} at "
      f"{number_at}): list the classes in config.input.label_names"
    )
  if names:
    return tuple(sorted(names))
  valid = [i for i in ids if i >= 0]
  if not valid:
    raise ValueError(
      f"{raw.name}: no usable class label in its rows (config.input.label_field); "
      "the labels must be class ids or names"
    )
  return tuple(str(i) for i in range(max(valid) + 1))


def class_names_for(input_cfg, raw: RawExamples, train: RawExamples | None = None):
  """The class names of a classification task (precedence in the module docstring).

  Args:
    input_cfg: `config.input` (reads `label_names`).
    raw: the split being read.
    train: the train split, for files whose names come from their labels (default: `raw`).
  """
  given = tuple(input_cfg.get("label_names") or ())
  if raw.class_names is not None:
    if given and given != raw.class_names:
      raise ValueError(
        f"config.input.label_names={given} differ from the classes of {raw.name}: "
        f"{raw.class_names} (leave label_names empty for this source)"
      )
    return raw.class_names
  if given:
    if len(set(given)) != len(given):
      raise ValueError(f"config.input.label_names={given} has repeated names")
    return given
  return infer_class_names(train if train is not None else raw)


def encode_labels(
  raw: RawExamples, kind: str, class_names: tuple[str, ...], stats: LabelledTextStats
) -> tuple[np.ndarray, np.ndarray]:
  """(int64[n] rows with a usable label, int32[n] class ids or float32[n] targets).

  Rows with a bad label are skipped and counted (`bad_labels`).

  Raises:
    ValueError: a classification label that is not one of `class_names` (naming its row), or a
      regression split whose labels are all -1 (hidden GLUE test labels).
  """
  skips = _SkipLog(raw.name, stats)
  rows, labels = [], []
  if kind == "regress":
    for row, (value, where) in enumerate(zip(raw.labels, raw.origins)):
      target = regression_target(value)
      if target is None:
        skips.skip("bad_labels", where, f"label {value!r} is not a finite number")
        continue
      rows.append(row)
      labels.append(target)
    skips.close()
    if labels and all(t == -1 for t in labels):
      raise ValueError(
        f"{raw.name}: every label is -1: this split's labels are hidden (GLUE test sets); "
        "evaluate on a validation split instead"
      )
    return np.asarray(rows, np.int64), np.asarray(labels, np.float32)

  ids = {name: i for i, name in enumerate(class_names)}
  for row, (value, where) in enumerate(zip(raw.labels, raw.origins)):
    label = class_label(value)
    if label is None:
      skips.skip("bad_labels", where, f"label {value!r} is not a class id or name")
      continue
    if isinstance(label, str) and label in ids:
      index = ids[label]
    elif isinstance(label, int) or _is_integer_string(label):
      index = int(label)
      if index < 0:
        skips.skip("bad_labels", where, f"negative label {index}")
        continue
      if index >= len(class_names):
        raise ValueError(
          f"{where}: label {index} is not a class id in [0, {len(class_names)}) (classes "
          f"{class_names})"
        )
    else:
      raise ValueError(f"{where}: unknown label {label!r}; the classes are {class_names}")
    rows.append(row)
    labels.append(index)
  skips.close()
  return np.asarray(rows, np.int64), np.asarray(labels, np.int32)


# ---------------------------------------------------------------------------------------------
# Tokens: truncation and rows.


def truncate_pair(len_a: np.ndarray, len_b: np.ndarray, budget: int) -> tuple[np.ndarray, ...]:
  """Kept lengths of two fields cut to `budget` tokens together, HF's `longest_first`.

  Equals removing one token at a time from the longer field (the second when they tie) until
  the pair fits: first the difference is taken from the longer one, then the rest is split,
  the second field losing the odd token.
  """
  len_a, len_b = np.asarray(len_a, np.int64), np.asarray(len_b, np.int64)
  excess = np.maximum(len_a + len_b - budget, 0)
  from_longer = np.minimum(np.abs(len_a - len_b), excess)
  rest = excess - from_longer
  a_longer = len_a > len_b
  cut_a = np.where(a_longer, from_longer, 0) + rest // 2
  cut_b = np.where(a_longer, 0, from_longer) + rest - rest // 2
  return len_a - cut_a, len_b - cut_b


def content_budget(max_length: int, num_fields: int) -> int:
  """Text tokens that fit in a row of L: L - 2 for one field, L - 4 for a pair."""
  budget = max_length - 2 * num_fields
  if budget < 1:
    raise ValueError(
      f"config.input.max_length={max_length} leaves no room for text with {num_fields} field(s) "
      f"(needs at least {2 * num_fields + 1})"
    )
  return budget


@dataclasses.dataclass(frozen=True)
class EncodedTexts:
  """Token ids of every example, field by field, with the lengths kept after truncation."""

  streams: tuple[np.ndarray, ...]  # one int32[T_f] per field: the ids of every example, in order
  starts: np.ndarray  # int64[N, F] where each example's field starts in its stream
  lengths: np.ndarray  # int64[N, F] tokens kept (the field's first tokens)

  def __len__(self) -> int:
    return len(self.starts)


def encode_texts(
  texts: Sequence[tuple[str, ...]], tokenizer: text.Tokenizer, max_length: int
) -> tuple[EncodedTexts, np.ndarray]:
  """Tokenizes every field of every example and truncates each example to fit L.

  Returns:
    (the encoded examples; int64[N] tokens of every example before truncation, specials included).
  """
  num_fields = len(texts[0])
  budget = content_budget(max_length, num_fields)
  streams, starts, full = [], [], []
  for field in range(num_fields):
    lengths, stream = text.tokenize([t[field] for t in texts], tokenizer)
    streams.append(stream)
    starts.append(np.cumsum(lengths) - lengths)
    full.append(lengths)
  if num_fields == 1:
    kept = [np.minimum(full[0], budget)]
  else:
    kept = list(truncate_pair(full[0], full[1], budget))
  encoded = EncodedTexts(tuple(streams), np.stack(starts, 1), np.stack(kept, 1))
  return encoded, np.sum(full, axis=0) + 2 * num_fields


def assemble_rows(
  encoded: EncodedTexts, examples: np.ndarray, max_length: int
) -> dict[str, np.ndarray]:
  """Rows `<s> a </s>` or `<s> a </s> </s> b </s>`, then <pad>, one per example index.

  Returns:
    {"tokens": int32[b, L], "padding_mask": bool[b, L] (True at <pad>)}.
  """
  tokens = np.full((len(examples), max_length), PAD, np.int32)  # [b, L]
  used = np.zeros(len(examples), np.int64)  # [b] tokens in each row
  for row, example in enumerate(examples):
    pos = 0
    for field, stream in enumerate(encoded.streams):
      start, n = encoded.starts[example, field], encoded.lengths[example, field]
      tokens[row, pos] = BOS if field == 0 else EOS  # fairseq's separator is a second </s>
      tokens[row, pos + 1 : pos + 1 + n] = stream[start : start + n]
      tokens[row, pos + 1 + n] = EOS
      pos += n + 2
    used[row] = pos
  padding_mask = np.arange(max_length)[None, :] >= used[:, None]  # [b, L]
  return {"tokens": tokens, "padding_mask": padding_mask}


# ---------------------------------------------------------------------------------------------
# Labelled examples of one split.


@dataclasses.dataclass(frozen=True)
class LabelledTexts:
  """One split, encoded: rows are `encoded` examples with `labels` (class ids or targets)."""

  name: str
  encoded: EncodedTexts
  labels: np.ndarray  # int32[N] class ids, or float32[N] targets
  origins: tuple[str, ...]  # file:line or record of every example
  task_kind: str
  class_names: tuple[str, ...]  # () for regression
  stats: LabelledTextStats

  @property
  def num_classes(self) -> int:
    """Outputs of the head: the classes, or 1 for regression."""
    return len(self.class_names) if self.task_kind == "classify" else 1

  @property
  def label_key(self) -> str:
    return "label" if self.task_kind == "classify" else "target"

  def __len__(self) -> int:
    return len(self.labels)

  def batch(self, examples: np.ndarray, max_length: int) -> dict[str, np.ndarray]:
    """The rows of some examples: tokens, padding_mask and the label (or target)."""
    return labelled_rows(self.encoded, self.labels, self.label_key, examples, max_length)


def labelled_rows(
  encoded: EncodedTexts, labels: np.ndarray, label_key: str, examples: np.ndarray, max_length: int
) -> dict[str, np.ndarray]:
  """`assemble_rows` of some examples, with their labels under `label_key` ([b])."""
  rows = assemble_rows(encoded, examples, max_length)
  rows[label_key] = labels[examples]
  return rows


def _max_length(input_cfg) -> int:
  max_length = int(input_cfg.max_length)
  if max_length < 3:
    raise ValueError(
      f"config.input.max_length={input_cfg.max_length} must be at least 3 (<s>, a token, </s>)"
    )
  return max_length


def _subset(labels: np.ndarray, kind: str, limit: int) -> np.ndarray:
  """Sorted indices of about `limit` examples: class-stratified, or uniform for regression."""
  if kind == "classify":
    return batching.stratified_subset(labels, limit, seed=0)
  return np.sort(np.random.default_rng(0).choice(len(labels), limit, replace=False))


def load_labelled_texts(
  config,
  split: str,
  tokenizer: text.Tokenizer,
  *,
  class_names: tuple[str, ...] | None = None,
  max_examples: int = 0,
) -> LabelledTexts:
  """Reads, labels and encodes one split (the steps of the module docstring).

  Args:
    config: the config (`config.input`, and `config.head.task`).
    split: the split to read.
    tokenizer: the tokenizer.
    class_names: the classes, e.g. the training set's; None derives them (for files whose names
      come from their labels, by reading the labels of the train split `config.input.split`).
    max_examples: > 0 keeps a subset of about that many examples (see `_subset`).

  Raises:
    ValueError: bad config values, unknown labels, or a split without a usable example.
    FileNotFoundError: the file, folder or dataset does not exist.
  """
  input_cfg = config.input
  kind = task_kind(config)
  max_length = _max_length(input_cfg)
  if kind == "regress" and input_cfg.source == "embedded":
    raise ValueError(
      "config.head.task='regress' needs real-valued labels; the embedded verses have classes "
      "(config.input.source='embedded')"
    )
  stats = LabelledTextStats()
  raw = read_split(input_cfg, split, stats)
  if kind == "regress":
    class_names = ()
  elif class_names is None:
    train = None
    needs_train = raw.class_names is None and not input_cfg.get("label_names")
    if needs_train and split != input_cfg.split:  # names from the train split's labels
      train = read_split(input_cfg, input_cfg.split, LabelledTextStats())
    class_names = class_names_for(input_cfg, raw, train)
  rows, labels = encode_labels(raw, kind, tuple(class_names), stats)
  if max_examples > 0 and max_examples < len(rows):
    keep = _subset(labels, kind, max_examples)
    stats.left_out = len(rows) - len(keep)
    rows, labels = rows[keep], labels[keep]
  if not len(rows):
    raise ValueError(f"{raw.name} has no usable example: {summarize(stats)}")
  encoded, full = encode_texts([raw.texts[r] for r in rows], tokenizer, max_length)
  stats.examples = len(rows)
  stats.truncated = int((full > max_length).sum())
  stats.longest = int(full.max())
  if stats.truncated:
    logging.warning(
      "%s: %d of %d examples cut to config.input.max_length=%d (the longest has %d tokens)",
      raw.name,
      stats.truncated,
      len(rows),
      max_length,
      stats.longest,
    )
  origins = tuple(raw.origins[r] for r in rows)
  data = LabelledTexts(raw.name, encoded, labels, origins, kind, tuple(class_names), stats)
  _log_summary(data)
  return data


def _log_summary(data: LabelledTexts) -> None:
  if data.task_kind == "classify":
    counts = np.bincount(data.labels, minlength=data.num_classes)
    labels = ", ".join(f"{n}: {c}" for n, c in zip(data.class_names, counts.tolist()))
    if data.num_classes < 2:
      logging.warning("%s: a single class %s", data.name, data.class_names)
  else:
    labels = f"targets in [{data.labels.min():.3g}, {data.labels.max():.3g}]"
  logging.info("%s: %s; %s", data.name, summarize(data.stats), labels)


# ---------------------------------------------------------------------------------------------
# Training.


class LoadLabelledBatch(grain.transforms.Map):
  """Global batch index -> this process's rows of that batch. Module level and picklable.

  Holds the token ids and labels only (not the examples' origins), for grain workers.
  """

  def __init__(self, data: LabelledTexts, plan: batching.EpochPlan, rows: slice, max_length: int):
    self.encoded = data.encoded
    self.labels = data.labels
    self.label_key = data.label_key
    self.plan = plan
    self.rows = rows
    self.max_length = max_length

  def map(self, element: int) -> dict[str, np.ndarray]:
    _, examples = self.plan.batch(element)
    examples = examples[self.rows]  # [b]
    return labelled_rows(self.encoded, self.labels, self.label_key, examples, self.max_length)


@dataclasses.dataclass(frozen=True)
class TextFinetuneDataset:
  """The fine-tuning input: iterate it for batches; checkpoint the iterator with orbax.

  Attributes:
    batches: random access, global batch index (across epochs) -> this process's batch.
    iter_dataset: `batches` as an (infinite) grain IterDataset; `iter()` of it is a
      `grain.DatasetIterator` whose `get_state()`/`set_state()` resume exactly.
    data: the encoded training examples (labels, origins, stats).
    batches_per_epoch: global batches per pass over the examples.
    max_length: L, the length of every row.
    tokenizer: the tokenizer used.
  """

  batches: grain.MapDataset
  iter_dataset: grain.IterDataset
  data: LabelledTexts
  batches_per_epoch: int
  max_length: int
  tokenizer: text.Tokenizer

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.iter_dataset)

  @property
  def stats(self) -> LabelledTextStats:
    return self.data.stats

  @property
  def num_examples(self) -> int:
    return len(self.data)

  @property
  def num_classes(self) -> int:
    """Head outputs: the classes, or 1 for regression."""
    return self.data.num_classes

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.data.class_names

  @property
  def task_kind(self) -> str:
    return self.data.task_kind


def make_text_finetune_dataset(
  config,
  *,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  tokenizer: text.Tokenizer | None = None,
) -> TextFinetuneDataset:
  """The fine-tuning training pipeline that `config.input` describes.

  Args:
    config: the config; `config.head.task` is classify | regress, and `config.input` has
      source: embedded | tsv | jsonl | tfds;
      path: the folder of `<split>.tsv` / `.jsonl` files, or the TFDS name (empty for embedded);
      split: the training split (embedded: train | test | all);
      text_fields: one or two text columns / fields / features (default ("sentence",));
      label_field: the label column / field / feature (default "label");
      label_names: class names, for files whose labels are names (optional);
      tfds_data_dir: where TFDS finds the prepared dataset ("" for its default);
      tokenizer: a tokenizer directory, or "" for the embedded one (unused if `tokenizer` given);
      max_length: L, tokens per row with the special tokens;
      batch_size: the global batch (rows);
      max_train_examples: > 0 trains on a fixed subset of about that many examples (default 0);
      num_workers: grain worker processes (0: threads in this process).
    seed: data seed (non-negative), the same on every process.
    process_index: this process (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).
    tokenizer: the tokenizer to use instead of loading `config.input.tokenizer`.

  Returns:
    The dataset; `iter()` of it yields this process's `batch_size // process_count` rows of
    every global batch.

  Raises:
    ValueError: bad config values or labels, no usable example, or fewer examples than one batch.
    FileNotFoundError: the files, dataset or tokenizer directory do not exist.
  """
  input_cfg = config.input
  batch_size = input_cfg.batch_size
  rows = batching.process_rows(batch_size, process_index, process_count)
  limit = int(input_cfg.get("max_train_examples", 0) or 0)
  if limit < 0:
    raise ValueError(f"config.input.max_train_examples={limit} must be >= 0 (0: all)")
  if tokenizer is None:
    tokenizer = text.load_tokenizer_for(input_cfg)
  max_length = _max_length(input_cfg)
  data = load_labelled_texts(config, input_cfg.split, tokenizer, max_examples=limit)
  plan = batching.EpochPlan(len(data), batch_size, seed)
  logging.info(
    "%s: %d examples -> %d global batches of %d per epoch",
    data.name,
    len(data),
    plan.batches_per_epoch,
    batch_size,
  )
  if plan.batches_per_epoch == 0:
    raise ValueError(
      f"{data.name} has {len(data)} examples, fewer than one global batch of {batch_size}: "
      "lower config.input.batch_size"
    )
  batches, iter_dataset = batching.endless_batches(
    LoadLabelledBatch(data, plan, rows, max_length),
    num_workers=input_cfg.get("num_workers", 0),
    read_threads=_READ_THREADS,
    prefetch=_PREFETCH_BATCHES,
  )
  return TextFinetuneDataset(
    batches, iter_dataset, data, plan.batches_per_epoch, max_length, tokenizer
  )


# ---------------------------------------------------------------------------------------------
# Evaluation.


@dataclasses.dataclass(frozen=True)
class TextEvalSet:
  """Every example of an evaluation split once, in full-size batches (see `batches`).

  Attributes:
    data: the encoded examples (labels in source order, origins, stats).
    batch_size: rows of every batch.
    max_length: L.
  """

  data: LabelledTexts
  batch_size: int
  max_length: int

  @property
  def num_examples(self) -> int:
    return len(self.data)

  @property
  def num_batches(self) -> int:
    return -(-len(self.data) // self.batch_size)

  @property
  def labels(self) -> np.ndarray:
    """int32[N] class ids or float32[N] targets, in the order the batches give the examples."""
    return self.data.labels

  @property
  def stats(self) -> LabelledTextStats:
    return self.data.stats

  @property
  def num_classes(self) -> int:
    return self.data.num_classes

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.data.class_names

  @property
  def task_kind(self) -> str:
    return self.data.task_kind

  def batches(self) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `batch_size` rows: the training keys plus `example_mask` bool[b].

    Example k is row k % batch_size of batch k // batch_size. The rows past the last example
    repeat the first example of the last batch, with `example_mask` False.
    """
    for start in range(0, len(self.data), self.batch_size):
      index = np.arange(start, start + self.batch_size)  # [b]
      real = index < len(self.data)
      batch = self.data.batch(np.where(real, index, start), self.max_length)
      batch["example_mask"] = real
      yield batch


def text_eval_batches(
  config,
  split: str,
  *,
  tokenizer: text.Tokenizer | None = None,
  class_names: tuple[str, ...] | None = None,
) -> TextEvalSet:
  """The evaluation set of `split` (e.g. "validation", or "test" for the embedded verses).

  Args:
    config: the config, as for `make_text_finetune_dataset`; batches have
      `config.input.eval_batch_size` rows (default `config.input.batch_size`).
    split: the split to evaluate.
    tokenizer: the tokenizer to use instead of loading `config.input.tokenizer`.
    class_names: the training set's classes (`dataset.class_names`); None derives them (for
      files named by their labels, from the train split `config.input.split`).

  Returns:
    The set; every process that calls this gets all of it.

  Raises:
    ValueError: bad config values, an unknown or hidden label, or no usable example.
    FileNotFoundError: the files, dataset or tokenizer directory do not exist.
  """
  input_cfg = config.input
  batch_size = int(input_cfg.get("eval_batch_size", 0) or input_cfg.batch_size)
  if batch_size <= 0:
    raise ValueError(f"config.input.eval_batch_size={batch_size} must be positive")
  if tokenizer is None:
    tokenizer = text.load_tokenizer_for(input_cfg)
  data = load_labelled_texts(config, split, tokenizer, class_names=class_names)
  return TextEvalSet(data, batch_size, _max_length(input_cfg))
