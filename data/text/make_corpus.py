"""Makes the embedded text corpus of d2v-jax (the King James Bible) and its BPE tokenizer.

Source: Debian's `bible-kjv-text` package (the 1611 Authorized Version, public domain), stored in
the compressed format of Chip Chapin's Bible Retrieval System. The script fetches it and the
`bible-kjv` reader with `apt-get download` into a temporary directory, unpacks both with
`dpkg-deb -x`, and has the reader print every verse, one a line (`bible -f Gen1:1-Rev22:21`
prints `Ge1:1 In the beginning ...`). It then parses those lines, collapses runs of whitespace
to one space, checks the verse count (31,102) and the order of the 66 books, and writes

  kjv.tsv.gz    columns `book chapter verse genre split text` (tab-separated UTF-8, one header
                line, gzip with no file name or time stamp, so the bytes are reproducible);
  tokenizer/    byte-level BPE (`vocab.json`, `merges.txt`) trained on the train split's verses
                by `d2v_jax.data.tokenizer.train_tokenizer`.

Book names, genres (the probe's classes) and the chapter split come from
`d2v_jax.data.text_corpus` (`BOOKS`, `split_of_chapter`). The output is a pure function of the
package version (4.38 for the committed files, Debian 12) and of the tokenizers version.

Needs a Debian-like system with apt-get, dpkg-deb and libreadline (the reader's only library);
nothing that reads the corpus does. Run it with the project's Python, from anywhere::

  python data/text/make_corpus.py                      # rewrites kjv.tsv.gz and tokenizer/
  python data/text/make_corpus.py --deb-dir=/tmp/debs  # use .deb files downloaded before
  python data/text/make_corpus.py --tokenizer-only     # retrain the tokenizer from kjv.tsv.gz
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from d2v_jax.data import text_corpus  # noqa: E402
from d2v_jax.data import tokenizer as tokenizer_lib  # noqa: E402

PACKAGES = ("bible-kjv-text", "bible-kjv")
NUM_VERSES = 31102
VOCAB_SIZE = 4096
# The reader's book abbreviations, in canonical order (matched one to one with text_corpus.BOOKS).
READER_BOOKS = (
  "Ge", "Exo", "Lev", "Num", "Deu", "Josh", "Jdgs", "Ruth", "1Sm", "2Sm", "1Ki", "2Ki", "1Chr",
  "2Chr", "Ezra", "Neh", "Est", "Job", "Psa", "Prv", "Eccl", "SSol", "Isa", "Jer", "Lam", "Eze",
  "Dan", "Hos", "Joel", "Amos", "Obad", "Jonah", "Mic", "Nahum", "Hab", "Zep", "Hag", "Zec", "Mal",
  "Mat", "Mark", "Luke", "John", "Acts", "Rom", "1Cor", "2Cor", "Gal", "Eph", "Phi", "Col", "1Th",
  "2Th", "1Tim", "2Tim", "Titus", "Phmn", "Heb", "Jas", "1Pet", "2Pet", "1Jn", "2Jn", "3Jn", "Jude",
  "Rev",
)  # fmt: skip
_LINE = re.compile(r"([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)")


def fetch_debs(deb_dir: Path) -> None:
  """Downloads the two packages into `deb_dir` unless a .deb of each is already there."""
  for package in PACKAGES:
    if not list(deb_dir.glob(f"{package}_*.deb")):
      subprocess.run(["apt-get", "download", package], cwd=deb_dir, check=True)


def dump_verses(deb_dir: Path, work_dir: Path) -> tuple[list[str], str]:
  """Unpacks the packages and prints every verse with the reader; returns lines and version."""
  debs = {}
  for package in PACKAGES:
    found = sorted(deb_dir.glob(f"{package}_*.deb"))
    if not found:
      raise FileNotFoundError(f"No {package}_*.deb in {deb_dir}")
    debs[package] = found[-1]
    subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(work_dir)], check=True)
  version = debs["bible-kjv-text"].name.split("_")[1]
  out = subprocess.run(
    [str(work_dir / "usr/bin/bible"), "-f", "-p", str(work_dir / "usr/lib"), "Gen1:1-Rev22:21"],
    stdin=subprocess.DEVNULL,
    capture_output=True,
    check=True,
  )
  return out.stdout.decode("ascii").splitlines(), version


def parse_verses(lines: list[str]) -> list[tuple[str, int, int, str]]:
  """(book name, chapter, verse, text) for every verse line, with whitespace normalised."""
  names = dict(zip(READER_BOOKS, (name for name, _ in text_corpus.BOOKS), strict=True))
  verses = []
  for line in lines:
    if not line.strip():
      continue
    match = _LINE.fullmatch(line)
    if not match or match.group(1) not in names:
      raise ValueError(f"Unexpected line from the reader: {line!r}")
    abbrev, chapter, verse, text = match.groups()
    verses.append((names[abbrev], int(chapter), int(verse), " ".join(text.split())))
  if len(verses) != NUM_VERSES:
    raise ValueError(f"Expected {NUM_VERSES} verses, got {len(verses)}")
  order = list(dict.fromkeys(book for book, *_ in verses))
  if order != [name for name, _ in text_corpus.BOOKS]:
    raise ValueError(f"Books out of canonical order: {order}")
  return verses


def write_corpus(verses: list[tuple[str, int, int, str]], path: Path) -> None:
  buffer = io.StringIO()
  writer = csv.writer(buffer, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
  writer.writerow(text_corpus.CORPUS_COLUMNS)
  for book, chapter, verse, text in verses:
    if "\t" in text or not text:
      raise ValueError(f"Bad verse text {book} {chapter}:{verse}: {text!r}")
    genre = text_corpus.GENRE_OF_BOOK[book]
    writer.writerow((book, chapter, verse, genre, text_corpus.split_of_chapter(chapter), text))
  with path.open("wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as f:
    f.write(buffer.getvalue().encode("utf-8"))


def describe(root: Path) -> None:
  """Prints the numbers that README.md quotes."""
  for split in ("train", "test", "all"):
    corpus = text_corpus.load_embedded_corpus(split, root=root)
    counts = [int((corpus.labels == i).sum()) for i in range(len(text_corpus.GENRES))]
    print(
      f"{split}: {len(corpus.documents)} chapters, {corpus.num_verses} verses, "
      f"{corpus.num_words} words, per genre {dict(zip(text_corpus.GENRES, counts))}"
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
  parser.add_argument("--deb-dir", type=Path, help="where the .deb files are or go (default: tmp)")
  parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
  parser.add_argument("--tokenizer-only", action="store_true", help="keep kjv.tsv.gz as it is")
  args = parser.parse_args()
  args.out_dir.mkdir(parents=True, exist_ok=True)

  if not args.tokenizer_only:
    with tempfile.TemporaryDirectory() as tmp:
      deb_dir = args.deb_dir or Path(tmp) / "debs"
      deb_dir.mkdir(parents=True, exist_ok=True)
      fetch_debs(deb_dir)
      lines, version = dump_verses(deb_dir, Path(tmp) / "root")
    write_corpus(parse_verses(lines), args.out_dir / text_corpus.CORPUS_FILE)
    print(f"bible-kjv-text {version}: wrote {args.out_dir / text_corpus.CORPUS_FILE}")

  train = text_corpus.load_embedded_corpus("train", root=args.out_dir)
  tok = tokenizer_lib.train_tokenizer(train.verses, args.vocab_size, args.out_dir / "tokenizer")
  lengths = [len(ids) for ids in tok.encode_batch(train.verses)]
  print(
    f"tokenizer: vocab {tok.vocab_size}, {sum(lengths) / len(lengths):.2f} tokens a train verse"
  )
  describe(args.out_dir)


if __name__ == "__main__":
  main()
