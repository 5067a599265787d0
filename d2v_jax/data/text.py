"""Text pretraining input pipeline (data2vec v1 text = RoBERTa's data, spec §1.1 and §1.5).

Batches are `{"tokens": int32[b, L], "padding_mask": bool[b, L]}` (mask True at PADDED positions,
the fairseq convention; L = `config.input.max_length`, 512 for base). Every row is one block
`<s> t_1 ... t_n </s> <pad> ...` with 1 <= n <= L - 2 (ids: `<s>` 0, `<pad>` 1, `</s>` 2).

Packing (fairseq `TokenBlockDataset`, `break_mode="complete_doc"`, as RoBERTa and data2vec text):
every sentence (line) of the source is tokenized once at start-up; then, document by document,
blocks are filled greedily with whole consecutive sentences of that document while they fit in
L - 2 tokens. A block never crosses a document boundary. A sentence longer than L - 2 tokens closes
the current block and is cut into pieces of L - 2 tokens (the last one shorter), each its own block
(counted in `stats.overlong_sentences`); fairseq would instead emit it as one over-long block.
Unlike fairseq's binarised data, whose every line ends in `</s>` (a fairseq block reads
`<s> s1 </s> s2 </s>`), sentences here are concatenated without a separator: a block has exactly
one `</s>`, at its end.

Tokenizing everything at start-up keeps the whole corpus as token ids in memory (4 bytes a token,
plus the source's sentences while they are read) and takes one pass of the tokenizer over it:
about 250k tokens/s with the byte-level BPE on 2 CPU cores, so seconds for the embedded corpus
(~0.8M tokens) and about a quarter of an hour per GB of text. Fine for moderate corpora; one of
RoBERTa's size (160 GB) needs an offline binarisation step instead.

Blocks are the records. Each epoch shuffles them (seed from `(seed, epoch)`) and cuts them into
full global batches (the remainder is dropped). A `grain.MapDataset` over global batch indices
0, 1, 2, ... (epoch after epoch, without end) assembles the rows of a batch from the token ids:
a batch is a pure function of its index, and a grain iterator restored with `set_state` continues
exactly. Masking is not done here: the train step draws masks (spec §1.2).

Multi-process: process p of P takes rows [p*b, (p+1)*b) of every global batch (b = batch/P), so
the processes together see each global batch exactly once. Every process must use the same seed.
"""

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import grain
import numpy as np
from absl import logging

from d2v_jax.data import batching, text_sources
from d2v_jax.data import tokenizer as tokenizer_lib
from d2v_jax.data.tokenizer import BOS, EOS, PAD  # RoBERTa's ids: <s> 0, <pad> 1, </s> 2

# Assembling a batch is a few copies; two threads keep a handful of batches ready.
_READ_THREADS = 2
_PREFETCH_BATCHES = 8
_ENCODE_CHUNK = 50_000  # sentences per `encode_batch` call (and per progress line)


class Tokenizer(Protocol):
  """What the pipeline needs: `encode(text) -> ids` without special tokens, and the vocab size."""

  vocab_size: int

  def encode(self, text: str) -> list[int]: ...


def load_tokenizer_for(input_cfg) -> Tokenizer:
  """The tokenizer `config.input.tokenizer` names: a directory, or "" for the embedded one."""
  path = input_cfg.get("tokenizer", "")
  if not path:
    return tokenizer_lib.load_embedded_tokenizer()
  if not Path(path).is_dir():
    raise FileNotFoundError(
      f"Tokenizer directory {path} not found (config.input.tokenizer; leave it empty for the "
      "embedded tokenizer)"
    )
  return tokenizer_lib.load_tokenizer(path)


def tokenize(sentences: Sequence[str], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of every sentence (no special tokens), laid end to end.

  Uses `tokenizer.encode_batch` when there is one, a chunk of sentences at a time (only the
  chunk's ids are held as Python lists).

  Returns:
    (int64[S] tokens of every sentence, int32[sum of those] the ids, sentence after sentence).
  """
  encode_batch = getattr(tokenizer, "encode_batch", None)
  lengths, streams = [], []
  for start in range(0, len(sentences), _ENCODE_CHUNK):
    chunk = list(sentences[start : start + _ENCODE_CHUNK])
    ids = encode_batch(chunk) if encode_batch else [tokenizer.encode(s) for s in chunk]
    counts = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    lengths.append(counts)
    streams.append(np.fromiter((t for x in ids for t in x), np.int32, int(counts.sum())))
    if len(sentences) > _ENCODE_CHUNK:
      logging.info("Tokenized %d of %d sentences", start + len(chunk), len(sentences))
  if not lengths:
    return np.zeros(0, np.int64), np.zeros(0, np.int32)
  return np.concatenate(lengths), np.concatenate(streams)


def pack_complete_doc(
  lengths: np.ndarray, doc_starts: np.ndarray, block_size: int
) -> tuple[np.ndarray, int]:
  """Block boundaries of fairseq's `complete_doc` packing, over the concatenated sentences.

  Sentences are laid end to end in one token stream (documents in order); every block is a
  contiguous slice of it, so blocks are given by their boundaries.

  Args:
    lengths: int[S] tokens of every sentence, documents one after another.
    doc_starts: int[D] index of the first sentence of every document (increasing, starting at 0).
    block_size: most tokens in a block (L - 2).

  Returns:
    (int64[num_blocks + 1] offsets into the stream, block k = [bounds[k], bounds[k+1]), non-empty;
    number of sentences longer than `block_size`, each cut into pieces of `block_size`).
  """
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}")
  bounds = [0]
  overlong = 0
  pos = 0  # end of the tokens placed so far
  doc_ends = list(doc_starts[1:]) + [len(lengths)]
  for first, end in zip(doc_starts, doc_ends):
    for n in lengths[first:end].tolist():
      if n == 0:
        continue
      if n > block_size:  # close the open block, then one block per piece
        overlong += 1
        if pos > bounds[-1]:
          bounds.append(pos)
        for piece in range(0, n, block_size):
          pos += min(block_size, n - piece)
          bounds.append(pos)
        continue
      if pos + n - bounds[-1] > block_size:
        bounds.append(pos)
      pos += n
    if pos > bounds[-1]:  # a document ends its last block
      bounds.append(pos)
  return np.asarray(bounds, np.int64), overlong


def assemble_rows(
  stream: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_length: int
) -> dict[str, np.ndarray]:
  """Rows `<s> stream[start:end] </s> <pad>...`, one per (start, end).

  Args:
    stream: int32[T] the token stream.
    starts, ends: int[b] the slice of `stream` of every row; at most L - 2 tokens each.
    max_length: L.

  Returns:
    {"tokens": int32[b, L], "padding_mask": bool[b, L] (True at <pad>)}.
  """
  tokens = np.full((len(starts), max_length), PAD, np.int32)  # [b, L]
  tokens[:, 0] = BOS
  for row, (start, end) in enumerate(zip(starts, ends)):
    n = end - start
    tokens[row, 1 : n + 1] = stream[start:end]
    tokens[row, n + 1] = EOS
  lengths = np.asarray(ends, np.int64) - np.asarray(starts, np.int64) + 2  # [b]
  padding_mask = np.arange(max_length)[None, :] >= lengths[:, None]  # [b, L]
  return {"tokens": tokens, "padding_mask": padding_mask}


def encode_for_probe(
  texts: Sequence[str], tokenizer: Tokenizer, max_length: int
) -> tuple[np.ndarray, np.ndarray]:
  """Each text as one row `<s> ids </s> <pad>...`, for a probe or fine-tuning.

  A text is stripped and tokenized whole (line breaks included); one longer than L - 2 tokens is
  truncated to its first L - 2, so that every row ends in `</s>`.

  Returns:
    (int32[N, L] tokens, bool[N, L] padding_mask, True at <pad>).
  """
  if max_length < 3:
    raise ValueError(f"max_length must be at least 3 (<s>, a token, </s>), got {max_length}")
  lengths, stream = tokenize([t.strip() for t in texts], tokenizer)
  starts = np.cumsum(lengths) - lengths
  ends = starts + np.minimum(lengths, max_length - 2)
  rows = assemble_rows(stream, starts, ends, max_length)
  return rows["tokens"], rows["padding_mask"]


@dataclasses.dataclass(frozen=True)
class PackedBlocks:
  """Every block of a corpus: the token stream and the boundaries of the blocks in it."""

  stream: np.ndarray  # int32[T]
  bounds: np.ndarray  # int64[num_blocks + 1]

  def __len__(self) -> int:
    return len(self.bounds) - 1

  def lengths(self) -> np.ndarray:
    """int64[num_blocks] content tokens of every block."""
    return np.diff(self.bounds)


def pack_source(
  source: text_sources.TextSource, tokenizer: Tokenizer, max_length: int
) -> PackedBlocks:
  """Tokenizes every sentence of `source` and packs them (`pack_complete_doc`, L - 2 a block).

  Fills the pipeline counters of `source.stats` (blocks, tokens, over-long and untokenized
  sentences).
  """
  sentences: list[str] = []
  doc_sizes = np.empty(len(source), np.int64)
  for i in range(len(source)):
    document = source[i]
    sentences.extend(document)
    doc_sizes[i] = len(document)
  lengths, stream = tokenize(sentences, tokenizer)
  del sentences
  doc_starts = np.concatenate([[0], np.cumsum(doc_sizes)[:-1]])
  bounds, overlong = pack_complete_doc(lengths, doc_starts, max_length - 2)
  stats = source.stats
  stats.blocks = len(bounds) - 1
  stats.tokens = len(stream)
  stats.overlong_sentences = overlong
  stats.untokenized_sentences = int((lengths == 0).sum())
  if overlong:
    logging.warning(
      "%s: %d sentences longer than %d tokens were cut into blocks of %d",
      source.name,
      overlong,
      max_length - 2,
      max_length - 2,
    )
  if stats.untokenized_sentences:
    logging.warning(
      "%s: dropped %d sentences that tokenize to nothing",
      source.name,
      stats.untokenized_sentences,
    )
  return PackedBlocks(stream, bounds)


class LoadTextBatch(grain.transforms.Map):
  """Global batch index -> this process's rows of that batch. Module level and picklable."""

  def __init__(self, blocks: PackedBlocks, plan: batching.EpochPlan, rows: slice, max_length: int):
    self.blocks = blocks
    self.plan = plan
    self.rows = rows
    self.max_length = max_length

  def map(self, element: int) -> dict[str, np.ndarray]:
    _, records = self.plan.batch(element)
    records = records[self.rows]  # [b]
    bounds = self.blocks.bounds
    return assemble_rows(self.blocks.stream, bounds[records], bounds[records + 1], self.max_length)


@dataclasses.dataclass(frozen=True)
class TextPretrainDataset:
  """The training input: iterate it for batches; checkpoint the iterator with orbax.

  Attributes:
    batches: random access, global batch index (across epochs) -> this process's batch.
    iter_dataset: `batches` as an (infinite) grain IterDataset; `iter()` of it is a
      `grain.DatasetIterator` whose `get_state()`/`set_state()` resume exactly.
    stats: what the source kept and dropped, and how it packed.
    batches_per_epoch: global batches per pass over the blocks.
    max_length: L, the length of every row.
    tokenizer: the tokenizer used (its `vocab_size` and `<mask>` id are the model's).
    blocks: the packed corpus.
  """

  batches: grain.MapDataset
  iter_dataset: grain.IterDataset
  stats: text_sources.TextDataStats
  batches_per_epoch: int
  max_length: int
  tokenizer: Tokenizer
  blocks: PackedBlocks

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.iter_dataset)

  @property
  def mean_fill(self) -> float:
    """Content tokens / (blocks x (L - 2)): how full the blocks are."""
    return self.stats.tokens / max(1, self.stats.blocks * (self.max_length - 2))


def make_text_pretrain_dataset(
  input_cfg,
  *,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  tokenizer: Tokenizer | None = None,
) -> TextPretrainDataset:
  """The pretraining pipeline that `config.input` describes.

  Args:
    input_cfg: `config.input`, with the fields
      source: embedded | folder | tfds (`text_sources`);
      path: the folder, or the TFDS dataset name (empty for embedded);
      split: embedded: train | test | all; TFDS: a split spec such as "train[:1%]";
      tfds_data_dir: where TFDS finds the prepared dataset ("" for its default);
      tfds_feature: the TFDS text feature (default "text");
      tokenizer: a tokenizer directory, or "" for the embedded one (unused if `tokenizer` given);
      max_length: L, tokens per row including <s> and </s> (at least 3; 512 for base);
      batch_size: the global batch (rows);
      num_workers: grain worker processes (0: threads in this process).
    seed: data seed (non-negative), the same on every process.
    process_index: this process (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).
    tokenizer: the tokenizer to use instead of loading `input_cfg.tokenizer`.

  Returns:
    The dataset; `iter()` of it yields this process's `batch_size // process_count` rows of
    every global batch.

  Raises:
    ValueError: bad config values, a source without text, or fewer blocks than one global batch.
    FileNotFoundError: the source's path or the tokenizer directory does not exist.
  """
  batch_size = input_cfg.batch_size
  rows = batching.process_rows(batch_size, process_index, process_count)
  max_length = int(input_cfg.max_length)
  if max_length < 3:
    raise ValueError(
      f"config.input.max_length={input_cfg.max_length} must be at least 3 (<s>, a token, </s>)"
    )
  if tokenizer is None:
    tokenizer = load_tokenizer_for(input_cfg)
  source = text_sources.make_text_source(input_cfg)
  blocks = pack_source(source, tokenizer, max_length)
  plan = batching.EpochPlan(len(blocks), batch_size, seed)
  fill = source.stats.tokens / max(1, len(blocks) * (max_length - 2))
  logging.info(
    "%s: %s; %d tokens in %d blocks of <= %d (%.1f%% full) -> %d global batches of %d per epoch",
    source.name,
    text_sources.summarize(source.stats),
    source.stats.tokens,
    len(blocks),
    max_length - 2,
    100 * fill,
    plan.batches_per_epoch,
    batch_size,
  )
  if plan.batches_per_epoch == 0:
    raise ValueError(
      f"{source.name} packs into {len(blocks)} blocks of <= {max_length - 2} tokens, fewer than "
      f"one global batch of {batch_size}: lower config.input.batch_size (or max_length)"
    )

  batches, iter_dataset = batching.endless_batches(
    LoadTextBatch(blocks, plan, rows, max_length),
    num_workers=input_cfg.get("num_workers", 0),
    read_threads=_READ_THREADS,
    prefetch=_PREFETCH_BATCHES,
  )
  return TextPretrainDataset(
    batches, iter_dataset, source.stats, plan.batches_per_epoch, max_length, tokenizer, blocks
  )
