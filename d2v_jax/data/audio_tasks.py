"""Labelled speech for fine-tuning (spec §1.6 "Audio CTC"): CTC transcripts and audio classes.

Two tasks, chosen by `config.head.task`:
  ctc       `{"audio": f32[b, T], "padding_mask": bool[b, T], "labels": int32[b, S],
            "label_padding": bool[b, S]}`: the transcript as fairseq letter ids
            ("H E L L O | W O R L D |", `ctc.LetterVocabulary`), right-padded to the static
            S = `config.input.max_label_length`;
  classify  `{"audio", "padding_mask", "label": int32[b]}`: the index of the class name.
`padding_mask` is True at PADDED samples (the fairseq convention, as in pretraining).

No cropping: a transcript must describe all of its audio, so every utterance is zero-padded whole
to the smallest of `config.input.pad_lengths` that holds it (one compiled step per pad length).
Longer utterances, transcripts longer than S, and labels the training vocabulary lacks are skipped,
counted in `stats` and logged with their file (fairseq's `max_sample_size` filter does the same).
With `config.input.normalize` each utterance is normalised over its valid samples exactly as in
pretraining (`audio.normalize_utterance`); the padding stays 0.

Training batches reuse the pretraining plan (`audio.BatchPlan`): a shuffle per epoch seeded from
`(seed, epoch)`, one pad length per batch, each bucket's remainder dropped, so a batch is a pure
function of its index and a grain iterator restored with `set_state` continues exactly.

Evaluation (`audio_eval_batches`) is finite and deterministic: the examples in source order,
grouped by pad length, every group cut into full batches whose last one is filled by repeating
its first example (`example_mask` False there). Every batch carries `example_index`, the position
of its rows in `AudioEvalSet.transcripts` / `labels`. In a multi-process run every process
evaluates the whole set (it is small); do not sum its counts over processes.

Sources (`config.input.source`):
  embedded  `data/speech`: the sentence clips and their transcripts (ctc), or the word clips and
            their words (classify), split "train" or "test";
  manifest  fairseq's layout: `config.input.path` is a directory with `<split>.tsv` (the root
            directory, then `relative/path<TAB>num_samples` rows) and, row for row, `<split>.ltr`
            (letter lines) or `<split>.wrd` (words) for ctc, `<split>.lbl` or `<split>.label`
            (one class name a line) for classify;
  tfds      a TFDS dataset as ArrayRecord, `config.input.path` its name (LibriSpeech: audio
            feature "speech", transcript feature "text"; a ClassLabel feature for classify).

The training vocabulary is `config.input.vocabulary` (a fairseq `dict.ltr.txt`) or, when that is
empty, every symbol of the letter lines of the training split `config.input.split` (all listed
rows, whether their audio is readable or not, so that an evaluation set built later gets the same
one). Class names are the sorted distinct training labels, or a TFDS ClassLabel's own names.
"""

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain
import numpy as np
from absl import logging

from d2v_jax import ctc
from d2v_jax.data import audio, batching, sources

TASKS = ("ctc", "classify")
_LETTER_SUFFIXES = (".ltr", ".wrd")  # fairseq's letter and word target files, in that preference
_CLASS_SUFFIXES = (".lbl", ".label")
_DEFAULT_MAX_LABEL_LENGTH = 512  # letters; a 30 s LibriSpeech utterance has about 500
_READ_THREADS = 4
_PREFETCH_BATCHES = 4
_EXAMPLES_LOGGED = 3  # skipped files named in a summary warning; each one is logged at INFO


@dataclasses.dataclass
class TaskStats(sources.AudioStats):
  """The source's counters plus the fine-tuning filters' (see `sources.AudioStats`)."""

  skipped_long: int = 0  # longer than the largest pad length
  skipped_long_label: int = 0  # ctc: more letters than max_label_length
  skipped_unknown_label: int = 0  # a letter or class the training vocabulary lacks


# ---------------------------------------------------------------------------------------------
# Labels: what each source record says, before encoding.


@dataclasses.dataclass
class LabelledSource:
  """An audio source and one label string per record of it.

  `labels[i]` is a fairseq letter line ("H I |") for ctc and a class name for classify.
  """

  source: sources.AudioSource
  labels: list[str]
  declared_classes: tuple[str, ...] | None = None  # a TFDS ClassLabel's names


def letters_to_words(letter_line: str) -> str:
  """The words of a letter line: "H I | T H E R E |" -> "HI THERE" (as `decode` writes them)."""
  text = "".join(letter_line.split()).replace(ctc.WORD_BOUNDARY, " ")
  return " ".join(text.split())


def _read_lines(path: Path) -> list[str]:
  """The lines of a text file, without their line ends (only "\\n" splits, unlike splitlines)."""
  try:
    lines = path.read_text(encoding="utf-8").split("\n")
  except UnicodeDecodeError as error:
    raise ValueError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason})") from error
  if lines and lines[-1] == "":
    lines.pop()  # the final newline ends the last line, it does not start another
  return [line.rstrip("\r") for line in lines]


def _kept_rows(listed: Sequence, kept: Sequence[str]) -> np.ndarray:
  """int[N]: for each path a file source kept, its row among the `listed` paths (in order)."""
  rows, row = [], 0
  for path in kept:
    while str(listed[row]) != path:
      row += 1
    rows.append(row)
    row += 1
  return np.asarray(rows, np.int64)


def _check_task(config) -> str:
  task = config.head.task if "head" in config else None
  if task not in TASKS:
    raise ValueError(f"config.head.task={task!r}: expected one of {TASKS}")
  return task


def _embedded_clips(input_cfg, task: str, split: str) -> list[sources.EmbeddedClip]:
  kind = "sentence" if task == "ctc" else "word"
  clips = sources.load_embedded_speech_index(split=split, kind=kind, root=input_cfg.path or None)
  if not clips:
    raise ValueError(
      f"The embedded speech set has no {kind} clips in split {split!r} (config.input.split or "
      "the evaluation split): it has 'train' and 'test'"
    )
  return clips


def _embedded_label(clip: sources.EmbeddedClip, task: str) -> str:
  return ctc.words_to_letters(clip.transcript) if task == "ctc" else clip.word


def _manifest_files(input_cfg, task: str, split: str) -> tuple[Path, Path]:
  """(`<split>.tsv`, its label file) in the manifest directory `config.input.path`."""
  folder = Path(input_cfg.path)
  if not folder.is_dir():
    raise FileNotFoundError(
      f"config.input.path={input_cfg.path!r}: not a directory (source=manifest wants the folder "
      "holding <split>.tsv and its label files)"
    )
  tsv = folder / f"{split}.tsv"
  if not tsv.is_file():
    raise FileNotFoundError(f"Audio manifest {tsv} not found (split {split!r})")
  suffixes = _LETTER_SUFFIXES if task == "ctc" else _CLASS_SUFFIXES
  for suffix in suffixes:
    if (label_file := folder / f"{split}{suffix}").is_file():
      return tsv, label_file
  names = " or ".join(f"{split}{s}" for s in suffixes)
  raise FileNotFoundError(f"No label file {names} beside {tsv} (needed for task {task!r})")


def _manifest_labels(label_file: Path, task: str) -> list[str]:
  """One label string per line of a fairseq target file."""
  lines = _read_lines(label_file)
  if label_file.suffix == ".ltr":
    return [" ".join(line.split()) for line in lines]
  if label_file.suffix == ".wrd":
    return [ctc.words_to_letters(line) for line in lines]
  labels = [line.strip() for line in lines]
  for line_number, label in enumerate(labels, 1):
    if not label:
      raise ValueError(f"{label_file}:{line_number}: empty class label")
  return labels


def _manifest_rows(tsv: Path) -> tuple[Path, list[str]]:
  """(root directory, relative paths) of a fairseq manifest."""
  lines = _read_lines(tsv)
  if not lines:
    raise ValueError(f"Audio manifest {tsv} is empty: expected a root directory line")
  return Path(lines[0].strip()), [line.split("\t")[0] for line in lines[1:] if line.strip()]


def _manifest_listed_labels(input_cfg, task: str, split: str):
  """(tsv, root, relative paths, label per row); the row counts must agree."""
  tsv, label_file = _manifest_files(input_cfg, task, split)
  root, rows = _manifest_rows(tsv)
  labels = _manifest_labels(label_file, task)
  if len(labels) != len(rows):
    raise ValueError(
      f"{tsv} lists {len(rows)} audio rows but {label_file} has {len(labels)} lines: a label "
      "file must have exactly one line per manifest row"
    )
  return tsv, root, rows, labels


def _tfds_label_feature(input_cfg, task: str) -> str:
  if task == "ctc":
    return input_cfg.get("tfds_text_feature", "text")
  return input_cfg.get("tfds_label_feature", "label")


def _tfds_value_to_label(value, feature, task: str) -> str:
  """A TFDS record's transcript (bytes) or class (ClassLabel int, or a string) as a label."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, bytes):
    value = value.decode("utf-8")
  if task == "ctc":
    return ctc.words_to_letters(str(value))
  names = getattr(feature, "names", None)
  return names[int(value)] if names else str(value).strip()


def _tfds_checked_feature(data, name: str, where: str, task: str):
  features = data.dataset_info.features
  if name not in features:
    field = "tfds_text_feature" if task == "ctc" else "tfds_label_feature"
    raise ValueError(
      f"{where}: no {name!r} feature (config.input.{field}); it has {list(features.keys())}"
    )
  return features[name]


def _tfds_labelled(input_cfg, task: str, split: str) -> LabelledSource:
  source = sources.TfdsAudioSource(
    input_cfg.path,
    split,
    input_cfg.sample_rate,
    data_dir=input_cfg.tfds_data_dir or None,
    feature=input_cfg.tfds_feature,
  )
  name = _tfds_label_feature(input_cfg, task)
  feature = _tfds_checked_feature(source.data, name, source.name, task)
  # A second read of the kept records: TfdsAudioSource's length scan keeps only the audio.
  labels = [
    _tfds_value_to_label(source.data[int(record)][name], feature, task) for record in source.records
  ]
  return LabelledSource(source, labels, tuple(getattr(feature, "names", ())) or None)


def load_labelled_split(input_cfg, task: str, split: str) -> LabelledSource:
  """The usable audio of `split` and the label string of each record.

  Raises:
    ValueError: an unknown source, a label file whose line count differs from its manifest's, a
      missing TFDS feature, or no usable audio.
    FileNotFoundError: a missing directory, manifest or label file.
  """
  kind, rate = input_cfg.source, input_cfg.sample_rate
  if kind == "embedded":
    clips = _embedded_clips(input_cfg, task, split)
    where = input_cfg.path or sources.EMBEDDED_SPEECH_DIR
    source = sources.AudioFileSource(
      f"embedded {where} (split={split}, {clips[0].kind}s)", [c.path for c in clips], rate
    )
    rows = _kept_rows([c.path for c in clips], source.paths)
    return LabelledSource(source, [_embedded_label(clips[r], task) for r in rows])
  if not input_cfg.path:
    raise ValueError(f"config.input.path is required for source={kind!r}")
  if kind == "manifest":
    tsv, root, rows, labels = _manifest_listed_labels(input_cfg, task, split)
    paths = [root / row for row in rows]
    source = sources.AudioFileSource(f"manifest {tsv}", paths, rate)
    return LabelledSource(source, [labels[r] for r in _kept_rows(paths, source.paths)])
  if kind == "tfds":
    return _tfds_labelled(input_cfg, task, split)
  raise ValueError(
    f"config.input.source={kind!r} has no labels for fine-tuning: embedded | manifest | tfds"
  )


def _train_labels(input_cfg, task: str) -> tuple[list[str], tuple[str, ...] | None]:
  """(label string of every listed row of the training split, declared class names or None).

  Reads labels only, no audio (except TFDS, whose records hold both), so an evaluation set
  rebuilds the training vocabulary cheaply and identically.
  """
  kind, split = input_cfg.source, input_cfg.split
  if kind == "embedded":
    return [_embedded_label(c, task) for c in _embedded_clips(input_cfg, task, split)], None
  if kind == "manifest":
    return _manifest_listed_labels(input_cfg, task, split)[3], None
  if kind == "tfds":
    import tensorflow_datasets as tfds  # slow import; only this source needs it

    data = tfds.data_source(input_cfg.path, split=split, data_dir=input_cfg.tfds_data_dir or None)
    name = _tfds_label_feature(input_cfg, task)
    feature = _tfds_checked_feature(data, name, f"tfds {input_cfg.path} (split={split})", task)
    declared = tuple(getattr(feature, "names", ())) or None
    if declared:
      return [], declared
    labels = []
    for index in range(len(data)):
      try:
        labels.append(_tfds_value_to_label(data[index][name], feature, task))
      except (RuntimeError, OSError, ValueError) as e:  # as TfdsAudioSource skips them
        logging.warning("Skipping unreadable record %d of tfds %s: %s", index, input_cfg.path, e)
    return labels, None
  raise ValueError(
    f"config.input.source={kind!r} has no labels for fine-tuning: embedded | manifest | tfds"
  )


def training_vocabulary(input_cfg) -> ctc.LetterVocabulary:
  """`config.input.vocabulary` (a fairseq dict.ltr.txt), or all symbols of the training labels."""
  path = input_cfg.get("vocabulary", "")
  if path:
    if not Path(path).is_file():
      raise FileNotFoundError(f"config.input.vocabulary={path!r}: no such file (dict.ltr.txt)")
    return ctc.LetterVocabulary.load(path)
  lines, _ = _train_labels(input_cfg, "ctc")
  # words_to_letters of a letter line's words is the letter line itself: no letter is lost.
  return ctc.LetterVocabulary.from_transcripts(letters_to_words(line) for line in lines)


def training_class_names(input_cfg) -> tuple[str, ...]:
  """The sorted distinct class labels of the training split (or a TFDS ClassLabel's names)."""
  labels, declared = _train_labels(input_cfg, "classify")
  names = declared or tuple(sorted(set(labels)))
  if len(names) < 2:
    raise ValueError(
      f"config.input.split={input_cfg.split!r} has {len(names)} distinct class labels "
      f"({list(names)}): classification needs at least 2"
    )
  return names


# ---------------------------------------------------------------------------------------------
# Encoding and filtering.


def assign_pad_buckets(lengths: np.ndarray, pad_lengths: tuple[int, ...]) -> np.ndarray:
  """int[N]: the smallest pad length >= each length; `len(pad_lengths)` if none holds it."""
  return np.searchsorted(pad_lengths, lengths, side="left")


class LetterLabels:
  """CTC targets of every source record, kept ragged (a dense [N, S] table can be large).

  `rows(records)` takes source record indices: int32[b, S] ids right-padded with 0.
  """

  def __init__(self, sequences: Sequence[np.ndarray], max_length: int, num_ids: int):
    self.max_length = max_length
    dtype = np.min_scalar_type(num_ids)  # uint8 for letters: grain workers get a pickled copy
    self.ids = np.concatenate([np.zeros(0, dtype), *[s.astype(dtype) for s in sequences]])
    self.offsets = np.cumsum([0, *[len(s) for s in sequences]])  # [N + 1]

  def rows(self, records: Sequence[int]) -> dict[str, np.ndarray]:
    labels = np.zeros((len(records), self.max_length), np.int32)  # [b, S], 0 = blank at padding
    num_labels = np.zeros(len(records), np.int64)  # [b]
    for row, record in enumerate(records):
      start, end = self.offsets[record], self.offsets[record + 1]
      labels[row, : end - start] = self.ids[start:end]
      num_labels[row] = end - start
    label_padding = np.arange(self.max_length)[None, :] >= num_labels[:, None]  # [b, S]
    return {"labels": labels, "label_padding": label_padding}


class ClassLabels:
  """The class index of every source record."""

  def __init__(self, classes: np.ndarray):
    self.classes = classes.astype(np.int32)  # [N]

  def rows(self, records: Sequence[int]) -> dict[str, np.ndarray]:
    return {"label": self.classes[np.asarray(records, np.int64)]}


# Why a `TaskStats` counter skips an utterance, for the summary warning.
_SKIP_REASONS = {
  "skipped_short": "shorter than config.input.min_length",
  "skipped_long": "longer than the largest of config.input.pad_lengths",
  "skipped_unknown_label": "with a letter or class outside the training vocabulary",
  "skipped_long_label": "with more letters than config.input.max_label_length",
}


class _Skips:
  """Counts skipped records in `TaskStats`, logs each, and warns once per reason at the end."""

  def __init__(self, source: sources.AudioSource):
    self.source = source
    self.names = {counter: [] for counter in _SKIP_REASONS}

  def __call__(self, counter: str, record: int, why: str) -> None:
    stats = self.source.stats
    setattr(stats, counter, getattr(stats, counter) + 1)
    name = self.source.describe(record)
    logging.info("Skipping %s: %s", name, why)
    self.names[counter].append(name)

  def warn(self) -> None:
    for counter, names in self.names.items():
      if names:
        shown = ", ".join(names[:_EXAMPLES_LOGGED]) + (", ..." * (len(names) > _EXAMPLES_LOGGED))
        logging.warning(
          "%s: skipped %d utterances %s: %s",
          self.source.name,
          len(names),
          _SKIP_REASONS[counter],
          shown,
        )


@dataclasses.dataclass(frozen=True)
class _Examples:
  """The usable records of a labelled source, their pad buckets and encoded labels."""

  records: np.ndarray  # int[U] source records in use, increasing
  buckets: np.ndarray  # int[N] pad-length index of every source record (clipped for unused ones)
  labels: LetterLabels | ClassLabels


def _select_examples(
  labelled: LabelledSource,
  task: str,
  input_cfg,
  pad_lengths: tuple[int, ...],
  vocabulary: ctc.LetterVocabulary | None,
  class_names: tuple[str, ...] | None,
) -> _Examples:
  """Encodes every label and drops (counting and logging) what cannot be batched."""
  source = labelled.source
  min_length = int(input_cfg.get("min_length", 0))
  max_label_length = _max_label_length(input_cfg) if task == "ctc" else 0
  buckets = assign_pad_buckets(source.lengths, pad_lengths)  # [N]
  class_index = {name: i for i, name in enumerate(class_names or ())}
  skip = _Skips(source)
  keep = []
  # Per source record, so that batches index labels by record; skipped records get no letters
  # (ctc) or class -1 (classify), which no batch plan ever reads.
  encoded = [np.zeros(0, np.int32)] * len(source) if task == "ctc" else [-1] * len(source)
  for record, label in enumerate(labelled.labels):
    length = int(source.lengths[record])
    if length < min_length:
      skip("skipped_short", record, f"{length} samples < min_length={min_length}")
      continue
    if buckets[record] == len(pad_lengths):
      skip("skipped_long", record, f"{length} samples > pad_lengths[-1]={pad_lengths[-1]}")
      continue
    if task == "ctc":
      try:
        ids = vocabulary.encode_letters(label)
      except ValueError as e:
        skip("skipped_unknown_label", record, str(e))
        continue
      if len(ids) > max_label_length:
        skip("skipped_long_label", record, f"{len(ids)} letters > {max_label_length}")
        continue
    else:
      if label not in class_index:
        skip("skipped_unknown_label", record, f"class {label!r} not in {list(class_names)}")
        continue
      ids = class_index[label]
    keep.append(record)
    encoded[record] = ids
  skip.warn()
  if not keep:
    raise ValueError(f"{source.name}: no utterance passes the filters ({source.stats})")
  if task == "ctc":
    labels = LetterLabels(encoded, max_label_length, len(vocabulary))
  else:
    labels = ClassLabels(np.asarray(encoded))
  clipped = np.minimum(buckets, len(pad_lengths) - 1)
  return _Examples(np.asarray(keep, np.int64), clipped, labels)


def _max_label_length(input_cfg) -> int:
  value = int(input_cfg.get("max_label_length", _DEFAULT_MAX_LABEL_LENGTH))
  if value <= 0:
    raise ValueError(f"config.input.max_label_length={value} must be positive")
  return value


def _pad_lengths(input_cfg) -> tuple[int, ...]:
  if "pad_lengths" not in input_cfg:
    raise ValueError("config.input.pad_lengths is required: the padded lengths T (samples)")
  pad_lengths = tuple(sorted(set(int(p) for p in input_cfg.pad_lengths)))
  if not pad_lengths or pad_lengths[0] <= 0:
    raise ValueError(f"config.input.pad_lengths must be positive, got {input_cfg.pad_lengths}")
  return pad_lengths


def _with_task_stats(source: sources.AudioSource) -> TaskStats:
  """Swaps the source's counters for `TaskStats` (same values), so decode failures land there."""
  source.stats = TaskStats(**dataclasses.asdict(source.stats))
  return source.stats


def _metadata(input_cfg, task: str, vocabulary, class_names):
  """(vocabulary, class names) of the task: given ones, or rebuilt from the training split."""
  if task == "ctc":
    return vocabulary or training_vocabulary(input_cfg), None
  return None, (tuple(class_names) if class_names else training_class_names(input_cfg))


def pad_utterance(wave: np.ndarray, length: int, normalize: bool, what: str) -> np.ndarray:
  """float32[length]: `wave` whole, zero-padded, normalised over its samples if `normalize`."""
  if len(wave) > length:  # the plan came from the header: the file changed since indexing
    raise RuntimeError(f"{what} decodes to {len(wave)} samples, more than its pad length {length}")
  padded = np.zeros(length, np.float32)
  padded[: len(wave)] = wave
  return audio.normalize_utterance(padded, len(wave)) if normalize else padded


# ---------------------------------------------------------------------------------------------
# Training.


class LoadLabelledBatch(audio.LoadBatch):
  """Global batch index -> this process's rows of it: padded audio and labels.

  Reuses the pretraining loader's plan walk and decode-failure substitution (`_read`); a
  substitute (the next record of the same pad bucket) brings its own label.
  """

  def __init__(self, source, plan: audio.BatchPlan, rows: slice, normalize: bool, labels):
    super().__init__(source, plan, rows, normalize)
    self.labels = labels

  def map(self, element: int) -> dict[str, np.ndarray]:
    _, records = self.plan.batch(element)
    records = records[self.rows]  # [b]
    length = self.plan.crop_length(records[0])  # one pad length per batch
    audio_rows = np.zeros((len(records), length), np.float32)  # [b, T]
    num_valid = np.zeros(len(records), np.int64)  # [b]
    used = []
    for row, record in enumerate(records):
      record, wave = self._read(int(record))
      audio_rows[row] = pad_utterance(wave, length, self.normalize, self.source.describe(record))
      num_valid[row] = len(wave)
      used.append(record)
    padding_mask = np.arange(length)[None, :] >= num_valid[:, None]  # [b, T]
    return {"audio": audio_rows, "padding_mask": padding_mask, **self.labels.rows(used)}


@dataclasses.dataclass(frozen=True)
class AudioFinetuneDataset:
  """The fine-tuning input: iterate it for batches; checkpoint the iterator with orbax.

  Attributes:
    batches: random access, global batch index (across epochs) -> this process's batch.
    iter_dataset: `batches` as an (infinite) grain IterDataset; `iter()` of it resumes exactly
      with `get_state()`/`set_state()`.
    stats: what indexing skipped or changed (decode failures: those seen in this process).
    batches_per_epoch: global batches per pass over the usable utterances.
    pad_lengths: the possible T of a batch, increasing.
    task: "ctc" or "classify".
    vocabulary: ctc: the letter vocabulary (save it beside the checkpoints); else None.
    class_names: classify: the class of each label id; else None.
    max_label_length: ctc: S, the static label length; else None.
  """

  batches: grain.MapDataset
  iter_dataset: grain.IterDataset
  stats: TaskStats
  batches_per_epoch: int
  pad_lengths: tuple[int, ...]
  task: str
  vocabulary: ctc.LetterVocabulary | None
  class_names: tuple[str, ...] | None
  max_label_length: int | None

  @property
  def num_classes(self) -> int | None:
    return len(self.class_names) if self.class_names is not None else None

  @property
  def num_outputs(self) -> int:
    """Width of the head: the vocabulary size with the blank (ctc) or the number of classes."""
    return len(self.vocabulary) if self.task == "ctc" else len(self.class_names)

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.iter_dataset)


def make_audio_finetune_dataset(
  config, *, seed: int, process_index: int = 0, process_count: int = 1
) -> AudioFinetuneDataset:
  """The fine-tuning pipeline that `config.head.task` and `config.input` describe.

  Args:
    config: the run config: `head.task` ("ctc" | "classify") and `input`: source, path, split
      (the training split), sample_rate, batch_size (global), pad_lengths, normalize,
      max_label_length (ctc), vocabulary (ctc, "" = from the training labels), min_length
      (default 0), num_workers (default 0), tfds_data_dir, tfds_feature, tfds_text_feature
      (default "text"), tfds_label_feature (default "label").
    seed: data seed (non-negative), the same on every process.
    process_index: this process (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).

  Returns:
    The dataset; `iter()` of it yields this process's `batch_size // process_count` rows of
    every global batch.

  Raises:
    ValueError: bad config values, mismatched label files, or too few utterances for a batch.
    FileNotFoundError: a missing directory, manifest, label or vocabulary file.
  """
  task = _check_task(config)
  input_cfg = config.input
  batch_size = input_cfg.batch_size
  rows = batching.process_rows(batch_size, process_index, process_count)
  pad_lengths = _pad_lengths(input_cfg)
  vocabulary, class_names = _metadata(input_cfg, task, None, None)

  labelled = load_labelled_split(input_cfg, task, input_cfg.split)
  stats = _with_task_stats(labelled.source)
  examples = _select_examples(labelled, task, input_cfg, pad_lengths, vocabulary, class_names)
  # BatchPlan buckets a record by the largest length <= its length; handing it each record's
  # pad length instead makes that bucket the smallest pad length that holds the record.
  bucket_lengths = np.asarray(pad_lengths)[examples.buckets]  # [N]
  plan = audio.BatchPlan(bucket_lengths, pad_lengths, examples.records, batch_size, seed)
  _log_summary(labelled.source, plan)
  if plan.batches_per_epoch == 0:
    raise ValueError(
      f"{labelled.source.name}: no pad length holds a full global batch of {batch_size} "
      f"({_bucket_counts(plan)}); lower config.input.batch_size or use fewer pad_lengths"
    )
  load = LoadLabelledBatch(labelled.source, plan, rows, bool(input_cfg.normalize), examples.labels)
  batches, iter_dataset = batching.endless_batches(
    load,
    num_workers=int(input_cfg.get("num_workers", 0)),
    read_threads=_READ_THREADS,
    prefetch=_PREFETCH_BATCHES,
  )
  return AudioFinetuneDataset(
    batches,
    iter_dataset,
    stats,
    plan.batches_per_epoch,
    pad_lengths,
    task,
    vocabulary,
    class_names,
    examples.labels.max_length if task == "ctc" else None,
  )


def _bucket_counts(plan: audio.BatchPlan) -> str:
  return ", ".join(f"{p}: {len(m)}" for p, m in zip(plan.crop_lengths, plan.members))


def _log_summary(source, plan: audio.BatchPlan) -> None:
  stats = source.stats
  logging.info(
    "%s: %d of %d records used; skipped %d unreadable, %d empty, %d short, %d too long, "
    "%d with unknown labels, %d with too long labels; %d downmixed. Buckets (pad length: count) "
    "%s -> %d global batches of %d per epoch.",
    source.name,
    sum(len(m) for m in plan.members),
    stats.listed,
    stats.skipped_unreadable,
    stats.skipped_empty,
    stats.skipped_short,
    stats.skipped_long,
    stats.skipped_unknown_label,
    stats.skipped_long_label,
    stats.downmixed,
    _bucket_counts(plan),
    plan.batches_per_epoch,
    plan.batch_size,
  )


# ---------------------------------------------------------------------------------------------
# Evaluation.


class LoadEvalBatch(grain.transforms.Map):
  """Eval batch index -> its examples, padded; filler rows repeat the batch's first example.

  A record that fails to decode (or holds non-finite samples) keeps its row, silent and with
  `example_mask` False, and is counted in `stats.decode_failures` with a warning naming it.
  """

  def __init__(self, source, records, groups, batch_size: int, normalize: bool, labels):
    self.source = source
    self.records = records  # int[E] source record of each example
    self.groups = groups  # per batch: (pad length, int[n <= batch_size] example indices)
    self.batch_size = batch_size
    self.normalize = normalize
    self.labels = labels
    self._failures = batching.DecodeFailures(source, "nothing: it is left out of the scores")

  def map(self, element: int) -> dict[str, np.ndarray]:
    length, examples = self.groups[element]
    example_mask = np.arange(self.batch_size) < len(examples)  # [b]
    example_index = np.full(self.batch_size, examples[0], np.int32)  # fillers: the first
    example_index[: len(examples)] = examples
    records = self.records[example_index]  # [b]
    audio_rows = np.zeros((self.batch_size, length), np.float32)  # [b, T]
    num_valid = np.zeros(self.batch_size, np.int64)  # [b]
    for row, record in enumerate(records):
      wave = self._read(int(record))
      if wave is None:  # left out of the scores: silence in its row, masked
        example_mask[row], num_valid[row] = False, length
        continue
      audio_rows[row] = pad_utterance(wave, length, self.normalize, self.source.describe(record))
      num_valid[row] = len(wave)
    return {
      "audio": audio_rows,
      "padding_mask": np.arange(length)[None, :] >= num_valid[:, None],  # [b, T]
      **self.labels.rows(records),
      "example_index": example_index,
      "example_mask": example_mask,
    }

  def _read(self, record: int) -> np.ndarray | None:
    """The record's samples, or None (warned and counted) when it no longer decodes or holds
    non-finite samples. No substitution at evaluation: a stand-in would change the score."""
    try:
      wave = self.source[record]
    except (RuntimeError, OSError) as e:  # soundfile.LibsndfileError is a RuntimeError
      self._failures(record, e)
      return None
    if not len(wave):
      self._failures(record, "decoded to 0 samples")
      return None
    return wave


@dataclasses.dataclass(frozen=True)
class AudioEvalSet:
  """A finite, deterministic evaluation set; `batches()` walks it once.

  Attributes:
    task: "ctc" or "classify".
    num_examples: E, the examples kept (each appears in exactly one row with example_mask True).
    batch_size: rows of every batch.
    pad_lengths: the possible T of a batch, increasing.
    stats: what indexing skipped (skipped examples are not scored: check them).
    vocabulary: ctc: the training vocabulary; else None.
    class_names: classify: the training classes; else None.
    transcripts: ctc: the reference words of each example ("HI THERE"), in example order.
    labels: int32[E] class of each example (classify); None for ctc.
    names: the file (or TFDS record) of each example, in example order.
  """

  task: str
  num_examples: int
  batch_size: int
  pad_lengths: tuple[int, ...]
  stats: TaskStats
  vocabulary: ctc.LetterVocabulary | None
  class_names: tuple[str, ...] | None
  transcripts: list[str] | None
  labels: np.ndarray | None
  names: list[str]
  _loader: LoadEvalBatch

  @property
  def num_classes(self) -> int | None:
    return len(self.class_names) if self.class_names is not None else None

  @property
  def num_batches(self) -> int:
    return len(self._loader.groups)

  def batches(self) -> Iterator[dict[str, np.ndarray]]:
    """Every batch once, grouped by pad length; the same batches on every call."""
    dataset = grain.MapDataset.range(self.num_batches).map(self._loader)
    yield from dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
    )


def _eval_groups(buckets: np.ndarray, num_buckets: int, pad_lengths, batch_size: int) -> list:
  """[(pad length, int32[n] example indices)]: each bucket's examples in order, in batches."""
  groups = []
  for bucket in range(num_buckets):
    members = np.flatnonzero(buckets == bucket).astype(np.int32)
    for start in range(0, len(members), batch_size):
      groups.append((pad_lengths[bucket], members[start : start + batch_size]))
  return groups


def audio_eval_batches(
  config,
  split: str,
  *,
  vocabulary: ctc.LetterVocabulary | None = None,
  class_names: Sequence[str] | None = None,
) -> AudioEvalSet:
  """The evaluation set of `split` (same source, pad lengths and labels as training).

  Args:
    config: the run config (see `make_audio_finetune_dataset`); `config.input.eval_batch_size`
      (default `batch_size`) sets the rows of a batch. It is not split over processes: every
      process evaluates the whole set.
    split: the split to evaluate ("test" for the embedded set, "dev_clean", ...).
    vocabulary: ctc: the training dataset's vocabulary; None rebuilds it from
      `config.input.vocabulary` or the training split's labels (same result).
    class_names: classify: the training dataset's classes; None rebuilds them likewise.

  Returns:
    The set; every example of `split` that passes the training filters appears exactly once.

  Raises:
    as `make_audio_finetune_dataset`.
  """
  task = _check_task(config)
  input_cfg = config.input
  batch_size = int(input_cfg.get("eval_batch_size", 0) or input_cfg.batch_size)
  if batch_size <= 0:
    raise ValueError(f"config.input.eval_batch_size={batch_size} must be positive")
  pad_lengths = _pad_lengths(input_cfg)
  vocabulary, class_names = _metadata(input_cfg, task, vocabulary, class_names)

  labelled = load_labelled_split(input_cfg, task, split)
  stats = _with_task_stats(labelled.source)
  examples = _select_examples(labelled, task, input_cfg, pad_lengths, vocabulary, class_names)
  groups = _eval_groups(
    examples.buckets[examples.records], len(pad_lengths), pad_lengths, batch_size
  )
  source = labelled.source
  logging.info(
    "%s: %d evaluation examples of %d listed in %d batches of %d (%s)",
    source.name,
    len(examples.records),
    stats.listed,
    len(groups),
    batch_size,
    stats,
  )
  loader = LoadEvalBatch(
    source, examples.records, groups, batch_size, bool(input_cfg.normalize), examples.labels
  )
  labels = [labelled.labels[r] for r in examples.records]
  return AudioEvalSet(
    task=task,
    num_examples=len(examples.records),
    batch_size=batch_size,
    pad_lengths=pad_lengths,
    stats=stats,
    vocabulary=vocabulary,
    class_names=class_names,
    transcripts=[letters_to_words(line) for line in labels] if task == "ctc" else None,
    labels=examples.labels.classes[examples.records] if task == "classify" else None,
    names=[source.describe(int(r)) for r in examples.records],
    _loader=loader,
  )


__all__ = [
  "TASKS",
  "AudioEvalSet",
  "AudioFinetuneDataset",
  "LabelledSource",
  "TaskStats",
  "assign_pad_buckets",
  "audio_eval_batches",
  "letters_to_words",
  "load_labelled_split",
  "make_audio_finetune_dataset",
  "pad_utterance",
  "training_class_names",
  "training_vocabulary",
]
