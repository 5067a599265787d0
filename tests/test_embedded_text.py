"""The committed text corpus: complete, split by whole chapters, labelled, matching its README."""

import collections
import re
from pathlib import Path

import numpy as np
import pytest

from d2v_jax.data import text_corpus as tc

README = tc.EMBEDDED_TEXT_DIR / "README.md"


@pytest.fixture(scope="module")
def verses():
  return tc.load_embedded_verses()


@pytest.fixture(scope="module")
def corpora():
  return {split: tc.load_embedded_corpus(split) for split in ("train", "test", "all")}


def _readme_table(first_header: str) -> list[list[str]]:
  """Rows of the README table whose first header cell is `first_header` (commas dropped)."""
  lines = README.read_text(encoding="utf-8").splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
  rows = []
  for line in lines[start + 2 :]:
    if not line.startswith("|"):
      break
    rows.append([cell.strip().replace(",", "") for cell in line.strip("|").split("|")])
  return rows


def test_every_verse_of_the_66_books_in_canonical_order(verses):
  assert len(verses) == 31102
  assert list(dict.fromkeys(v.book for v in verses)) == [name for name, _ in tc.BOOKS]
  assert len({(v.book, v.chapter) for v in verses}) == 1189
  assert (verses[0].book, verses[0].text) == (
    "Genesis",
    "In the beginning God created the heaven and the earth.",
  )
  assert verses[-1].text == "The grace of our Lord Jesus Christ be with you all. Amen."
  # Chapters run 1..n in each book and verses 1..n in each chapter.
  by_book = collections.defaultdict(list)
  by_chapter = collections.defaultdict(list)
  for v in verses:
    by_chapter[v.book, v.chapter].append(v.verse)
    if v.verse == 1:
      by_book[v.book].append(v.chapter)
  assert all(chapters == list(range(1, len(chapters) + 1)) for chapters in by_book.values())
  assert all(numbers == list(range(1, len(numbers) + 1)) for numbers in by_chapter.values())


def test_texts_are_single_clean_lines(verses):
  for v in verses:
    assert v.text and v.text == " ".join(v.text.split()), (v.book, v.chapter, v.verse)
    assert "\t" not in v.text and "\n" not in v.text


def test_split_is_by_whole_chapters_and_follows_the_rule(verses):
  for v in verses:
    assert v.split == tc.split_of_chapter(v.chapter) == ("test" if v.chapter % 5 == 0 else "train")
  train = {(v.book, v.chapter) for v in verses if v.split == "train"}
  test = {(v.book, v.chapter) for v in verses if v.split == "test"}
  assert train and test and not train & test
  assert len(train) + len(test) == 1189
  # Deterministic: the loader gives the same documents every time, and splits add up to "all".
  again = tc.load_embedded_corpus("test")
  assert [(b, c) for b, c in zip(again.doc_books, again.doc_chapters)] == sorted(
    test, key=lambda key: ([name for name, _ in tc.BOOKS].index(key[0]), key[1])
  )


def test_genres_follow_the_book_map_and_cover_every_class_in_both_splits(verses, corpora):
  assert len(tc.BOOKS) == 66 and set(tc.GENRE_OF_BOOK.values()) == set(tc.GENRES)
  assert all(v.genre == tc.GENRE_OF_BOOK[v.book] for v in verses)
  for split in ("train", "test"):
    counts = np.bincount(corpora[split].labels, minlength=len(tc.GENRES))
    assert len(counts) == len(tc.GENRES) and counts.min() > 0.05 * counts.sum(), (split, counts)
  all_counts = np.bincount(corpora["all"].labels)
  assert all_counts.max() / all_counts.min() < 2.5


def test_documents_are_chapters_with_aligned_labels(corpora):
  for split in ("train", "test"):
    corpus = corpora[split]
    assert corpus.documents and all(corpus.documents) and all(all(d) for d in corpus.documents)
    assert corpus.labels.dtype == np.int32 and corpus.labels.shape == (corpus.num_verses,)
    assert len(corpus.books) == len(corpus.verses) == corpus.num_verses
    assert len(corpus.doc_books) == len(corpus.doc_chapters) == len(corpus.documents)
    genres = [tc.GENRES[label] for label in corpus.labels]
    assert genres == [tc.GENRE_OF_BOOK[book] for book in corpus.books]
  train, test, everything = corpora["train"], corpora["test"], corpora["all"]
  assert train.num_verses + test.num_verses == everything.num_verses
  assert sorted(train.verses + test.verses) == sorted(everything.verses)


def test_probe_sets():
  train, test = tc.load_embedded_probe_sets()
  for probe in (train, test):
    assert len(probe.texts) == len(probe.labels) and probe.labels.dtype == np.int32
    assert probe.class_names == tc.GENRES
    assert set(probe.labels.tolist()) == set(range(len(tc.GENRES)))
  assert not (set(train.texts) & set(test.texts)) - _repeated_verses()


def _repeated_verses() -> set[str]:
  """Verse texts that occur more than once in the Bible (refrains such as Psalm 136's)."""
  counts = collections.Counter(v.text for v in tc.load_embedded_verses())
  return {text for text, n in counts.items() if n > 1}


def test_loader_numbers_match_the_readme(corpora):
  rows = {row[0]: row for row in _readme_table("split")}
  assert set(rows) == {"train", "test", "all"}
  for split, corpus in corpora.items():
    _, books, chapters, verses, words, *_ = rows[split]
    assert int(books) == len(set(corpus.doc_books)), split
    assert int(chapters) == len(corpus.documents), split
    assert int(verses) == corpus.num_verses, split
    assert int(words) == corpus.num_words, split
  genre_rows = _readme_table("label")
  assert [row[1] for row in genre_rows] == list(tc.GENRES)
  for split, column in (("train", 3), ("test", 4)):
    counts = np.bincount(corpora[split].labels).tolist()
    assert [int(row[column]) for row in genre_rows] == counts, split


def test_unknown_split_and_missing_file_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="split"):
    tc.load_embedded_corpus("validation")
  with pytest.raises(FileNotFoundError, match="make_corpus.py"):
    tc.load_embedded_corpus("all", root=tmp_path)


@pytest.mark.parametrize("name", ["docs.txt", "docs.txt.gz"])
def test_text_documents_round_trip_and_bad_utf8_is_counted(tmp_path, name):
  documents = [["First line.", "Second — line ✓."], ["Another document 😀."]]
  path = tmp_path / name
  tc.write_text_documents(path, documents)
  read, stats = tc.read_text_documents(path)
  assert read == documents
  assert (stats.lines, stats.documents, stats.invalid_utf8_lines) == (3, 2, 0)

  raw = tmp_path / "bad.txt"
  raw.write_bytes(b"  ok line \r\n\n\n\nbad \xff\xfe bytes\nend\n\n")
  read, stats = tc.read_text_documents(raw)
  assert read == [["ok line"], ["bad \ufffd\ufffd bytes", "end"]]
  assert (stats.lines, stats.documents, stats.invalid_utf8_lines) == (3, 2, 1)

  with pytest.raises(ValueError, match="one non-blank line"):
    tc.write_text_documents(tmp_path / "x.txt", [["two\nlines"]])


def test_committed_files_are_small():
  total = sum(p.stat().st_size for p in Path(tc.EMBEDDED_TEXT_DIR).rglob("*") if p.is_file())
  assert total < 3_000_000
  assert re.search(r"1\.35 MB", README.read_text(encoding="utf-8"))
  assert abs((tc.EMBEDDED_TEXT_DIR / tc.CORPUS_FILE).stat().st_size / 1e6 - 1.35) < 0.005
