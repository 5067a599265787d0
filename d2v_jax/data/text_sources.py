"""Text sources: random-access sequences of documents, for the text pipeline (spec §1.1, §1.5).

A document is a list of sentences (lines) as `str`, never empty, each sentence stripped of
surrounding whitespace and never blank. Every source has `name` (for messages), `stats` (a
`TextDataStats`, the counters below), `len(source)` (documents), `source[i] -> list[str]` and
`source.describe(i)` (the chapter, file and line, or TFDS record, for logs).

Three kinds (`config.input.source`):
  embedded  the King James Bible committed in `data/text` (`text_corpus`): one document per
            chapter, one sentence per verse; split train | test | all (every fifth chapter of a
            book is a test chapter);
  folder    every `*.txt` file under a folder (at any depth, sorted paths, hidden files and
            folders left out), in fairseq's raw-text layout: one sentence per line, documents
            separated by blank lines, and a file always ends its last document;
  tfds      a TFDS dataset prepared as ArrayRecord, read with `tfds.data_source` (no TensorFlow):
            one record = one document, whose text feature (`config.input.tfds_feature`) is split
            into lines. Features read without TensorFlow (checked by the tests, which write them
            too): `Text`, `Tensor` of strings with shape () (a document's text), and `Sequence`
            of `Text` or `Tensor` of strings with shape (None,) (a document's sentences, each
            also split at line breaks). Values may be bytes or str.

Bad input. Bytes that are not UTF-8 are decoded as U+FFFD (`errors="replace"`); the lines they were
in are counted (`non_utf8_lines`) and the file or record is named in a log line. Blank and
whitespace-only lines are dropped and counted (`blank_lines`; in a folder's files they also end a
document, as fairseq's preprocessing strips lines). Documents with no sentence left (an empty TFDS
record) are skipped and counted (`empty_documents`), files that hold no text are counted
(`empty_files`), and files that cannot be read (a dangling link, no permission, an I/O error) are
skipped, counted (`unreadable_files`) and logged with their paths. A missing path, or a source with
no text at all, is an error that names the config field to change.

The embedded and folder sources hold their documents in memory (the pipeline tokenizes every
sentence at start-up anyway); the TFDS source reads every record once at construction to count and
skip empty ones, and keeps only the indices of the others: `source[i]` reads its record again.
"""

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from absl import logging

from d2v_jax.data import text_corpus

TEXT_SUFFIX = ".txt"  # folder files, matched case-insensitively
EMBEDDED_SPLITS = ("train", "test", "all")
_REPLACEMENT = "\ufffd"
_LOG_FIRST = 5  # name at most this many bad TFDS records one by one, then a summary
_LOG_EVERY = 100_000  # records or files, for progress lines on big sources


@dataclasses.dataclass
class TextDataStats:
  """What the source read, dropped or replaced, and (filled by the pipeline) how it packed.

  Source counters:
    documents: documents kept (at least one sentence each).
    sentences: sentences (non-blank lines) in those documents.
    blank_lines: empty or whitespace-only lines dropped.
    empty_documents: documents (TFDS records, embedded chapters) with no sentence, skipped.
    non_utf8_lines: lines with bytes that are not UTF-8, decoded with U+FFFD in their place.
    files: folder source: `.txt` files listed.
    empty_files: files with no sentence (no document taken from them).
    unreadable_files: files that could not be read, skipped.
  Pipeline counters (`text.make_text_pretrain_dataset`):
    blocks: packed blocks (the records that batches are made of).
    tokens: content tokens in those blocks (without <s>, </s> and padding).
    overlong_sentences: sentences longer than a block (max_length - 2 tokens), cut into pieces.
    untokenized_sentences: sentences the tokenizer turned into no token, dropped.
  """

  documents: int = 0
  sentences: int = 0
  blank_lines: int = 0
  empty_documents: int = 0
  non_utf8_lines: int = 0
  files: int = 0
  empty_files: int = 0
  unreadable_files: int = 0
  blocks: int = 0
  tokens: int = 0
  overlong_sentences: int = 0
  untokenized_sentences: int = 0


class TextSource(Protocol):
  """What the pipeline needs from a source."""

  name: str
  stats: TextDataStats

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> list[str]: ...

  def describe(self, index: int) -> str: ...


def decode(data: bytes | str) -> tuple[str, bool]:
  """(text, whether it had bytes that are not UTF-8): bad bytes become U+FFFD."""
  if isinstance(data, str):
    return data, False
  try:
    return data.decode("utf-8"), False
  except UnicodeDecodeError:
    return data.decode("utf-8", errors="replace"), True


def clean_lines(lines: Iterable[bytes | str], stats: TextDataStats | None = None) -> list[str]:
  """The sentences of some lines: decoded (U+FFFD for bad bytes), stripped, blank ones dropped.

  A line is split again at line breaks ("\\n", "\\r\\n"), before decoding. Counts
  `blank_lines` and `non_utf8_lines` in `stats` when given.
  """
  sentences = []
  for line in lines:
    newline = b"\n" if isinstance(line, bytes) else "\n"
    for part in line.split(newline):
      text, replaced = decode(part)
      sentence = text.strip()
      if stats is not None:
        stats.non_utf8_lines += replaced
        stats.blank_lines += not sentence
      if sentence:
        sentences.append(sentence)
  return sentences


def _require_text(source) -> None:
  if len(source) == 0:
    raise ValueError(
      f"Text source {source.name} has no usable text (config.input.path): {summarize(source.stats)}"
    )


# ---------------------------------------------------------------------------------------------
# Embedded: the King James Bible.


class EmbeddedTextSource:
  """One split of the embedded corpus: a document per chapter, a sentence per verse."""

  def __init__(self, split: str = "train"):
    if split not in EMBEDDED_SPLITS:
      raise ValueError(
        f"config.input.split={split!r} is not a split of the embedded text corpus: "
        f"{EMBEDDED_SPLITS}"
      )
    corpus = text_corpus.load_embedded_corpus(split)
    self.name = f"embedded King James Bible (split={split})"
    self.stats = TextDataStats()
    self.documents: list[list[str]] = []
    self.chapters: list[str] = []
    for document, book, chapter in zip(corpus.documents, corpus.doc_books, corpus.doc_chapters):
      sentences = clean_lines(document, self.stats)
      if not sentences:
        self.stats.empty_documents += 1
        continue
      self.documents.append(sentences)
      self.chapters.append(f"{book} {chapter}")
    self.stats.documents = len(self.documents)
    self.stats.sentences = sum(len(d) for d in self.documents)
    _require_text(self)

  def __len__(self) -> int:
    return len(self.documents)

  def __getitem__(self, index: int) -> list[str]:
    return self.documents[index]

  def describe(self, index: int) -> str:
    return f"{self.name}: {self.chapters[index]}"


# ---------------------------------------------------------------------------------------------
# Folders of .txt files.


def _is_visible(path: Path) -> bool:
  return not path.name.startswith(".")


def list_text_files(root: Path) -> list[Path]:
  """Every `*.txt` under `root` (any depth, suffix case-insensitive), sorted; hidden ones left out.

  Dangling links are listed (reading them fails, and is counted), directories and other
  non-files are not.
  """
  return sorted(
    p
    for p in root.rglob("*")
    if p.suffix.lower() == TEXT_SUFFIX
    and (p.is_file() or (p.is_symlink() and not p.exists()))
    and all(_is_visible(part) for part in p.relative_to(root).parents[:-1])
    and _is_visible(p)
  )


def read_documents(path: Path, stats: TextDataStats) -> list[tuple[int, list[str]]]:
  """(first line number, sentences) of every document of one file; raises OSError if unreadable.

  Documents are separated by blank (or whitespace-only) lines; runs of them are one break.
  """
  documents: list[tuple[int, list[str]]] = []
  current: list[str] = []
  with path.open("rb") as f:
    for number, raw in enumerate(f, start=1):
      sentences = clean_lines([raw.rstrip(b"\r\n")], stats)
      if sentences:
        if not current:
          documents.append((number, current))
        current.extend(sentences)
      elif current:
        current = []
  return documents


class FolderTextSource:
  """The documents of every `.txt` file under a folder (fairseq's raw-text layout), in memory."""

  def __init__(self, root: str | Path):
    """Reads every file.

    Raises:
      FileNotFoundError: `root` is not a directory.
      ValueError: no file held any text.
    """
    root = Path(root)
    if not root.is_dir():
      raise FileNotFoundError(f"Text folder {root} not found (config.input.path)")
    self.name = f"folder {root}"
    self.stats = TextDataStats()
    self.documents: list[list[str]] = []
    self.origins: list[tuple[str, int]] = []  # (file, first line) of every document
    paths = list_text_files(root)
    self.stats.files = len(paths)
    for i, path in enumerate(paths):
      replaced_before = self.stats.non_utf8_lines
      try:
        documents = read_documents(path, self.stats)
      except OSError as e:
        self.stats.unreadable_files += 1
        logging.warning("Skipping unreadable text file %s (%s)", path, e)
        continue
      replaced = self.stats.non_utf8_lines - replaced_before
      if replaced:
        logging.warning(
          "%s: %d lines had bytes that are not UTF-8 (decoded as U+FFFD)", path, replaced
        )
      if not documents:
        self.stats.empty_files += 1
        logging.warning("Text file %s holds no text", path)
      for line, sentences in documents:
        self.documents.append(sentences)
        self.origins.append((str(path), line))
      if (i + 1) % _LOG_EVERY == 0:
        logging.info("%s: read %d of %d files", self.name, i + 1, len(paths))
    self.stats.documents = len(self.documents)
    self.stats.sentences = sum(len(d) for d in self.documents)
    if not paths:
      raise ValueError(f"No {TEXT_SUFFIX} files under {root} (config.input.path)")
    _require_text(self)

  def __len__(self) -> int:
    return len(self.documents)

  def __getitem__(self, index: int) -> list[str]:
    return self.documents[index]

  def describe(self, index: int) -> str:
    path, line = self.origins[index]
    return f"{path}:{line}"


# ---------------------------------------------------------------------------------------------
# TFDS (ArrayRecord).


class TfdsTextSource:
  """A TFDS text dataset prepared as ArrayRecord (e.g. wikipedia), without TensorFlow.

  One record is one document: its `feature` (see the module docstring for the feature types) split
  into lines. Construction reads every record once (counting and skipping empty ones).
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None, feature: str = "text"):
    import tensorflow_datasets as tfds  # slow import; only this source needs it

    if data_dir and not Path(data_dir).is_dir():
      raise FileNotFoundError(f"TFDS data_dir {data_dir} not found (config.input.tfds_data_dir)")
    self.name = f"tfds {name} (split={split})"
    self.feature = feature
    try:
      self.data = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise FileNotFoundError(
        f"TFDS dataset {name!r} (config.input.path) not found in "
        f"{data_dir or 'the default TFDS data dir'} (config.input.tfds_data_dir)"
      ) from e
    features = self.data.dataset_info.features
    if feature not in features:
      raise ValueError(
        f"{self.name}: no {feature!r} feature (config.input.tfds_feature); "
        f"it has {list(features.keys())}"
      )
    self._is_list = self._feature_kind(features[feature]) == "list"
    self.stats = TextDataStats()
    self.records = self._scan()  # the record of every document
    _require_text(self)

  def _feature_kind(self, info) -> str:
    """'text' (one string per record) or 'list' (strings); raises for anything else."""
    import tensorflow_datasets as tfds

    def is_string(feature) -> bool:  # TFDS gives tf.string features the numpy dtype object
      dtype = getattr(feature, "np_dtype", None)
      return isinstance(feature, tfds.features.Tensor) and np.dtype(dtype).kind in "OSU"

    shape = tuple(getattr(info, "shape", ()) or ())
    if is_string(info) and shape == ():
      return "text"
    if isinstance(info, tfds.features.Sequence) and is_string(info.feature):
      if tuple(info.feature.shape or ()) == ():
        return "list"
    if type(info) is tfds.features.Tensor and is_string(info) and len(shape) == 1:
      return "list"
    raise ValueError(
      f"{self.name}: feature {self.feature!r} (config.input.tfds_feature) is {info!r}, which this "
      "source cannot read as text. Supported: Text or Tensor of strings with shape () (a "
      "document), Sequence(Text) or Tensor of strings with shape (None,) (its sentences)."
    )

  def _lines(self, index: int) -> Sequence[bytes | str]:
    value = self.data[int(index)][self.feature]
    return list(value) if self._is_list else [value]

  def _scan(self) -> list[int]:
    records = []
    bad = []  # records with bytes that are not UTF-8
    for index in range(len(self.data)):
      replaced_before = self.stats.non_utf8_lines
      sentences = clean_lines(self._lines(index), self.stats)
      if self.stats.non_utf8_lines > replaced_before:
        bad.append(index)
        if len(bad) <= _LOG_FIRST:
          logging.warning(
            "%s record %d: %d lines had bytes that are not UTF-8 (decoded as U+FFFD)",
            self.name,
            index,
            self.stats.non_utf8_lines - replaced_before,
          )
      if not sentences:
        self.stats.empty_documents += 1
        continue
      records.append(index)
      self.stats.sentences += len(sentences)
      if (index + 1) % _LOG_EVERY == 0:
        logging.info("%s: read %d of %d records", self.name, index + 1, len(self.data))
    if len(bad) > _LOG_FIRST:
      logging.warning("%s: %d records in all had bytes that are not UTF-8", self.name, len(bad))
    if self.stats.empty_documents:
      logging.warning("%s: skipped %d records without text", self.name, self.stats.empty_documents)
    self.stats.documents = len(records)
    return records

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> list[str]:
    return clean_lines(self._lines(self.records[index]))

  def describe(self, index: int) -> str:
    return f"{self.name} record {self.records[index]}"


# ---------------------------------------------------------------------------------------------


def make_text_source(input_cfg) -> TextSource:
  """Builds the source that `config.input` names.

  Reads the fields `source` (embedded | folder | tfds), `path` (the folder, or the TFDS dataset
  name; empty for embedded), `split` (embedded: train | test | all; TFDS: any split spec such as
  "train[:10%]"; not used by folder), `tfds_data_dir` and `tfds_feature` (default "text").

  Raises:
    ValueError: an unknown source or split, a path where none is read or none where one is
      needed, an unsupported TFDS feature, or a source without text.
    FileNotFoundError: the folder, TFDS data_dir or TFDS dataset does not exist.
  """
  kind, path = input_cfg.source, input_cfg.path
  if kind == "embedded":
    if path:
      raise ValueError(
        f"config.input.path={path!r} is not used by source='embedded' (the King James Bible): "
        "leave it empty, or use source=folder or tfds"
      )
    return EmbeddedTextSource(input_cfg.split)
  if kind not in ("folder", "tfds"):
    raise ValueError(f"Unknown config.input.source {kind!r}: embedded | folder | tfds")
  if not path:
    raise ValueError(
      f"config.input.path is required for source={kind!r} "
      f"({'the text folder' if kind == 'folder' else 'the TFDS dataset name'})"
    )
  if kind == "folder":
    return FolderTextSource(path)
  return TfdsTextSource(
    path,
    input_cfg.split,
    data_dir=input_cfg.get("tfds_data_dir") or None,
    feature=input_cfg.get("tfds_feature") or "text",
  )


def summarize(stats: TextDataStats) -> str:
  """One line for logs: what a source kept, dropped or replaced."""
  files = (
    f"{stats.files} files ({stats.unreadable_files} unreadable, {stats.empty_files} empty), "
    if stats.files
    else ""
  )
  return (
    f"{files}{stats.documents} documents, {stats.sentences} sentences; dropped "
    f"{stats.blank_lines} blank lines and {stats.empty_documents} empty documents; "
    f"{stats.non_utf8_lines} lines with invalid UTF-8 replaced"
  )
