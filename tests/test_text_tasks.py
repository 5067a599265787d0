"""Tests for labelled text (d2v_jax/data/text_tasks.py): GLUE-style rows, labels, batches.

Most tests use `NumberTokenizer` ("10 11 12" -> [10, 11, 12]) on tiny TSV / JSONL files and a
tiny TFDS dataset, so rows can be written by hand; one test runs the embedded verses with the
committed tokenizer.
"""

import logging

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from d2v_jax.data import text, text_corpus
from d2v_jax.data import text_tasks as tt

BOS, PAD, EOS = 0, 1, 2


class NumberTokenizer:
  """Words that are numbers are their own ids; any other word gives no token."""

  vocab_size = 1000

  def encode(self, sentence: str) -> list[int]:
    return [int(word) for word in sentence.split() if word.isdigit()]


def _config(task="classify", **overrides) -> ml_collections.ConfigDict:
  cfg = dict(
    source="tsv",
    path="",
    split="train",
    text_fields=("sentence",),
    label_field="label",
    label_names=(),
    tfds_data_dir="",
    tokenizer="",
    max_length=8,
    batch_size=2,
    eval_batch_size=0,
    max_train_examples=0,
    num_workers=0,
  )
  cfg.update(overrides)
  return ml_collections.ConfigDict(dict(input=cfg, head=dict(task=task)))


def _train(cfg, seed=0, **kwargs):
  return tt.make_text_finetune_dataset(cfg, seed=seed, tokenizer=NumberTokenizer(), **kwargs)


def _eval(cfg, split, **kwargs):
  return tt.text_eval_batches(cfg, split, tokenizer=NumberTokenizer(), **kwargs)


def _row(*fields: list[int], length: int = 8) -> list[int]:
  """<s> a </s> [</s> b </s>] <pad>..., by hand."""
  row = [BOS]
  for i, ids in enumerate(fields):
    row += ([EOS] if i else []) + ids + [EOS]
  return row + [PAD] * (length - len(row))


def _write(path, lines: list[str]) -> None:
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _all_rows(data: tt.LabelledTexts, max_length: int = 8) -> dict[str, np.ndarray]:
  return data.batch(np.arange(len(data)), max_length)


# ---------------------------------------------------------------------------------------------
# Truncation and row layout.


def _longest_first_reference(a: int, b: int, budget: int) -> tuple[int, int]:
  """HF's longest_first, a token at a time: the longer loses one, the second on ties."""
  while a + b > budget:
    if a > b:
      a -= 1
    else:
      b -= 1
  return a, b


def test_truncate_pair_equals_cutting_a_token_at_a_time():
  assert tuple(map(int, tt.truncate_pair(7, 2, 6))) == (4, 2)  # the difference first
  assert tuple(map(int, tt.truncate_pair(5, 5, 7))) == (4, 3)  # ties: the second loses the odd
  assert tuple(map(int, tt.truncate_pair(6, 3, 5))) == (3, 2)  # 6,3 -> 3,3 -> 3,2
  assert tuple(map(int, tt.truncate_pair(2, 3, 9))) == (2, 3)  # fits: nothing cut
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 40, 500), rng.integers(0, 40, 500)
  budgets = rng.integers(1, 60, 500)
  for i in range(500):
    kept = tt.truncate_pair(a[i : i + 1], b[i : i + 1], int(budgets[i]))
    assert (int(kept[0][0]), int(kept[1][0])) == _longest_first_reference(
      int(a[i]), int(b[i]), int(budgets[i])
    )


def test_single_and_pair_rows_by_hand(tmp_path):
  _write(
    tmp_path / "train.tsv",
    [
      "id\tsentence1\tsentence2\tlabel",
      "0\t10 11\t20\t1",
      "1\t10 11 12 13 14 15\t20 21\t0",  # 6 + 2 > 8 - 4: the first loses 4
      "2\t10 11 12\t20 21 22 23\t1",  # 3 + 4: the second loses 2, then the first 1
    ],
  )
  pair = tt.load_labelled_texts(
    _config(path=str(tmp_path), text_fields=("sentence1", "sentence2")), "train", NumberTokenizer()
  )
  rows = _all_rows(pair)
  assert rows["tokens"].dtype == np.int32 and rows["tokens"].shape == (3, 8)
  assert rows["tokens"].tolist() == [
    _row([10, 11], [20]),
    _row([10, 11], [20, 21]),
    _row([10, 11], [20, 21]),
  ]
  np.testing.assert_array_equal(rows["padding_mask"], np.array(rows["tokens"]) == PAD)
  assert rows["label"].tolist() == [1, 0, 1] and rows["label"].dtype == np.int32
  assert (pair.stats.truncated, pair.stats.longest) == (2, 12)

  single = tt.load_labelled_texts(
    _config(path=str(tmp_path), text_fields=("sentence1",)), "train", NumberTokenizer()
  )
  assert _all_rows(single)["tokens"].tolist() == [
    _row([10, 11]),
    _row([10, 11, 12, 13, 14, 15]),  # exactly L - 2: not cut
    _row([10, 11, 12]),
  ]
  assert single.stats.truncated == 0
  with pytest.raises(ValueError, match="config.input.max_length=4 leaves no room"):
    tt.load_labelled_texts(
      _config(path=str(tmp_path), text_fields=("sentence1", "sentence2"), max_length=4),
      "train",
      NumberTokenizer(),
    )


# ---------------------------------------------------------------------------------------------
# Files: labels, bad input, errors.


@pytest.fixture
def names_folder(tmp_path):
  """Labels are names; dev has a name that train lacks on its 3rd line."""
  _write(
    tmp_path / "train.tsv",
    ["sentence\tlabel", "10\tpos", "11\tneg", "12\tpos", "13\tneutral"],
  )
  _write(tmp_path / "dev.tsv", ["label\tsentence", "neg\t20", "pos\t21"])
  _write(tmp_path / "odd.tsv", ["sentence\tlabel", "20\tneg", "21\tpositive"])
  return tmp_path


def test_class_names_come_from_the_train_split(names_folder):
  cfg = _config(path=str(names_folder))
  train = tt.load_labelled_texts(cfg, "train", NumberTokenizer())
  assert train.class_names == ("neg", "neutral", "pos")  # sorted
  assert train.labels.tolist() == [2, 0, 2, 1]
  dev = _eval(cfg, "dev")  # reads train's labels for the mapping; columns in another order
  assert dev.class_names == train.class_names and dev.num_classes == 3
  assert dev.labels.tolist() == [0, 2]
  assert _all_rows(dev.data)["tokens"][:, 1].tolist() == [20, 21]
  with pytest.raises(ValueError, match=r"odd.tsv:3: unknown label 'positive'"):
    _eval(cfg, "odd")
  given = _config(path=str(names_folder), label_names=("pos", "neg", "neutral", "other"))
  assert _eval(given, "dev").labels.tolist() == [1, 0]
  assert _eval(given, "dev").num_classes == 4


def test_integer_labels_and_label_names(tmp_path):
  line = '{{"sentence": "{}", "label": {}}}'.format
  _write(tmp_path / "train.jsonl", [line(10, 2), line(11, '"0"')])
  _write(tmp_path / "dev.jsonl", [line(12, 1.0), line(13, 3)])
  cfg = _config(source="jsonl", path=str(tmp_path))
  train = tt.load_labelled_texts(cfg, "train", NumberTokenizer())
  assert train.class_names == ("0", "1", "2") and train.labels.tolist() == [2, 0]
  with pytest.raises(ValueError, match=r"dev.jsonl:2: label 3 is not a class id in \[0, 3\)"):
    _eval(cfg, "dev")
  named = _config(source="jsonl", path=str(tmp_path), label_names=("a", "b", "c", "d"))
  assert _eval(named, "dev").labels.tolist() == [1, 3]
  _write(tmp_path / "mixed.jsonl", [line(1, 0), line(2, '"x"')])
  mixed = _config(source="jsonl", path=str(tmp_path), split="mixed")  # the train split
  with pytest.raises(ValueError, match=r"mix class names \('x' at .*mixed.jsonl:2\).*label_names"):
    tt.load_labelled_texts(mixed, "mixed", NumberTokenizer())


def test_bad_tsv_rows_are_counted_skips(tmp_path, caplog):
  path = tmp_path / "train.tsv"
  path.write_bytes(
    b"sentence\tlabel\textra\n"
    b"10 11\t1\tx\n"
    b"   \t0\tx\n"  # 3: empty text
    b"12\t\tx\n"  # 4: no label
    b"13\n"  # 5: too few fields
    b"\n"  # 6: blank
    b'14 "\xff" 15\t0\n'  # 7: invalid UTF-8 (replaced), quotes are text, the extra column unused
    b"16\t-1\tx\n"  # 8: negative id
    b"17\t1.5\tx\n"  # 9: a name "1.5" among ids -> not a class
  )
  cfg = _config(path=str(tmp_path))
  with pytest.raises(ValueError, match=r"mix class names \('1.5' at .*train.tsv:9\)"):
    tt.load_labelled_texts(cfg, "train", NumberTokenizer())
  path.write_bytes(path.read_bytes().replace(b"17\t1.5\tx\n", b""))
  with caplog.at_level(logging.WARNING):
    data = tt.load_labelled_texts(cfg, "train", NumberTokenizer())
  stats = data.stats
  assert (stats.rows, stats.examples, stats.blank_lines) == (6, 2, 1)
  assert (stats.empty_texts, stats.bad_labels, stats.bad_rows, stats.non_utf8_lines) == (1, 2, 1, 1)
  assert data.origins == (f"{path}:2", f"{path}:7")
  assert data.class_names == ("0", "1") and data.labels.tolist() == [1, 0]
  assert _all_rows(data)["tokens"][:, 1:4].tolist() == [[10, 11, EOS], [14, 15, EOS]]
  for line in (3, 4, 5, 8):
    assert f"train.tsv:{line}" in caplog.text


def test_jsonl_regression_and_bad_rows(tmp_path, caplog):
  _write(
    tmp_path / "train.jsonl",
    [
      '{"s1": "10", "s2": "20 21", "score": 3.5}',
      "not json",  # 2
      '["a list"]',  # 3
      '{"s1": "11", "score": 1}',  # 4: no s2
      '{"s1": 12, "s2": "22", "score": 1}',  # 5: a number, not text
      '{"s1": null, "s2": "22", "score": 1}',  # 6: empty
      '{"s1": "13", "s2": "23", "score": "NaN"}',  # 7: not finite
      '{"s1": "14", "s2": "24", "score": "0.25"}',
      "",
    ],
  )
  cfg = _config("regress", source="jsonl", path=str(tmp_path), text_fields=("s1", "s2"))
  cfg.input.label_field = "score"
  with caplog.at_level(logging.WARNING):
    ds = _train(cfg)
  stats = ds.stats
  assert (stats.rows, stats.examples, stats.blank_lines) == (8, 2, 1)
  assert (stats.bad_rows, stats.empty_texts, stats.bad_labels) == (4, 1, 1)
  assert (ds.task_kind, ds.num_classes, ds.class_names) == ("regress", 1, ())
  batch = ds.batches[0]
  assert set(batch) == {"tokens", "padding_mask", "target"} and batch["target"].dtype == np.float32
  by_first = {int(r[1]): float(t) for r, t in zip(batch["tokens"], batch["target"])}
  assert by_first == {10: 3.5, 14: 0.25}
  for line in (2, 3, 4, 5, 6, 7):
    assert f"train.jsonl:{line}" in caplog.text
  _write(tmp_path / "test.jsonl", ['{"s1": "1", "s2": "2", "score": -1}'] * 2)
  with pytest.raises(ValueError, match="labels are hidden"):
    _eval(cfg, "test")


def test_config_and_file_errors(tmp_path, names_folder):
  missing_split = r"nope.tsv not found \(config.input.path=.*'train.tsv'\]"
  with pytest.raises(FileNotFoundError, match=missing_split):
    _eval(_config(path=str(names_folder)), "nope")
  with pytest.raises(FileNotFoundError, match="config.input.path="):
    _train(_config(path=str(tmp_path / "missing")))
  no_text = r"no column 'text' \(config.input.text_fields\).*\['sentence', 'label'\]"
  with pytest.raises(ValueError, match=no_text):
    _train(_config(path=str(names_folder), text_fields=("text",)))
  with pytest.raises(ValueError, match=r"no column 'gold' \(config.input.label_field\)"):
    _train(_config(path=str(names_folder), label_field="gold"))
  _write(tmp_path / "train.jsonl", ['{"sentence": "1", "gold": 0}'])
  with pytest.raises(ValueError, match=r"train.jsonl:1: no field 'label'.*\['sentence', 'gold'\]"):
    _train(_config(source="jsonl", path=str(tmp_path)))
  (tmp_path / "empty.tsv").write_text("")
  with pytest.raises(ValueError, match="empty.tsv is empty"):
    _eval(_config(path=str(tmp_path), label_names=("a",)), "empty")
  _write(tmp_path / "blank.tsv", ["sentence\tlabel", "  \t1"])
  with pytest.raises(ValueError, match="blank.tsv has no usable example"):
    _eval(_config(path=str(tmp_path), label_names=("a", "b")), "blank")
  with pytest.raises(ValueError, match="config.input.source 'csv'"):
    _train(_config(source="csv", path=str(tmp_path)))
  with pytest.raises(ValueError, match="config.input.text_fields"):
    _train(_config(path=str(names_folder), text_fields=("a", "b", "c")))
  with pytest.raises(ValueError, match="config.head.task='ctc'"):
    _train(_config("ctc", path=str(names_folder)))
  with pytest.raises(ValueError, match="fewer than one global batch of 8"):
    _train(_config(path=str(names_folder), batch_size=8))
  with pytest.raises(ValueError, match="config.input.max_train_examples=-1"):
    _train(_config(path=str(names_folder), max_train_examples=-1))


# ---------------------------------------------------------------------------------------------
# Training batches: determinism, epochs, resume, processes.


@pytest.fixture
def numbers_folder(tmp_path):
  """23 examples: sentence "k" (k = 100..122), label k % 3."""
  _write(tmp_path / "train.tsv", ["sentence\tlabel", *(f"{k}\t{k % 3}" for k in range(100, 123))])
  return tmp_path


def test_batches_are_static_deterministic_and_cover_an_epoch(numbers_folder):
  cfg = _config(path=str(numbers_folder), batch_size=5)
  ds = _train(cfg, seed=3)
  assert ds.batches_per_epoch == 4 and ds.num_examples == 23
  assert (ds.num_classes, ds.class_names, ds.task_kind) == (3, ("0", "1", "2"), "classify")
  for epoch in range(2):
    batches = [ds.batches[epoch * 4 + i] for i in range(4)]
    for batch in batches:
      assert batch["tokens"].shape == (5, 8) and batch["tokens"].dtype == np.int32
      assert batch["padding_mask"].shape == (5, 8) and batch["padding_mask"].dtype == np.bool_
      assert batch["label"].shape == (5,) and batch["label"].dtype == np.int32
      assert batch["tokens"][:, [0, 2]].tolist() == [[BOS, EOS]] * 5
      np.testing.assert_array_equal(batch["label"], batch["tokens"][:, 1] % 3)  # the source's
    firsts = np.concatenate([b["tokens"][:, 1] for b in batches])
    assert len(set(firsts.tolist())) == 20  # 20 distinct examples, 3 dropped
  again = _train(cfg, seed=3)
  other = _train(cfg, seed=4)
  np.testing.assert_array_equal(again.batches[1]["tokens"], ds.batches[1]["tokens"])
  assert not np.array_equal(other.batches[1]["tokens"], ds.batches[1]["tokens"])
  assert not np.array_equal(ds.batches[5]["tokens"], ds.batches[1]["tokens"])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_iterator_resumes_exactly_from_its_state(numbers_folder, num_workers):
  cfg = _config(path=str(numbers_folder), batch_size=4, num_workers=num_workers)
  ds = _train(cfg)
  iterator = iter(ds)
  for _ in range(ds.batches_per_epoch - 2):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]  # crosses into the next epoch
  iterator.close()
  resumed = iter(_train(cfg))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in ("tokens", "padding_mask", "label"):
      np.testing.assert_array_equal(got[key], want[key])
  resumed.close()
  np.testing.assert_array_equal(
    expected[-1]["tokens"], ds.batches[ds.batches_per_epoch + 1]["tokens"]
  )


def test_process_rows_concatenate_to_the_global_batch(numbers_folder):
  cfg = _config(path=str(numbers_folder), batch_size=6)
  whole = _train(cfg)
  parts = [_train(cfg, process_index=p, process_count=2) for p in range(2)]
  for index in (0, whole.batches_per_epoch + 1):
    halves = [part.batches[index] for part in parts]
    assert halves[0]["tokens"].shape == (3, 8)
    for key in ("tokens", "padding_mask", "label"):
      np.testing.assert_array_equal(
        np.concatenate([h[key] for h in halves]), whole.batches[index][key]
      )


def test_eval_batches_cover_every_example_once(numbers_folder):
  cfg = _config(path=str(numbers_folder), batch_size=4, eval_batch_size=5)
  ev = _eval(cfg, "train")
  batches = list(ev.batches())
  assert (ev.num_examples, ev.num_batches, len(batches)) == (23, 5, 5)
  assert list(ev.batches())[3]["tokens"].tolist() == batches[3]["tokens"].tolist()  # repeatable
  firsts, labels = [], []
  for batch in batches:
    assert batch["tokens"].shape == (5, 8) and batch["example_mask"].dtype == np.bool_
    mask = batch["example_mask"]
    firsts += batch["tokens"][mask, 1].tolist()
    labels += batch["label"][mask].tolist()
  assert firsts == list(range(100, 123))  # source order, each once
  assert labels == [k % 3 for k in range(100, 123)] == ev.labels.tolist()
  last = batches[-1]
  assert last["example_mask"].tolist() == [True, True, True, False, False]
  assert last["tokens"][3:, 1].tolist() == [120, 120]  # filler repeats the batch's first
  assert _eval(_config(path=str(numbers_folder), batch_size=4), "train").batch_size == 4


# ---------------------------------------------------------------------------------------------
# TFDS (ArrayRecord, written and read without TensorFlow).

TFDS_TRAIN = [  # (sentence1, sentence2, label, score)
  ("10 11", "20", 1, 4.5),
  ("12", b"21 \xff22", 0, 0.5),
  ("  ", "23", 1, 1.0),  # empty: skipped
  ("13 14 15", "24 25 26 27", 1, 2.0),
]


class TinyGluePairsForTest(tfds.core.GeneratorBasedBuilder):
  """A GLUE-like pair task: ClassLabel labels, a float score, hidden (-1) test labels."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = {
      "sentence1": tfds.features.Text(),
      "sentence2": tfds.features.Tensor(shape=(), dtype=np.object_),
      "label": tfds.features.ClassLabel(names=["not_equivalent", "equivalent"]),
      "score": tfds.features.Tensor(shape=(), dtype=np.float32),
    }
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    return {
      "train": self._generate_examples(TFDS_TRAIN),
      "test": self._generate_examples([("1", "2", -1, -1.0)]),
    }

  def _generate_examples(self, rows):
    for i, (a, b, label, score) in enumerate(rows):
      yield i, {"sentence1": a, "sentence2": b, "label": label, "score": score}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds_glue")
  TinyGluePairsForTest(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def _tfds_config(tfds_dir, task="classify", **overrides):
  fields = dict(
    source="tfds",
    path="tiny_glue_pairs_for_test",
    tfds_data_dir=str(tfds_dir),
    text_fields=("sentence1", "sentence2"),
  )
  return _config(task, **(fields | overrides))


def test_tfds_pairs_classes_and_targets(tfds_dir):
  data = tt.load_labelled_texts(_tfds_config(tfds_dir), "train", NumberTokenizer())
  assert data.class_names == ("not_equivalent", "equivalent")
  assert (data.stats.rows, data.stats.examples, data.stats.empty_texts) == (4, 3, 1)
  assert data.stats.non_utf8_lines == 1
  rows = _all_rows(data)
  got = {tuple(r): int(label) for r, label in zip(rows["tokens"].tolist(), rows["label"])}
  assert got == {
    tuple(_row([10, 11], [20])): 1,
    tuple(_row([12], [21])): 0,  # "21 \ufffd22": the word with the replaced byte is no number
    tuple(_row([13, 14], [24, 25])): 1,  # 3 + 4 > 4: cut longest first
  }
  scores = tt.load_labelled_texts(
    _tfds_config(tfds_dir, "regress", label_field="score"), "train", NumberTokenizer()
  )
  by_first = dict(zip(_all_rows(scores)["tokens"][:, 1].tolist(), scores.labels.tolist()))
  assert by_first == {10: 4.5, 12: 0.5, 13: 2.0}


def test_tfds_errors(tfds_dir, tmp_path):
  with pytest.raises(ValueError, match="record 0: label -1: this split's labels are hidden"):
    _eval(_tfds_config(tfds_dir), "test")
  with pytest.raises(ValueError, match="labels are hidden"):
    _eval(_tfds_config(tfds_dir, "regress", label_field="score"), "test")
  with pytest.raises(ValueError, match=r"no 'question' feature \(config.input.text_fields\)"):
    _eval(_tfds_config(tfds_dir, text_fields=("question",)), "train")
  with pytest.raises(ValueError, match=r"no 'gold' feature \(config.input.label_field\)"):
    _eval(_tfds_config(tfds_dir, label_field="gold"), "train")
  with pytest.raises(ValueError, match="label_names=.*differ from the classes"):
    _eval(_tfds_config(tfds_dir, label_names=("a", "b")), "train")
  with pytest.raises(FileNotFoundError, match="'no_such_glue'.*config.input.path"):
    _eval(_tfds_config(tfds_dir, path="no_such_glue"), "train")
  with pytest.raises(FileNotFoundError, match="config.input.tfds_data_dir"):
    _eval(_tfds_config(tmp_path / "nowhere"), "train")
  with pytest.raises(ValueError, match="config.input.split"):
    _eval(_tfds_config(tfds_dir), "validation")


def test_glue_tasks_table():
  assert len(tt.GLUE_TASKS) == 8
  fields, classes = tt.GLUE_TASKS["mrpc"]
  assert (fields, classes) == (("sentence1", "sentence2"), 2)
  assert tt.GLUE_TASKS["mnli"].num_classes == 3 and tt.GLUE_TASKS["stsb"].num_classes == 1
  assert tt.GLUE_TASKS["sst2"].text_fields == ("sentence",)


# ---------------------------------------------------------------------------------------------
# The embedded verses with the committed tokenizer.


def test_embedded_verses_labels_and_subset():
  cfg = _config(source="embedded", max_length=32, batch_size=8, max_train_examples=120)
  ds = tt.make_text_finetune_dataset(cfg, seed=0)
  assert ds.class_names == text_corpus.GENRES and ds.num_classes == 6
  source = text_corpus.load_embedded_probe_set("train")
  counts = np.bincount(ds.data.labels, minlength=6)
  expected = np.bincount(source.labels, minlength=6) * 120 / len(source.labels)
  assert np.all(np.abs(counts - expected) <= 0.5)  # the same share of every class
  assert ds.stats.left_out == len(source.labels) - ds.num_examples
  verse = [int(o.rsplit(" ", 1)[1]) for o in ds.data.origins]  # "... verse i"
  assert ds.data.labels.tolist() == source.labels[verse].tolist()
  tokens, padding = text.encode_for_probe([source.texts[i] for i in verse], ds.tokenizer, 32)
  rows = _all_rows(ds.data, 32)
  np.testing.assert_array_equal(rows["tokens"], tokens)
  np.testing.assert_array_equal(rows["padding_mask"], padding)
  batch = next(iter(ds))
  assert batch["tokens"].shape == (8, 32) and batch["label"].dtype == np.int32
  with pytest.raises(ValueError, match="config.input.split='dev'"):
    tt.text_eval_batches(cfg, "dev", tokenizer=ds.tokenizer)
  with pytest.raises(ValueError, match="config.head.task='regress'"):
    tt.text_eval_batches(_config("regress", source="embedded"), "test", tokenizer=ds.tokenizer)
