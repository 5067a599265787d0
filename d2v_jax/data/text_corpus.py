"""The embedded text corpus (the King James Bible, `data/text/kjv.tsv.gz`) and plain-text documents.

The corpus is one row per verse: `book chapter verse genre split text` (tab-separated UTF-8,
gzip-compressed, one header line; `data/text/README.md` gives the numbers). For pretraining a
document is one chapter: its verses in order, one verse per line, the layout fairseq's
`complete_doc` reads (one sentence per line, a blank line between documents). For a probe every
verse is one example labelled with the genre of its book (`GENRES`, `GENRE_OF_BOOK`).

The split is by whole chapters: chapter c of every book is in `test` when c % 5 == 0, else in
`train` (`split_of_chapter`). A probe is thus never trained on the neighbouring verses of the
verses it is tested on; books of fewer than five chapters are all in `train`.

`read_text_documents` reads the same one-line-per-sentence layout from any plain or `.gz` file
(decoding bad UTF-8 with replacement characters and counting the lines that had some), and
`write_text_documents` writes it.
"""

import csv
import dataclasses
import gzip
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from absl import logging

# <repo>/data/text, next to this package (d2v_jax/data/text_corpus.py -> parents[2] is the repo).
EMBEDDED_TEXT_DIR = Path(__file__).resolve().parents[2] / "data" / "text"
CORPUS_FILE = "kjv.tsv.gz"
CORPUS_COLUMNS = ("book", "chapter", "verse", "genre", "split", "text")
SPLITS = ("train", "test")
TEST_EVERY = 5  # chapter c of a book is in the test split when c % TEST_EVERY == 0

# Probe classes (label = index). Six genres with 3,171 to 7,018 verses each (at most 2.2:1).
GENRES = ("Law", "History", "Wisdom", "Prophets", "Gospels and Acts", "Epistles and Revelation")

# The 66 books in canonical order, with their genre. "Wisdom" holds the poetic books; the major
# and minor prophets (Lamentations included) are one class, and Revelation joins the epistles
# (the rest of the New Testament) so that no class is tiny.
BOOKS = (
  ("Genesis", "Law"), ("Exodus", "Law"), ("Leviticus", "Law"), ("Numbers", "Law"),
  ("Deuteronomy", "Law"),
  ("Joshua", "History"), ("Judges", "History"), ("Ruth", "History"), ("1 Samuel", "History"),
  ("2 Samuel", "History"), ("1 Kings", "History"), ("2 Kings", "History"),
  ("1 Chronicles", "History"), ("2 Chronicles", "History"), ("Ezra", "History"),
  ("Nehemiah", "History"), ("Esther", "History"),
  ("Job", "Wisdom"), ("Psalms", "Wisdom"), ("Proverbs", "Wisdom"), ("Ecclesiastes", "Wisdom"),
  ("Song of Solomon", "Wisdom"),
  ("Isaiah", "Prophets"), ("Jeremiah", "Prophets"), ("Lamentations", "Prophets"),
  ("Ezekiel", "Prophets"), ("Daniel", "Prophets"), ("Hosea", "Prophets"), ("Joel", "Prophets"),
  ("Amos", "Prophets"), ("Obadiah", "Prophets"), ("Jonah", "Prophets"), ("Micah", "Prophets"),
  ("Nahum", "Prophets"), ("Habakkuk", "Prophets"), ("Zephaniah", "Prophets"),
  ("Haggai", "Prophets"), ("Zechariah", "Prophets"), ("Malachi", "Prophets"),
  ("Matthew", "Gospels and Acts"), ("Mark", "Gospels and Acts"), ("Luke", "Gospels and Acts"),
  ("John", "Gospels and Acts"), ("Acts", "Gospels and Acts"),
  ("Romans", "Epistles and Revelation"), ("1 Corinthians", "Epistles and Revelation"),
  ("2 Corinthians", "Epistles and Revelation"), ("Galatians", "Epistles and Revelation"),
  ("Ephesians", "Epistles and Revelation"), ("Philippians", "Epistles and Revelation"),
  ("Colossians", "Epistles and Revelation"), ("1 Thessalonians", "Epistles and Revelation"),
  ("2 Thessalonians", "Epistles and Revelation"), ("1 Timothy", "Epistles and Revelation"),
  ("2 Timothy", "Epistles and Revelation"), ("Titus", "Epistles and Revelation"),
  ("Philemon", "Epistles and Revelation"), ("Hebrews", "Epistles and Revelation"),
  ("James", "Epistles and Revelation"), ("1 Peter", "Epistles and Revelation"),
  ("2 Peter", "Epistles and Revelation"), ("1 John", "Epistles and Revelation"),
  ("2 John", "Epistles and Revelation"), ("3 John", "Epistles and Revelation"),
  ("Jude", "Epistles and Revelation"), ("Revelation", "Epistles and Revelation"),
)  # fmt: skip
GENRE_OF_BOOK = dict(BOOKS)


def split_of_chapter(chapter: int) -> str:
  """The split of chapter `chapter` (1-based) of any book: every fifth chapter is `test`."""
  return "test" if chapter % TEST_EVERY == 0 else "train"


@dataclasses.dataclass(frozen=True)
class Verse:
  """One row of `kjv.tsv.gz`."""

  book: str
  chapter: int
  verse: int
  genre: str
  split: str
  text: str

  @property
  def label(self) -> int:
    return GENRES.index(self.genre)


@dataclasses.dataclass(frozen=True)
class TextCorpus:
  """Documents (chapters) of one split, with per-verse labels.

  Attributes:
    documents: one list of verse strings per chapter, in canonical order.
    doc_books, doc_chapters: the book and chapter number of each document.
    labels: int32[num_verses], the genre index (`class_names`) of every verse, in the order of
      `verses` (documents flattened).
    books: the book of every verse, in the same order.
    class_names: `GENRES`.
  """

  documents: list[list[str]]
  doc_books: list[str]
  doc_chapters: list[int]
  labels: np.ndarray
  books: list[str]
  class_names: tuple[str, ...] = GENRES

  @property
  def verses(self) -> list[str]:
    return [verse for doc in self.documents for verse in doc]

  @property
  def num_verses(self) -> int:
    return len(self.labels)

  @property
  def num_words(self) -> int:
    """Whitespace-separated words."""
    return sum(len(verse.split()) for doc in self.documents for verse in doc)


class TextProbeData(NamedTuple):
  """Labelled verses for a text-classification probe.

  Attributes:
    texts: one verse each.
    labels: int32[N], genre indices.
    class_names: the name of every label (`GENRES`).
  """

  texts: list[str]
  labels: np.ndarray
  class_names: tuple[str, ...]


def _check_split(split: str) -> None:
  if split not in (*SPLITS, "all"):
    raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")


def load_embedded_verses(split: str = "all", *, root: str | Path | None = None) -> list[Verse]:
  """Every verse of the embedded corpus in one split ("train", "test" or "all"), in file order.

  Args:
    split: which split to keep; "all" keeps every verse.
    root: the directory holding `kjv.tsv.gz` (default: the repository's `data/text`).

  Raises:
    FileNotFoundError: the corpus file is missing.
    ValueError: a bad split name, or a malformed file.
  """
  _check_split(split)
  path = (Path(root) if root else EMBEDDED_TEXT_DIR) / CORPUS_FILE
  if not path.is_file():
    raise FileNotFoundError(
      f"Embedded text corpus {path} not found: it is made by data/text/make_corpus.py (needs "
      "apt-get and the Debian bible-kjv packages)."
    )
  with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = tuple(next(reader, ()))
    if header != CORPUS_COLUMNS:
      raise ValueError(f"{path}: expected columns {CORPUS_COLUMNS}, got {header}")
    verses = []
    for line, row in enumerate(reader, start=2):
      if len(row) != len(CORPUS_COLUMNS):
        raise ValueError(f"{path}:{line}: expected {len(CORPUS_COLUMNS)} fields, got {len(row)}")
      book, chapter, verse, genre, row_split, text = row
      if split in ("all", row_split):
        verses.append(Verse(book, int(chapter), int(verse), genre, row_split, text))
  return verses


def load_embedded_corpus(split: str = "all", *, root: str | Path | None = None) -> TextCorpus:
  """The embedded corpus of one split as documents (one per chapter) with per-verse labels."""
  documents, doc_books, doc_chapters, labels, books = [], [], [], [], []
  key = None
  for v in load_embedded_verses(split, root=root):
    if (v.book, v.chapter) != key:
      key = (v.book, v.chapter)
      documents.append([])
      doc_books.append(v.book)
      doc_chapters.append(v.chapter)
    documents[-1].append(v.text)
    labels.append(v.label)
    books.append(v.book)
  return TextCorpus(
    documents, doc_books, doc_chapters, np.asarray(labels, dtype=np.int32).reshape(-1), books
  )


def load_embedded_probe_set(split: str, *, root: str | Path | None = None) -> TextProbeData:
  """(verse texts, int32 genre labels, class names) of one split of the embedded corpus."""
  corpus = load_embedded_corpus(split, root=root)
  return TextProbeData(corpus.verses, corpus.labels, corpus.class_names)


def load_embedded_probe_sets(*, root: str | Path | None = None) -> tuple[TextProbeData, ...]:
  """(train, test) probe sets of the embedded corpus."""
  return tuple(load_embedded_probe_set(split, root=root) for split in SPLITS)


# Plain-text documents: one sentence per line, a blank line between documents.


@dataclasses.dataclass
class TextStats:
  """What reading plain text replaced or dropped."""

  lines: int = 0  # non-empty lines read
  invalid_utf8_lines: int = 0  # lines with bytes that are not UTF-8 (decoded as U+FFFD)
  documents: int = 0


def decode_utf8(data: bytes, stats: TextStats | None = None) -> str:
  """`data` as text; invalid UTF-8 becomes U+FFFD, counted in `stats.invalid_utf8_lines`."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    if stats is not None:
      stats.invalid_utf8_lines += 1
    return data.decode("utf-8", errors="replace")


def _open_binary(path: Path):
  return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def iter_text_lines(path: str | Path, stats: TextStats | None = None) -> Iterable[str]:
  """Lines of a plain or gzip (`.gz`) text file, without line ends; blank lines as ""."""
  path = Path(path)
  with _open_binary(path) as f:
    for raw in f:
      line = decode_utf8(raw.rstrip(b"\r\n"), stats).strip()
      if line and stats is not None:
        stats.lines += 1
      yield line


def read_text_documents(path: str | Path) -> tuple[list[list[str]], TextStats]:
  """Documents of a one-sentence-per-line file (blank lines separate documents).

  Surrounding whitespace is stripped from every line; runs of blank lines count as one break.
  Lines with invalid UTF-8 are kept with U+FFFD in place of the bad bytes, counted and logged.
  """
  stats = TextStats()
  documents: list[list[str]] = [[]]
  for line in iter_text_lines(path, stats):
    if line:
      documents[-1].append(line)
    elif documents[-1]:
      documents.append([])
  if not documents[-1]:
    documents.pop()
  stats.documents = len(documents)
  if stats.invalid_utf8_lines:
    logging.warning(
      "%s: %d of %d lines had invalid UTF-8 (replaced by U+FFFD)",
      path,
      stats.invalid_utf8_lines,
      stats.lines,
    )
  return documents, stats


def write_text_documents(path: str | Path, documents: Sequence[Sequence[str]]) -> None:
  """Writes documents one sentence per line, a blank line between documents (gzip for `.gz`)."""
  path = Path(path)
  for doc in documents:
    for sentence in doc:
      if not sentence.strip() or "\n" in sentence or "\r" in sentence:
        raise ValueError(f"A sentence must be one non-blank line, got {sentence!r}")
  text = "\n\n".join("\n".join(doc) for doc in documents if doc) + "\n"
  data = text.encode("utf-8")
  if path.suffix == ".gz":
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
      f.write(data)
  else:
    path.write_bytes(data)
