"""Byte-level BPE tokenizer with RoBERTa's special-token ids (HF `tokenizers` underneath).

Ids follow RoBERTa and fairseq data2vec text: `<s>` = 0 (BOS), `<pad>` = 1, `</s>` = 2 (EOS),
`<unk>` = 3, the BPE tokens after them and `<mask>` last (50264 in RoBERTa's 50,265-entry
dictionary). `encode` adds no special tokens (the pipeline adds BOS/EOS around each block) and
never parses special-token strings in the text: "<mask>" in a text is five literal characters;
put `mask_id` into the ids to mask. Byte-level BPE has every byte in its alphabet, so any text
round-trips exactly (`decode(encode(t)) == t`) and `<unk>` never occurs.

Pre-tokenisation is GPT-2's (fairseq `gpt2_bpe_utils` and HF `ByteLevel` use the same regex and
byte-to-unicode map): a space before a word belongs to the word's token ("Ġworld"), and no space
is added in front of the text (`add_prefix_space=False`, as fairseq's GPT-2 encoder and HF's
RoBERTa tokenizer by default).

Files `load_tokenizer` reads from a directory:

* `vocab.json` + `merges.txt` with the special tokens in the vocabulary at ids 0-3 (what
  `train_tokenizer` writes, and HF's RoBERTa / data2vec-text releases, whose vocab.json is already
  in fairseq id order). `<mask>` is taken from the vocabulary, or appended as the last id.
* fairseq's `gpt2_bpe` layout: GPT-2's `encoder.json` (or `vocab.json`) + `vocab.bpe` (or
  `merges.txt`) + the fairseq `dict.txt` of a data2vec / RoBERTa checkpoint. fairseq first BPE-
  encodes text into GPT-2 ids (0..50256), writes them as decimal strings, and looks each string
  up in its Dictionary: `[<s>, <pad>, </s>, <unk>]`, then the words of dict.txt in file order
  (each line `<word> <count> [#fairseq:overwrite]`; word = a GPT-2 id like `13` or a filler such
  as `madeupword0000`), then `<mask>` appended by RoBERTa / data2vec's task (kept where it is if
  dict.txt already has it). So the model id of GPT-2 id g is 4 + (line of `str(g)` in dict.txt),
  `<unk>` if dict.txt lacks it. This module tokenises in GPT-2 ids and maps them through that
  table, so the ids equal those fed to the released fairseq checkpoints (RoBERTa's dict.txt has
  50,260 words: 4 + 50,260 + 1 = 50,265).

Bad input: `bytes` are decoded as UTF-8 with U+FFFD for invalid bytes, and lone surrogates in a
`str` become U+FFFD; each such text is counted in `tokenizer.stats`. An empty
text encodes to `[]`.

Training (`train_tokenizer`, or the CLI) learns the merges with the four specials first and
appends `<mask>`:

  python -m d2v_jax.data.tokenizer train --input=<file or folder> --vocab_size=8000 --out=<dir>

The embedded corpus's tokenizer (`load_embedded_tokenizer`, `data/text/tokenizer/`) has 4,096 ids,
trained on the corpus's train split by `data/text/make_corpus.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from absl import logging
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from d2v_jax.data import text_corpus

BOS, PAD, EOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # at ids 0, 1, 2, 3
MASK_TOKEN = "<mask>"
# The smallest vocabulary: 4 specials, the 256 byte symbols and <mask>.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256 + 1
EMBEDDED_TOKENIZER_DIR = text_corpus.EMBEDDED_TEXT_DIR / "tokenizer"
_SURROGATE = re.compile("[\ud800-\udfff]")
_VOCAB_FILES = ("vocab.json", "encoder.json")
_MERGES_FILES = ("merges.txt", "vocab.bpe")


@dataclasses.dataclass
class TokenizerStats:
  """Texts that `encode` had to repair (per process)."""

  invalid_utf8: int = 0  # bytes that are not UTF-8, or str with lone surrogates


class BpeTokenizer:
  """Byte-level BPE with RoBERTa special ids. Picklable (grain workers can hold one).

  Attributes:
    vocab_size: number of ids (embedding rows): the largest id + 1.
    mask_id: id of `<mask>` (the last id).
    special_ids: (BOS, PAD, EOS, UNK, mask_id).
    bos, pad, eos, unk: 0, 1, 2, 3.
    name: where it was loaded from.
    stats: `TokenizerStats`.
  """

  bos, pad, eos, unk = BOS, PAD, EOS, UNK

  def __init__(
    self,
    bpe: Tokenizer,
    *,
    vocab_size: int,
    mask_id: int,
    symbols: dict[int, str] | None = None,
    bpe_to_id: np.ndarray | None = None,
    name: str = "",
  ):
    """Wraps a byte-level HF tokenizer (no specials registered; see `load_tokenizer`).

    Args:
      bpe: the BPE model with ByteLevel pre-tokenizer and decoder.
      vocab_size: number of model ids.
      mask_id: id of `<mask>`.
      symbols: strings of the ids that the BPE cannot produce (specials; dict.txt fillers).
      bpe_to_id: int32 table from BPE ids to model ids (fairseq dict.txt), None if they agree.
      name: for messages.
    """
    self._bpe = bpe
    self.vocab_size = int(vocab_size)
    self.mask_id = int(mask_id)
    self.special_ids = (BOS, PAD, EOS, UNK, self.mask_id)
    self._symbols = dict(symbols or {})
    self._bpe_to_id = bpe_to_id
    self._id_to_bpe = None
    if bpe_to_id is not None:
      self._id_to_bpe = np.full(self.vocab_size, -1, np.int64)
      known = bpe_to_id != UNK
      self._id_to_bpe[bpe_to_id[known]] = np.flatnonzero(known)
    self.name = name
    self.stats = TokenizerStats()

  def __repr__(self) -> str:
    return f"BpeTokenizer({self.name!r}, vocab_size={self.vocab_size}, mask_id={self.mask_id})"

  def _text(self, text: str | bytes) -> str:
    if isinstance(text, bytes | bytearray):
      try:
        return bytes(text).decode("utf-8")
      except UnicodeDecodeError:
        self.stats.invalid_utf8 += 1
        return bytes(text).decode("utf-8", errors="replace")
    if not isinstance(text, str):
      raise TypeError(f"encode takes str or bytes, got {type(text).__name__}")
    try:
      text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
      self.stats.invalid_utf8 += 1
      text = _SURROGATE.sub("\ufffd", text)
    return text

  def _to_ids(self, bpe_ids: list[int]) -> list[int]:
    if self._bpe_to_id is None:
      return bpe_ids
    return self._bpe_to_id[np.asarray(bpe_ids, np.int64)].tolist() if bpe_ids else []

  def encode(self, text: str | bytes) -> list[int]:
    """Token ids of `text`, no special tokens added; "" -> []."""
    text = self._text(text)
    return self._to_ids(self._bpe.encode(text, add_special_tokens=False).ids) if text else []

  def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
    """`encode` of every text (HF tokenizes the batch in parallel threads)."""
    texts = [self._text(t) for t in texts]
    out = self._bpe.encode_batch(texts, add_special_tokens=False)
    return [self._to_ids(e.ids) if t else [] for t, e in zip(texts, out)]

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    """Text of `ids`; special tokens are dropped (or written as `<s>`, ... if not skip_special)."""
    ids = [int(i) for i in np.asarray(list(ids), np.int64).reshape(-1)]
    pieces, run = [], []
    special = set(self.special_ids)
    for i in ids:
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"Token id {i} is outside [0, {self.vocab_size})")
      bpe_id = i if self._id_to_bpe is None else int(self._id_to_bpe[i])
      if i in special or bpe_id < 0 or i in self._symbols:
        if run:
          pieces.append(self._bpe.decode(run, skip_special_tokens=False))
          run = []
        if not (skip_special and i in special):
          pieces.append(self._symbols.get(i, MASK_TOKEN if i == self.mask_id else f"<{i}>"))
      else:
        run.append(bpe_id)
    if run:
      pieces.append(self._bpe.decode(run, skip_special_tokens=False))
    return "".join(pieces)

  def is_special(self, ids) -> np.ndarray:
    """bool array, True where `ids` holds a special id (BOS, PAD, EOS, UNK or <mask>)."""
    return np.isin(np.asarray(ids), self.special_ids)

  def token_to_id(self, token: str) -> int | None:
    """Id of a vocabulary string (GPT-2 byte-level form, e.g. "Ġworld"); None if unknown."""
    for i, s in self._symbols.items():
      if s == token:
        return i
    bpe_id = self._bpe.token_to_id(token)
    if bpe_id is None:
      return None
    return bpe_id if self._bpe_to_id is None else int(self._bpe_to_id[bpe_id])

  def id_to_token(self, i: int) -> str:
    """Vocabulary string of id `i`."""
    if i in self._symbols:
      return self._symbols[i]
    bpe_id = i if self._id_to_bpe is None else int(self._id_to_bpe[i])
    token = self._bpe.id_to_token(bpe_id) if bpe_id >= 0 else None
    if token is None:
      raise ValueError(f"Token id {i} has no string in {self.name}")
    return token


def _bpe_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
  # A symbol missing from a (hand-made) vocabulary becomes <unk> rather than vanishing.
  unk = SPECIAL_TOKENS[UNK] if SPECIAL_TOKENS[UNK] in vocab else None
  bpe = Tokenizer(models.BPE(vocab, merges, unk_token=unk))
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  return bpe


def _find(directory: Path, names: Sequence[str]) -> Path:
  for name in names:
    if (directory / name).is_file():
      return directory / name
  raise FileNotFoundError(f"{directory}: no {' or '.join(names)}")


def read_merges(path: str | Path) -> list[tuple[str, str]]:
  """Merges of a GPT-2 style `merges.txt` / `vocab.bpe` (a `#version` line first is skipped)."""
  merges = []
  with Path(path).open(encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      line = line.rstrip("\r\n")
      if not line or (number == 1 and line.startswith("#version")):
        continue
      parts = line.split(" ")
      if len(parts) != 2:
        raise ValueError(f"{path}:{number}: a merge is two tokens and one space, got {line!r}")
      merges.append((parts[0], parts[1]))
  return merges


def read_fairseq_dict(path: str | Path) -> list[str]:
  """fairseq Dictionary symbols from dict.txt: 4 specials, dict.txt words, `<mask>` if missing.

  Follows fairseq's `Dictionary.add_from_file` (one `<word> <count> [#fairseq:overwrite]` a line;
  a repeated word without the flag is an error) and RoBERTa's `dictionary.add_symbol("<mask>")`.
  """
  symbols = list(SPECIAL_TOKENS)
  seen = set(symbols)
  with Path(path).open(encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      line = line.rstrip("\r\n")
      try:
        word, field = line.rsplit(" ", 1)
        overwrite = field == "#fairseq:overwrite"
        if overwrite:
          word, field = word.rsplit(" ", 1)
        int(field)
      except ValueError:
        raise ValueError(
          f"{path}:{number}: expected '<token> <count> [flags]', got {line!r}"
        ) from None
      if word in seen and not overwrite:
        raise ValueError(f"{path}:{number}: duplicate word {word!r} (fairseq refuses it too)")
      seen.add(word)
      symbols.append(word)
  if MASK_TOKEN not in seen:
    symbols.append(MASK_TOKEN)
  return symbols


def load_tokenizer(directory: str | Path) -> BpeTokenizer:
  """Loads vocab.json + merges.txt (+ fairseq dict.txt if present); see the module docstring.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: the special tokens are not at RoBERTa's ids (and there is no dict.txt).
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"Tokenizer directory {directory} not found")
  vocab_path = _find(directory, _VOCAB_FILES)
  with vocab_path.open(encoding="utf-8") as f:
    vocab = {str(k): int(v) for k, v in json.load(f).items()}
  merges = read_merges(_find(directory, _MERGES_FILES))
  if len(set(vocab.values())) != len(vocab) or min(vocab.values(), default=0) < 0:
    raise ValueError(f"{vocab_path}: ids must be distinct and non-negative")

  dict_path = directory / "dict.txt"
  if dict_path.is_file():
    symbols = read_fairseq_dict(dict_path)
    index = {word: i for i, word in enumerate(symbols)}  # the last of repeated words wins
    bpe_to_id = np.full(max(vocab.values()) + 1, UNK, np.int32)
    for gpt2_id in vocab.values():
      bpe_to_id[gpt2_id] = index.get(str(gpt2_id), UNK)
    numbered = {i for i in bpe_to_id.tolist() if i != UNK}
    names = {i: s for i, s in enumerate(symbols) if i not in numbered}
    missing = int((bpe_to_id == UNK).sum())
    if missing:
      logging.warning("%s: %d BPE tokens are not in dict.txt and map to <unk>", dict_path, missing)
    return BpeTokenizer(
      _bpe_tokenizer(vocab, merges),
      vocab_size=len(symbols),
      mask_id=index[MASK_TOKEN],
      symbols=names,
      bpe_to_id=bpe_to_id,
      name=str(directory),
    )

  for i, token in enumerate(SPECIAL_TOKENS):
    if vocab.get(token) != i:
      raise ValueError(
        f"{vocab_path}: {token} must have id {i} (RoBERTa ids), got {vocab.get(token)}. A GPT-2 "
        "encoder.json (fairseq gpt2_bpe) needs the checkpoint's fairseq dict.txt next to it."
      )
  vocab_size = max(vocab.values()) + 1
  mask_id = vocab.get(MASK_TOKEN)
  if mask_id is None:
    mask_id, vocab_size = vocab_size, vocab_size + 1
    logging.info("%s has no %s: appended at id %d", vocab_path, MASK_TOKEN, mask_id)
  if len(vocab) + (MASK_TOKEN not in vocab) != vocab_size:
    logging.warning("%s: ids have gaps (%d tokens, %d ids)", vocab_path, len(vocab), vocab_size)
  names = {i: t for i, t in enumerate(SPECIAL_TOKENS)} | {mask_id: MASK_TOKEN}
  return BpeTokenizer(
    _bpe_tokenizer(vocab, merges),
    vocab_size=vocab_size,
    mask_id=mask_id,
    symbols=names,
    name=str(directory),
  )


def load_embedded_tokenizer() -> BpeTokenizer:
  """The tokenizer trained on the embedded corpus's train split (`data/text/tokenizer`)."""
  return load_tokenizer(EMBEDDED_TOKENIZER_DIR)


def _input_files(path: Path) -> list[Path]:
  if path.is_file():
    return [path]
  if path.is_dir():
    files = sorted(
      p
      for p in path.rglob("*")
      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
      raise FileNotFoundError(f"No files under {path}")
    return files
  raise FileNotFoundError(f"Training input {path} is neither a file nor a folder")


def _training_texts(inputs, stats: text_corpus.TextStats) -> Iterator[str]:
  if isinstance(inputs, str | Path):
    inputs = _input_files(Path(inputs))
  for item in inputs:
    if isinstance(item, Path):
      yield from (line for line in text_corpus.iter_text_lines(item, stats) if line)
    elif isinstance(item, bytes | bytearray):
      yield text_corpus.decode_utf8(bytes(item), stats)
    elif isinstance(item, str):
      if item:
        yield item
    else:
      raise TypeError(f"Training texts must be str, bytes or Path, got {type(item).__name__}")


def train_tokenizer(
  inputs: str | Path | Iterable[str | bytes | Path],
  vocab_size: int,
  out_dir: str | Path,
  *,
  min_frequency: int = 2,
) -> BpeTokenizer:
  """Trains a byte-level BPE, writes `vocab.json` + `merges.txt` to out_dir and loads it.

  Args:
    inputs: a file or a folder (every non-hidden file under it; `.gz` files are decompressed),
      given as str or Path; or an iterable of texts (str or bytes) or of file Paths. Files are
      read a line at a time (blank lines skipped, invalid UTF-8 replaced and counted).
    vocab_size: ids in all, specials and `<mask>` included (at least 261). A corpus too small to
      learn that many merges gives a smaller vocabulary (logged).
    out_dir: created if missing; existing vocab.json / merges.txt are replaced.
    min_frequency: a pair must occur this often to be merged.
  """
  if vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (bytes + specials)")
  out_dir = Path(out_dir)
  if (out_dir / "dict.txt").exists():
    raise ValueError(f"{out_dir} holds a fairseq dict.txt, which would remap the new ids")
  stats = text_corpus.TextStats()
  num_texts = 0

  def texts() -> Iterator[str]:  # streamed: the corpus need not fit in memory
    nonlocal num_texts
    for text in _training_texts(inputs, stats):
      if text.strip():
        num_texts += 1
        yield text

  bpe = _bpe_tokenizer({}, [])
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size - 1,  # <mask> comes last
    min_frequency=min_frequency,
    special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  bpe.train_from_iterator(texts(), trainer=trainer)
  if not num_texts:
    raise ValueError("No text to train the tokenizer on")
  if stats.invalid_utf8_lines:
    logging.warning("%d training lines had invalid UTF-8 (replaced)", stats.invalid_utf8_lines)

  out_dir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    bpe.model.save(tmp)
    vocab = json.loads((Path(tmp) / "vocab.json").read_text(encoding="utf-8"))
    merges = (Path(tmp) / "merges.txt").read_text(encoding="utf-8")
  for i, token in enumerate(SPECIAL_TOKENS):
    assert vocab[token] == i, (token, vocab[token])
  vocab[MASK_TOKEN] = len(vocab)
  if len(vocab) < vocab_size:
    logging.warning("Learned %d ids, not %d: the corpus is too small", len(vocab), vocab_size)
  ordered = dict(sorted(vocab.items(), key=lambda item: item[1]))
  (out_dir / "vocab.json").write_text(
    json.dumps(ordered, ensure_ascii=False, indent=0) + "\n", encoding="utf-8"
  )
  (out_dir / "merges.txt").write_text(merges, encoding="utf-8")
  return load_tokenizer(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m d2v_jax.data.tokenizer", description="Byte-level BPE with RoBERTa ids."
  )
  commands = parser.add_subparsers(dest="command", required=True)
  train = commands.add_parser("train", help="train on text files, write vocab.json + merges.txt")
  train.add_argument("--input", required=True, help="a text file (.gz too) or a folder of them")
  train.add_argument("--vocab_size", type=int, required=True, help="ids in all, with specials")
  train.add_argument("--out", required=True, help="output directory")
  train.add_argument("--min_frequency", type=int, default=2)
  encode = commands.add_parser("encode", help="print the ids of each line of stdin")
  encode.add_argument("--tokenizer", default=str(EMBEDDED_TOKENIZER_DIR), help="directory")
  args = parser.parse_args(argv)

  if args.command == "train":
    if not Path(args.input).exists():
      parser.error(f"--input={args.input} does not exist")
    if args.vocab_size < MIN_VOCAB_SIZE:
      parser.error(f"--vocab_size must be at least {MIN_VOCAB_SIZE}, got {args.vocab_size}")
    try:
      tok = train_tokenizer(args.input, args.vocab_size, args.out, min_frequency=args.min_frequency)
    except (FileNotFoundError, ValueError) as e:
      parser.error(str(e))
    print(f"Wrote {args.out}/vocab.json and merges.txt: vocab_size {tok.vocab_size}")
  else:
    tok = load_tokenizer(args.tokenizer)
    for line in sys.stdin.buffer:
      print(" ".join(map(str, tok.encode(line.rstrip(b"\r\n")))))
  return 0


if __name__ == "__main__":
  sys.exit(main())
