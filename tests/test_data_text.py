"""Tests for the text pretraining pipeline (d2v_jax/data/text.py) and its sources.

Most tests use `NumberTokenizer`: a sentence "10 11 12" is the tokens [10, 11, 12], so blocks can
be computed by hand. The last ones run the embedded corpus with the committed tokenizer.
"""

import logging
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from d2v_jax.data import (
  encode_for_probe,
  make_text_pretrain_dataset,
  make_text_source,
  text,
  text_corpus,
  tokenizer,
)

BOS, PAD, EOS = 0, 1, 2


class NumberTokenizer:
  """Words that are numbers are their own ids; any other word gives no token."""

  vocab_size = 1000
  mask_id = 999

  def encode(self, sentence: str) -> list[int]:
    return [int(word) for word in sentence.split() if word.isdigit()]


def _input_cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(
    source="embedded",
    path="",
    split="train",
    tfds_data_dir="",
    tfds_feature="text",
    tokenizer="",
    max_length=8,
    batch_size=4,
    num_workers=0,
  )
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _numbers_dataset(folder, seed=0, **overrides):
  cfg = _input_cfg(source="folder", path=str(folder), **overrides)
  return make_text_pretrain_dataset(cfg, seed=seed, tokenizer=NumberTokenizer())


def _row(content: list[int], length: int = 8) -> tuple[int, ...]:
  return tuple([BOS, *content, EOS] + [PAD] * (length - len(content) - 2))


# ---------------------------------------------------------------------------------------------
# Packing (complete_doc), by hand.

# Two files, three documents; L = 8, so at most 6 content tokens a block.
FILE_A = """10 11 12
20 21 22 23
30 31
40 41

   \t
50 51
60 61 62 63 64 65 66
"""
FILE_B = """70
80 81 82 83 84 85 86 87 88
90
x
91 92 93
94 95 96
"""
EXPECTED_BLOCKS = [
  [10, 11, 12],  # + 20..23 would be 7
  [20, 21, 22, 23, 30, 31],
  [40, 41],  # document ends (50 51 would fit)
  [50, 51],  # an over-long sentence closes the block ...
  [60, 61, 62, 63, 64, 65],  # ... and is cut into pieces of 6
  [66],  # the file, so the document, ends (70 would fit)
  [70],
  [80, 81, 82, 83, 84, 85],
  [86, 87, 88],  # the last piece is a block of its own (90 would fit)
  [90, 91, 92, 93],  # "x" tokenizes to nothing
  [94, 95, 96],
]


@pytest.fixture
def numbers_folder(tmp_path):
  (tmp_path / "a.txt").write_text(FILE_A)
  (tmp_path / "b.txt").write_text(FILE_B)
  return tmp_path


def test_complete_doc_packing_by_hand(numbers_folder):
  ds = _numbers_dataset(numbers_folder, batch_size=len(EXPECTED_BLOCKS))
  assert ds.batches_per_epoch == 1 and ds.max_length == 8
  stats = ds.stats
  assert (stats.files, stats.documents, stats.sentences) == (2, 3, 12)
  assert (stats.blank_lines, stats.overlong_sentences, stats.untokenized_sentences) == (2, 2, 1)
  assert stats.blocks == len(EXPECTED_BLOCKS)
  assert stats.tokens == sum(len(b) for b in EXPECTED_BLOCKS) == 37
  assert ds.mean_fill == pytest.approx(37 / (11 * 6))

  batch = ds.batches[0]
  tokens, mask = batch["tokens"], batch["padding_mask"]
  assert tokens.shape == mask.shape == (11, 8)
  assert tokens.dtype == np.int32 and mask.dtype == bool
  assert sorted(map(tuple, tokens.tolist())) == sorted(_row(b) for b in EXPECTED_BLOCKS)
  for row, row_mask in zip(tokens, mask):
    np.testing.assert_array_equal(row_mask, row == PAD)  # no <pad> inside a block
  # The epoch is shuffled: the rows are not in stream order.
  assert [tuple(r) for r in tokens.tolist()] != [_row(b) for b in EXPECTED_BLOCKS]


def test_pack_complete_doc_bounds():
  lengths = np.array([3, 4, 2, 2, 2, 7, 1, 9, 1, 0, 3, 3])
  bounds, overlong = text.pack_complete_doc(lengths, np.array([0, 4, 6]), block_size=6)
  np.testing.assert_array_equal(bounds, [0, 3, 9, 11, 13, 19, 20, 21, 27, 30, 34, 37])
  assert overlong == 2
  # A block of 1 cuts every sentence to single tokens; one document can fill a block exactly.
  bounds, overlong = text.pack_complete_doc(np.array([2, 1]), np.array([0]), block_size=1)
  np.testing.assert_array_equal(bounds, [0, 1, 2, 3])
  assert overlong == 1
  bounds, _ = text.pack_complete_doc(np.array([2, 4]), np.array([0]), block_size=6)
  np.testing.assert_array_equal(bounds, [0, 6])


def test_encode_for_probe_truncates_and_pads():
  tokens, mask = encode_for_probe(["5 6", " 7 8 9 10 11 12 13 ", "x"], NumberTokenizer(), 6)
  np.testing.assert_array_equal(
    tokens, [[0, 5, 6, 2, 1, 1], [0, 7, 8, 9, 10, 2], [0, 2, 1, 1, 1, 1]]
  )
  np.testing.assert_array_equal(mask, tokens == PAD)
  assert tokens.dtype == np.int32 and mask.dtype == bool
  with pytest.raises(ValueError, match="max_length must be at least 3"):
    encode_for_probe(["5"], NumberTokenizer(), 2)


# ---------------------------------------------------------------------------------------------
# Batches: determinism, epochs, resume, processes.


@pytest.fixture
def long_numbers_folder(tmp_path):
  """40 documents of 1..5 sentences of 1..4 tokens, ids 4..503."""
  rng = np.random.default_rng(0)
  lines = []
  next_id = 4
  for _ in range(40):
    for _ in range(rng.integers(1, 6)):
      n = int(rng.integers(1, 5))
      lines.append(" ".join(str(i % 500 + 4) for i in range(next_id, next_id + n)))
      next_id += n
    lines.append("")
  (tmp_path / "corpus.txt").write_text("\n".join(lines))
  return tmp_path


def test_same_index_same_batch_other_seed_or_epoch_differs(long_numbers_folder):
  def batches(seed, start=0, n=3):
    ds = _numbers_dataset(long_numbers_folder, seed=seed)
    return [ds.batches[start + i]["tokens"] for i in range(n)], ds.batches_per_epoch

  first, per_epoch = batches(seed=1)
  assert per_epoch >= 6
  again, _ = batches(seed=1)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  other_seed, _ = batches(seed=2)
  next_epoch, _ = batches(seed=1, start=per_epoch)
  for other in (other_seed, next_epoch):
    assert all(not np.array_equal(a, b) for a, b in zip(first, other))


def test_an_epoch_uses_every_block_at_most_once(long_numbers_folder):
  ds = _numbers_dataset(long_numbers_folder, batch_size=5)
  per_epoch = ds.batches_per_epoch
  assert per_epoch == ds.stats.blocks // 5
  for epoch in range(2):
    rows = np.concatenate([ds.batches[epoch * per_epoch + i]["tokens"] for i in range(per_epoch)])
    firsts = rows[:, 1].tolist()  # token ids are unique, so a block's first token names it
    assert len(set(firsts)) == len(firsts) == per_epoch * 5


@pytest.mark.parametrize("num_workers", [0, 1])
def test_iterator_resumes_exactly_from_its_state(long_numbers_folder, num_workers):
  ds = _numbers_dataset(long_numbers_folder, num_workers=num_workers)
  per_epoch = ds.batches_per_epoch
  iterator = iter(ds)
  for _ in range(per_epoch - 2):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]  # crosses into the next epoch
  iterator.close()
  resumed = iter(_numbers_dataset(long_numbers_folder, num_workers=num_workers))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_array_equal(got["padding_mask"], want["padding_mask"])
  resumed.close()
  np.testing.assert_array_equal(expected[-1]["tokens"], ds.batches[per_epoch + 1]["tokens"])


def test_process_rows_concatenate_to_the_global_batch(long_numbers_folder):
  whole = _numbers_dataset(long_numbers_folder)
  parts = [
    make_text_pretrain_dataset(
      _input_cfg(source="folder", path=str(long_numbers_folder)),
      seed=0,
      process_index=p,
      process_count=2,
      tokenizer=NumberTokenizer(),
    )
    for p in range(2)
  ]
  for index in (0, 1, whole.batches_per_epoch + 3):
    halves = [part.batches[index] for part in parts]
    assert halves[0]["tokens"].shape == (2, 8)
    for key in ("tokens", "padding_mask"):
      np.testing.assert_array_equal(
        np.concatenate([h[key] for h in halves]), whole.batches[index][key]
      )
  with pytest.raises(ValueError, match="batch_size=4.*process_count=3"):
    make_text_pretrain_dataset(_input_cfg(), seed=0, process_count=3, tokenizer=NumberTokenizer())


# ---------------------------------------------------------------------------------------------
# Folder source.


def test_folder_source_reads_nested_files_and_counts_bad_input(tmp_path, caplog):
  (tmp_path / "a.txt").write_bytes(b"Hello\n\n  \n world \r\nagain\n")
  deeper = tmp_path / "sub" / "deeper"
  deeper.mkdir(parents=True)
  (deeper / "b.TXT").write_bytes(b"caf\xe9 ok\nfine\n")
  (tmp_path / "sub" / "empty.txt").write_bytes(b"")
  (tmp_path / "sub" / "blank.txt").write_bytes(b"\n  \n\n")
  (tmp_path / "notes.md").write_text("not a text file")
  (tmp_path / ".hidden.txt").write_text("hidden")
  (tmp_path / ".git").mkdir()
  (tmp_path / ".git" / "x.txt").write_text("hidden too")
  (tmp_path / "folder.txt").mkdir()  # a directory with a .txt name is no file
  os.symlink(tmp_path / "nowhere.txt", tmp_path / "dangling.txt")

  with caplog.at_level(logging.WARNING):
    source = make_text_source(_input_cfg(source="folder", path=str(tmp_path)))
  assert source[0] == ["Hello"] and source[1] == ["world", "again"]
  assert source[2] == ["caf\ufffd ok", "fine"]
  assert len(source) == 3
  assert source.describe(1) == f"{tmp_path / 'a.txt'}:4"
  assert source.describe(2) == f"{deeper / 'b.TXT'}:1"
  stats = source.stats
  assert (stats.files, stats.unreadable_files, stats.empty_files) == (5, 1, 2)
  assert (stats.documents, stats.sentences) == (3, 5)
  assert stats.blank_lines == 2 + 3 and stats.non_utf8_lines == 1
  messages = [r.getMessage() for r in caplog.records]
  assert any(str(deeper / "b.TXT") in m and "UTF-8" in m for m in messages)
  assert any(str(tmp_path / "dangling.txt") in m and "unreadable" in m for m in messages)
  assert any(str(tmp_path / "sub" / "empty.txt") in m for m in messages)


def test_folder_source_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.input.path"):
    make_text_source(_input_cfg(source="folder", path=str(tmp_path / "nowhere")))
  with pytest.raises(ValueError, match=r"No \.txt files.*config.input.path"):
    make_text_source(_input_cfg(source="folder", path=str(tmp_path)))
  (tmp_path / "blank.txt").write_text("\n \n")
  with pytest.raises(ValueError, match="no usable text.*config.input.path"):
    make_text_source(_input_cfg(source="folder", path=str(tmp_path)))


def test_config_errors_name_the_field(numbers_folder):
  def build(**overrides):
    make_text_pretrain_dataset(_input_cfg(**overrides), seed=0, tokenizer=NumberTokenizer())

  with pytest.raises(ValueError, match="Unknown config.input.source 'web'"):
    build(source="web")
  with pytest.raises(ValueError, match="config.input.path is required for source='folder'"):
    build(source="folder")
  with pytest.raises(ValueError, match="config.input.path='x' is not used"):
    build(path="x")
  with pytest.raises(ValueError, match="config.input.split='dev'"):
    build(split="dev")
  with pytest.raises(ValueError, match="config.input.max_length=2"):
    build(max_length=2)
  with pytest.raises(ValueError, match="config.input.batch_size=0"):
    build(batch_size=0)
  with pytest.raises(ValueError, match="11 blocks.*batch of 12.*config.input.batch_size"):
    build(source="folder", path=str(numbers_folder), batch_size=12)
  with pytest.raises(FileNotFoundError, match="config.input.tokenizer"):
    make_text_pretrain_dataset(_input_cfg(tokenizer=str(numbers_folder / "nope")), seed=0)


# ---------------------------------------------------------------------------------------------
# TFDS (ArrayRecord, written and read without TensorFlow).

TFDS_RECORDS = [
  {
    "text": "1 2\n\n3",
    "raw": b"4 \xff5\r\n6",
    "sentences": ["7 8", "  ", "9\n10"],
    "lines": [b"11", b"12"],
  },
  {"text": "   ", "raw": b"", "sentences": [], "lines": []},
  {"text": "13", "raw": "14", "sentences": ["15"], "lines": [b"16\n"]},
]


class TinyTextDocsForTest(tfds.core.GeneratorBasedBuilder):
  """A tiny TFDS text dataset, one feature per supported kind (module level, picklable)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = {
      "text": tfds.features.Text(),
      "raw": tfds.features.Tensor(shape=(), dtype=np.object_),
      "sentences": tfds.features.Sequence(tfds.features.Text()),
      "lines": tfds.features.Tensor(shape=(None,), dtype=np.object_),
      "id": tfds.features.Tensor(shape=(), dtype=np.int64),
    }
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, record in enumerate(TFDS_RECORDS):
      yield i, {**record, "id": i}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds_text")
  TinyTextDocsForTest(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def _tfds_cfg(tfds_dir, feature, **overrides):
  fields = dict(source="tfds", path="tiny_text_docs_for_test", tfds_data_dir=str(tfds_dir))
  return _input_cfg(**(fields | {"tfds_feature": feature} | overrides))


@pytest.mark.parametrize(
  "feature, documents, blank, non_utf8",
  [
    ("text", {0: ["1 2", "3"], 2: ["13"]}, 2, 0),
    ("raw", {0: ["4 \ufffd5", "6"], 2: ["14"]}, 1, 1),
    ("sentences", {0: ["7 8", "9", "10"], 2: ["15"]}, 1, 0),
    ("lines", {0: ["11", "12"], 2: ["16"]}, 1, 0),
  ],
)
def test_tfds_text_features(tfds_dir, feature, documents, blank, non_utf8):
  source = make_text_source(_tfds_cfg(tfds_dir, feature))
  assert len(source) == 2
  ids = [source.data[r]["id"] for r in source.records]  # TFDS shuffles the records
  assert {i: source[k] for k, i in enumerate(ids)} == documents
  stats = source.stats
  assert (stats.documents, stats.empty_documents) == (2, 1)
  assert stats.sentences == sum(len(d) for d in documents.values())
  assert (stats.blank_lines, stats.non_utf8_lines) == (blank, non_utf8)
  assert "tiny_text_docs_for_test" in source.describe(0)


def test_tfds_pipeline_and_errors(tfds_dir, tmp_path):
  ds = make_text_pretrain_dataset(
    _tfds_cfg(tfds_dir, "sentences", batch_size=2), seed=0, tokenizer=NumberTokenizer()
  )
  assert ds.batches_per_epoch == 1
  assert sorted(map(tuple, ds.batches[0]["tokens"].tolist())) == [_row([7, 8, 9, 10]), _row([15])]
  with pytest.raises(ValueError, match="'id'.*config.input.tfds_feature"):
    make_text_source(_tfds_cfg(tfds_dir, "id"))
  with pytest.raises(ValueError, match="no 'body' feature.*config.input.tfds_feature"):
    make_text_source(_tfds_cfg(tfds_dir, "body"))
  with pytest.raises(FileNotFoundError, match="'no_such_text'.*config.input.path"):
    make_text_source(_tfds_cfg(tfds_dir, "text", path="no_such_text"))
  with pytest.raises(FileNotFoundError, match="config.input.tfds_data_dir"):
    make_text_source(_tfds_cfg(tmp_path / "nowhere", "text"))


# ---------------------------------------------------------------------------------------------
# The embedded corpus with the committed tokenizer.


@pytest.fixture(scope="module")
def embedded_128():
  cfg = _input_cfg(max_length=128, batch_size=16)
  return make_text_pretrain_dataset(cfg, seed=0)


def test_embedded_corpus_through_the_pipeline(embedded_128):
  ds = embedded_128
  tok = ds.tokenizer
  corpus = text_corpus.load_embedded_corpus("train")
  assert ds.stats.documents == len(corpus.documents)
  assert ds.stats.sentences == corpus.num_verses
  assert ds.stats.blank_lines == ds.stats.non_utf8_lines == ds.stats.empty_documents == 0
  assert ds.stats.blocks == len(ds.blocks) and ds.batches_per_epoch == len(ds.blocks) // 16
  assert 0.7 < ds.mean_fill < 1  # verses are short next to 126 tokens
  for index in (0, 7, ds.batches_per_epoch + 2):
    batch = ds.batches[index]
    tokens, mask = batch["tokens"], batch["padding_mask"]
    assert tokens.shape == mask.shape == (16, 128)
    assert tokens.dtype == np.int32 and mask.dtype == bool
    assert tokens.min() >= 0 and tokens.max() < tok.vocab_size
    assert (tokens[:, 0] == tokenizer.BOS).all()
    valid = (~mask).sum(axis=1)
    np.testing.assert_array_equal(mask, np.arange(128) >= valid[:, None])
    for row, n in zip(tokens, valid):
      assert 3 <= n <= 128 and row[n - 1] == tokenizer.EOS
      assert (row[:n] == tokenizer.EOS).sum() == 1 and (row[n:] == tokenizer.PAD).all()
      assert not np.isin(row[1 : n - 1], tok.special_ids).any()
  # A row decodes to consecutive verses of one chapter (joined without a separator).
  chapters = ["".join(document) for document in corpus.documents]
  for row in ds.batches[0]["tokens"][:4]:
    decoded = tok.decode(row)
    assert any(decoded in chapter for chapter in chapters)
    assert any(decoded.startswith(verse) for verse in corpus.verses)


def test_embedded_blocks_never_cross_chapters(embedded_128):
  ds = embedded_128
  tok = ds.tokenizer
  corpus = text_corpus.load_embedded_corpus("train")
  # The first 100 chapters (re-tokenizing all takes seconds): the stream holds their verses in
  # order, and each chapter ends where a block ends.
  encoded = [tok.encode_batch(document) for document in corpus.documents[:100]]
  stream = np.concatenate([np.concatenate(document) for document in encoded])
  np.testing.assert_array_equal(ds.blocks.stream[: len(stream)], stream)
  doc_ends = np.cumsum([sum(len(x) for x in document) for document in encoded])
  assert np.isin(doc_ends, ds.blocks.bounds).all()
  assert ds.stats.tokens == len(ds.blocks.stream) == ds.blocks.bounds[-1]
  assert ds.blocks.lengths().max() <= 126 and ds.blocks.lengths().min() >= 1


def test_probe_encoding_of_the_embedded_verses(embedded_128):
  probe = text_corpus.load_embedded_probe_set("test")
  texts = probe.texts[:64]
  tokens, mask = encode_for_probe(texts, embedded_128.tokenizer, 32)
  assert tokens.shape == mask.shape == (64, 32)
  valid = (~mask).sum(axis=1)
  assert (tokens[:, 0] == BOS).all() and (tokens[np.arange(64), valid - 1] == EOS).all()
  assert (valid == 32).any() and (valid < 32).any()  # some truncated, some padded
  short = int(np.argmin(valid))
  assert embedded_128.tokenizer.decode(tokens[short]) == texts[short]
