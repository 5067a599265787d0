"""Tests for the labelled speech pipeline (d2v_jax/data/audio_tasks.py): CTC and classification.

The embedded set gives real transcripts and word labels; the rest is generated here. Generated
manifests hold "ramp" utterances: utterance k holds the int16 samples k * 2048 + t, so a row
(with normalize=False) tells which file it came from, and its label can be checked against it.
"""

import logging
import pickle

import ml_collections
import numpy as np
import pytest
import soundfile

from d2v_jax import ctc
from d2v_jax.data import audio_tasks, load_embedded_speech_index, read_audio

RATE = 16000
SENTENCE_PADS = (40000, 56000)  # embedded sentences last 21641 to 54785 samples
WORD_PADS = (12000, 18240)  # embedded words last 4335 to 18235 samples
RAMP_PADS = (400, 800, 1200)
_RAMP_STEP = 2048
# (length, words, class) of each generated utterance; 1300 samples fit no pad length.
RAMP_TRAIN = [
  (300, "GO UP", "up"),
  (400, "NO", "no"),
  (401, "DON'T STOP", "stop"),
  (700, "YES YES", "yes"),
  (800, "LEFT", "no"),
  (950, "RIGHT ON", "up"),
  (1100, "OFF", "yes"),
  (1200, "BED", "stop"),
  (250, "BAD", "no"),
  (1300, "TOO LONG", "up"),
  (600, "UP", "yes"),
  (350, "DOWN", "stop"),
]
RAMP_TEST = [(500, "GO", "yes"), (1000, "NO UP", "no"), (380, "STOP", "up"), (820, "ZEBRA", "no")]


def _config(task: str, **input_overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.head = ml_collections.ConfigDict(dict(task=task))
  config.input = ml_collections.ConfigDict(
    dict(
      source="embedded",
      path="",
      split="train",
      tfds_data_dir="",
      tfds_feature="speech",
      sample_rate=RATE,
      batch_size=8,
      pad_lengths=SENTENCE_PADS if task == "ctc" else WORD_PADS,
      normalize=False,
      max_label_length=64,
      vocabulary="",
      num_workers=0,
    )
  )
  config.input.update(input_overrides)
  return config


def _num_valid(batch) -> np.ndarray:
  return (~batch["padding_mask"]).sum(axis=1)


def _letters(transcript: str) -> list[str]:
  """The fairseq letter sequence of a transcript, written out independently of ctc.py."""
  return list(" ".join(transcript.split()).replace(" ", "|")) + ["|"]


def _assert_padding_is_a_suffix(batch):
  for row, mask in zip(batch["audio"], batch["padding_mask"]):
    num_valid = int((~mask).sum())
    assert not mask[:num_valid].any() and mask[num_valid:].all()
    np.testing.assert_array_equal(row[num_valid:], 0.0)
  if "labels" in batch:
    for labels, padding in zip(batch["labels"], batch["label_padding"]):
      num_labels = int((~padding).sum())
      assert not padding[:num_labels].any()
      np.testing.assert_array_equal(labels[num_labels:], 0)
      assert (labels[:num_labels] > 0).all()  # never the blank


def _normalised(wave: np.ndarray) -> np.ndarray:
  return (wave - wave.mean()) / np.sqrt(wave.var() + 1e-5)


@pytest.fixture(scope="module")
def embedded_by_audio():
  """The clip of each embedded train/test audio, keyed by its exact samples."""
  by_audio = {}
  for clip in load_embedded_speech_index():
    by_audio[read_audio(clip.path, RATE).tobytes()] = clip
  return by_audio


# ---------------------------------------------------------------------------------------------
# Embedded set: CTC and classification batches.


def test_embedded_ctc_batches_hold_whole_clips_and_their_transcripts(embedded_by_audio):
  ds = audio_tasks.make_audio_finetune_dataset(_config("ctc"), seed=0)
  train = load_embedded_speech_index("train", "sentence")
  letters = sorted({s for clip in train for s in _letters(clip.transcript)})
  assert ds.task == "ctc" and ds.vocabulary.letters == tuple(letters)
  assert ds.num_outputs == len(letters) + 1 and ds.max_label_length == 64
  assert ds.stats.listed == 90 and ds.pad_lengths == SENTENCE_PADS
  seen = []
  iterator = iter(ds)
  for _ in range(ds.batches_per_epoch):
    batch = next(iterator)
    assert set(batch) == {"audio", "padding_mask", "labels", "label_padding"}
    assert batch["audio"].dtype == np.float32 and batch["padding_mask"].dtype == bool
    assert batch["labels"].dtype == np.int32 and batch["label_padding"].dtype == bool
    assert batch["audio"].shape[0] == 8 and batch["audio"].shape[1] in SENTENCE_PADS
    assert batch["labels"].shape == batch["label_padding"].shape == (8, 64)
    _assert_padding_is_a_suffix(batch)
    for row, num_valid, ids, padding in zip(
      batch["audio"], _num_valid(batch), batch["labels"], batch["label_padding"]
    ):
      clip = embedded_by_audio[row[:num_valid].tobytes()]  # the whole file, uncropped
      assert clip.split == "train" and clip.kind == "sentence"
      assert num_valid == clip.num_samples
      assert batch["audio"].shape[1] == min(p for p in SENTENCE_PADS if p >= num_valid)
      expected = [letters.index(s) + 1 for s in _letters(clip.transcript)]
      np.testing.assert_array_equal(ids[~padding], expected)
      seen.append(clip.path)
  assert len(seen) == len(set(seen)) == ds.batches_per_epoch * 8  # each clip at most once


def test_embedded_classification_batches(embedded_by_audio):
  ds = audio_tasks.make_audio_finetune_dataset(_config("classify"), seed=0)
  words = "bad bed down go left no off on right stop up yes".split()
  assert ds.class_names == tuple(words) and ds.num_classes == ds.num_outputs == 12
  assert ds.vocabulary is None and ds.max_label_length is None
  for index in range(3):
    batch = ds.batches[index]
    assert set(batch) == {"audio", "padding_mask", "label"}
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
    _assert_padding_is_a_suffix(batch)
    for row, num_valid, label in zip(batch["audio"], _num_valid(batch), batch["label"]):
      clip = embedded_by_audio[row[:num_valid].tobytes()]
      assert clip.kind == "word" and clip.split == "train"
      assert words[label] == clip.word


def test_normalised_rows_are_whole_files_normalised_over_their_samples():
  eval_set = audio_tasks.audio_eval_batches(_config("ctc", normalize=True), "test")
  num_padded = 0
  for batch in eval_set.batches():
    for row, mask, example in zip(batch["audio"], batch["padding_mask"], batch["example_index"]):
      wave = read_audio(eval_set.names[example], RATE).astype(np.float64)
      assert (~mask).sum() == len(wave)
      np.testing.assert_allclose(row[~mask], _normalised(wave), rtol=1e-4, atol=1e-4)
      np.testing.assert_array_equal(row[mask], 0.0)
      num_padded += mask.any()
  assert num_padded > 0


def test_eval_set_covers_each_example_once_with_training_vocabulary():
  config = _config("ctc", eval_batch_size=7)
  eval_set = audio_tasks.audio_eval_batches(config, "test")
  test_clips = load_embedded_speech_index("test", "sentence")
  assert eval_set.num_examples == len(test_clips) == 30
  assert eval_set.transcripts == [c.transcript for c in test_clips]  # example (file) order
  assert eval_set.names == [str(c.path) for c in test_clips]
  train_vocab = audio_tasks.make_audio_finetune_dataset(config, seed=0).vocabulary
  assert eval_set.vocabulary == train_vocab

  batches = list(eval_set.batches())
  assert len(batches) == eval_set.num_batches
  counts = np.zeros(eval_set.num_examples, int)
  for batch in batches:
    assert set(batch) == {
      "audio",
      "padding_mask",
      "labels",
      "label_padding",
      "example_index",
      "example_mask",
    }
    assert batch["audio"].shape[0] == 7 and batch["audio"].shape[1] in SENTENCE_PADS
    assert batch["example_index"].dtype == np.int32 and batch["example_mask"].dtype == bool
    real = batch["example_mask"]
    assert real[0] and (np.diff(real.astype(int)) <= 0).all()  # fillers only at the end
    np.testing.assert_array_equal(batch["example_index"][~real], batch["example_index"][0])
    np.testing.assert_array_equal(
      batch["audio"][~real], np.broadcast_to(batch["audio"][0], batch["audio"][~real].shape)
    )
    np.add.at(counts, batch["example_index"][real], 1)
    for example, ids, padding, num_valid in zip(
      batch["example_index"], batch["labels"], batch["label_padding"], _num_valid(batch)
    ):
      assert train_vocab.decode(ids[~padding]) == eval_set.transcripts[example]
      assert num_valid == test_clips[example].num_samples
  np.testing.assert_array_equal(counts, 1)
  # Deterministic: a second pass gives the same batches.
  for a, b in zip(batches, eval_set.batches()):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_classification_eval_labels_follow_the_words():
  eval_set = audio_tasks.audio_eval_batches(_config("classify"), "test")
  clips = load_embedded_speech_index("test", "word")
  assert eval_set.num_examples == 120 and eval_set.num_classes == 12
  assert [eval_set.class_names[i] for i in eval_set.labels] == [c.word for c in clips]
  seen = []
  for batch in eval_set.batches():
    real = batch["example_mask"]
    np.testing.assert_array_equal(batch["label"], eval_set.labels[batch["example_index"]])
    seen.extend(batch["example_index"][real])
  assert sorted(seen) == list(range(120))


# ---------------------------------------------------------------------------------------------
# Determinism, resume, processes.


@pytest.fixture(scope="module")
def ramp_manifest(tmp_path_factory):
  """A manifest directory with train/test .tsv, .wrd and .lbl files over ramp utterances."""
  folder = tmp_path_factory.mktemp("manifest")
  _write_ramp_split(folder, "train", RAMP_TRAIN, offset=0)
  _write_ramp_split(folder, "test", RAMP_TEST, offset=len(RAMP_TRAIN))
  return folder


def _ramp_id(k: int) -> int:
  return k - 8  # k * 2048 + t stays inside int16 for k in [-16, 15] and t < 2048


def _write_ramp_split(folder, split, entries, offset, suffixes=(".wrd", ".lbl")):
  rows, words, classes = [], [], []
  for i, (length, text, label) in enumerate(entries):
    name = f"audio/{split}{i:02d}.flac"
    samples = _ramp_id(offset + i) * _RAMP_STEP + np.arange(length)
    (folder / "audio").mkdir(exist_ok=True)
    soundfile.write(folder / name, samples.astype(np.int16), RATE, subtype="PCM_16")
    rows.append(f"{name}\t{length}")
    words.append(text)
    classes.append(label)
  (folder / f"{split}.tsv").write_text("\n".join([str(folder), *rows]) + "\n")
  if ".wrd" in suffixes:
    (folder / f"{split}.wrd").write_text("\n".join(words) + "\n")
  if ".ltr" in suffixes:
    (folder / f"{split}.ltr").write_text("\n".join(ctc.words_to_letters(w) for w in words) + "\n")
  if ".lbl" in suffixes:
    (folder / f"{split}.lbl").write_text("\n".join(classes) + "\n")


def _ramp_entry(row, num_valid, offset=0) -> int:
  """The index (within its split) of the ramp utterance a row holds (normalize=False)."""
  samples = np.round(row[:num_valid] * 32768).astype(np.int64)
  ramp_id, start = divmod(int(samples[0]), _RAMP_STEP)
  assert start == 0  # never cropped
  np.testing.assert_array_equal(samples, samples[0] + np.arange(num_valid))
  return ramp_id + 8 - offset


def _ramp_config(folder, task="ctc", **overrides):
  fields = dict(source="manifest", path=str(folder), batch_size=2, pad_lengths=RAMP_PADS)
  return _config(task, **{**fields, **overrides})


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_iterator_resumes_exactly_from_its_state(ramp_manifest):
  config = _ramp_config(ramp_manifest)
  ds = audio_tasks.make_audio_finetune_dataset(config, seed=0)
  iterator = iter(ds)
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, ds.batches_per_epoch + 1)  # crosses into the next epoch
  resumed = iter(audio_tasks.make_audio_finetune_dataset(config, seed=0))
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, len(expected)), expected)


def test_batches_survive_pickling_for_grain_workers(ramp_manifest):
  # num_workers > 0 sends the batch transform to worker processes (pretraining tests cover
  # the worker resume itself; this checks the labelled transform travels).
  ds = audio_tasks.make_audio_finetune_dataset(_ramp_config(ramp_manifest), seed=0)
  copy = pickle.loads(pickle.dumps(ds.batches))
  _assert_batches_equal([copy[i] for i in range(6)], [ds.batches[i] for i in range(6)])


def test_same_seed_same_batches_other_seed_or_epoch_differs(ramp_manifest):
  def epoch(seed, first=0):
    ds = audio_tasks.make_audio_finetune_dataset(_ramp_config(ramp_manifest), seed=seed)
    return [ds.batches[first + i] for i in range(ds.batches_per_epoch)], ds.batches_per_epoch

  first, per_epoch = epoch(1)
  _assert_batches_equal(first, epoch(1)[0])

  def order(batches):
    return [_ramp_entry(r, n) for b in batches for r, n in zip(b["audio"], _num_valid(b))]

  assert order(first) != order(epoch(2)[0])
  assert order(first) != order(epoch(1, first=per_epoch)[0])
  assert sorted(order(first)) == sorted(order(epoch(1, first=per_epoch)[0]))


def test_process_rows_concatenate_to_the_global_batch(ramp_manifest):
  whole = audio_tasks.make_audio_finetune_dataset(_ramp_config(ramp_manifest), seed=3)
  parts = [
    audio_tasks.make_audio_finetune_dataset(
      _ramp_config(ramp_manifest), seed=3, process_index=p, process_count=2
    )
    for p in range(2)
  ]
  for index in range(whole.batches_per_epoch):
    for key, value in whole.batches[index].items():
      halves = [part.batches[index][key] for part in parts]
      assert halves[0].shape[0] == 1
      np.testing.assert_array_equal(np.concatenate(halves), value)


# ---------------------------------------------------------------------------------------------
# Manifests: letters, words, classes and their errors.


def test_manifest_words_are_letters_padded_whole_and_long_audio_skipped(ramp_manifest, caplog):
  with caplog.at_level(logging.INFO):
    ds = audio_tasks.make_audio_finetune_dataset(_ramp_config(ramp_manifest), seed=0)
  assert ds.stats.listed == len(RAMP_TRAIN) and ds.stats.skipped_long == 1
  assert "train09.flac" in caplog.text  # 1300 samples > 1200
  # Buckets 400: 300, 400, 250, 350 -> 2 batches; 800: 401, 700, 800, 600 -> 2; 1200: 950,
  # 1100, 1200 -> 1 batch, 1 dropped.
  assert ds.batches_per_epoch == 5
  vocab = ds.vocabulary
  letters = sorted({s for _, text, _ in RAMP_TRAIN for s in _letters(text)})
  assert vocab.letters == tuple(letters)
  seen = []
  for index in range(ds.batches_per_epoch):
    batch = ds.batches[index]
    _assert_padding_is_a_suffix(batch)
    for row, num_valid, ids, padding in zip(
      batch["audio"], _num_valid(batch), batch["labels"], batch["label_padding"]
    ):
      entry = _ramp_entry(row, num_valid)
      length, text, _ = RAMP_TRAIN[entry]
      assert num_valid == length
      assert batch["audio"].shape[1] == min(p for p in RAMP_PADS if p >= length)
      np.testing.assert_array_equal(ids[~padding], [letters.index(s) + 1 for s in _letters(text)])
      seen.append(entry)
  assert len(set(seen)) == 10 and 9 not in seen


def test_ltr_and_wrd_files_give_the_same_batches(tmp_path, ramp_manifest):
  _write_ramp_split(tmp_path, "train", RAMP_TRAIN, offset=0, suffixes=(".ltr",))
  from_letters = audio_tasks.make_audio_finetune_dataset(_ramp_config(tmp_path), seed=0)
  from_words = audio_tasks.make_audio_finetune_dataset(_ramp_config(ramp_manifest), seed=0)
  assert from_letters.vocabulary == from_words.vocabulary
  _assert_batches_equal(
    [from_letters.batches[i] for i in range(5)], [from_words.batches[i] for i in range(5)]
  )
  # .ltr wins over .wrd when both exist: a different .wrd is ignored.
  (tmp_path / "train.wrd").write_text("ZZZ\n" * len(RAMP_TRAIN))
  again = audio_tasks.make_audio_finetune_dataset(_ramp_config(tmp_path), seed=0)
  assert again.vocabulary == from_words.vocabulary


def test_mismatched_line_counts_name_both_files(tmp_path):
  _write_ramp_split(tmp_path, "train", RAMP_TRAIN, offset=0)
  wrd = tmp_path / "train.wrd"
  wrd.write_text("\n".join(text for _, text, _ in RAMP_TRAIN[:-1]) + "\n")
  pattern = rf"{tmp_path / 'train.tsv'} lists 12 audio rows but {wrd} has 11 lines"
  with pytest.raises(ValueError, match=pattern):
    audio_tasks.make_audio_finetune_dataset(_ramp_config(tmp_path), seed=0)
  lbl = tmp_path / "train.lbl"
  lbl.write_text("yes\n" * 13)
  with pytest.raises(ValueError, match=rf"lists 12 audio rows but {lbl} has 13 lines"):
    audio_tasks.make_audio_finetune_dataset(_ramp_config(tmp_path, "classify"), seed=0)


def test_missing_label_file_and_directory_are_clear_errors(tmp_path):
  _write_ramp_split(tmp_path, "train", RAMP_TRAIN, offset=0, suffixes=())
  with pytest.raises(FileNotFoundError, match=r"train\.ltr or train\.wrd beside"):
    audio_tasks.make_audio_finetune_dataset(_ramp_config(tmp_path), seed=0)
  with pytest.raises(FileNotFoundError, match=r"train\.lbl or train\.label beside"):
    audio_tasks.make_audio_finetune_dataset(_ramp_config(tmp_path, "classify"), seed=0)
  with pytest.raises(FileNotFoundError, match="config.input.path="):
    audio_tasks.make_audio_finetune_dataset(_ramp_config(tmp_path / "nowhere"), seed=0)


def test_over_long_transcript_is_skipped_and_counted(ramp_manifest, caplog):
  # "DON'T STOP" is 11 letters, "RIGHT ON" 9, "YES YES" 8; every other transcript has <= 6.
  with caplog.at_level(logging.INFO):
    ds = audio_tasks.make_audio_finetune_dataset(
      _ramp_config(ramp_manifest, max_label_length=8), seed=0
    )
  assert ds.stats.skipped_long_label == 2 and ds.stats.skipped_long == 1
  assert "train02.flac" in caplog.text and "train05.flac" in caplog.text
  assert "skipped 2 utterances with more letters than config.input.max_label_length" in (
    caplog.text
  )
  for index in range(ds.batches_per_epoch):
    batch = ds.batches[index]
    assert batch["labels"].shape == (2, 8)
    entries = [_ramp_entry(r, n) for r, n in zip(batch["audio"], _num_valid(batch))]
    assert not {2, 5} & set(entries)
    assert (~batch["label_padding"][[e == 3 for e in entries]]).all()  # "YES YES" fills all 8


def test_corrupt_file_is_skipped_and_labels_stay_aligned(tmp_path, caplog):
  _write_ramp_split(tmp_path, "train", RAMP_TRAIN, offset=0)
  (tmp_path / "audio" / "train03.flac").write_bytes(np.random.default_rng(0).bytes(3000))
  with caplog.at_level(logging.WARNING):
    ds = audio_tasks.make_audio_finetune_dataset(_ramp_config(tmp_path), seed=0)
  assert ds.stats.skipped_unreadable == 1
  assert str(tmp_path / "audio" / "train03.flac") in caplog.text
  seen = set()
  for index in range(ds.batches_per_epoch):
    batch = ds.batches[index]
    for row, num_valid, ids, padding in zip(
      batch["audio"], _num_valid(batch), batch["labels"], batch["label_padding"]
    ):
      entry = _ramp_entry(row, num_valid)
      assert ds.vocabulary.decode(ids[~padding]) == " ".join(RAMP_TRAIN[entry][1].split())
      seen.add(entry)
  assert 3 not in seen and max(seen) > 3
  # The eval walk covers every kept row: those after the corrupt one keep their own labels.
  eval_set = audio_tasks.audio_eval_batches(_ramp_config(tmp_path), "train")
  assert eval_set.num_examples == len(RAMP_TRAIN) - 2  # the corrupt and the too long one
  entries = []
  for batch in eval_set.batches():
    for row, num_valid, ids, padding, example, real in zip(
      batch["audio"],
      _num_valid(batch),
      batch["labels"],
      batch["label_padding"],
      batch["example_index"],
      batch["example_mask"],
    ):
      entry = _ramp_entry(row, num_valid)
      text = " ".join(RAMP_TRAIN[entry][1].split())
      assert ds.vocabulary.decode(ids[~padding]) == eval_set.transcripts[example] == text
      entries.extend([entry] * int(real))
  assert sorted(entries) == [0, 1, 2, 4, 5, 6, 7, 8, 10, 11]


def test_manifest_classification_and_unknown_eval_class(tmp_path, caplog):
  _write_ramp_split(tmp_path, "train", RAMP_TRAIN, offset=0)
  config = _ramp_config(tmp_path, "classify")
  ds = audio_tasks.make_audio_finetune_dataset(config, seed=0)
  assert ds.class_names == ("no", "stop", "up", "yes")  # sorted distinct train labels
  for index in range(ds.batches_per_epoch):
    batch = ds.batches[index]
    for row, num_valid, label in zip(batch["audio"], _num_valid(batch), batch["label"]):
      assert ds.class_names[label] == RAMP_TRAIN[_ramp_entry(row, num_valid)][2]

  # A .label file is read like .lbl; a test class unseen in training is skipped and counted.
  test_entries = [(length, text, label.replace("up", "maybe")) for length, text, label in RAMP_TEST]
  _write_ramp_split(tmp_path, "test", test_entries, offset=len(RAMP_TRAIN), suffixes=())
  (tmp_path / "test.label").write_text("\n".join(label for *_, label in test_entries) + "\n")
  with caplog.at_level(logging.INFO):
    eval_set = audio_tasks.audio_eval_batches(config, "test", class_names=ds.class_names)
  assert eval_set.stats.skipped_unknown_label == 1 and "test02.flac" in caplog.text
  assert eval_set.num_examples == 3 and eval_set.batch_size == 2
  assert [eval_set.class_names[i] for i in eval_set.labels] == ["yes", "no", "no"]
  for batch in eval_set.batches():
    for row, num_valid, label in zip(batch["audio"], _num_valid(batch), batch["label"]):
      entry = _ramp_entry(row, num_valid, offset=len(RAMP_TRAIN))
      assert ds.class_names[label] == RAMP_TEST[entry][2]


def test_eval_letters_outside_the_training_vocabulary_are_skipped(ramp_manifest):
  eval_set = audio_tasks.audio_eval_batches(_ramp_config(ramp_manifest), "test")
  assert eval_set.stats.skipped_unknown_label == 1  # ZEBRA: no Z in the training words
  assert eval_set.transcripts == ["GO", "NO UP", "STOP"]


def test_vocabulary_file_sets_the_ids(ramp_manifest, tmp_path):
  letters = sorted({s for _, text, _ in RAMP_TRAIN for s in _letters(text)})[::-1]
  dict_file = tmp_path / "dict.ltr.txt"
  dict_file.write_text("".join(f"{s} 1\n" for s in letters))
  ds = audio_tasks.make_audio_finetune_dataset(
    _ramp_config(ramp_manifest, vocabulary=str(dict_file)), seed=0
  )
  assert ds.vocabulary.letters == tuple(letters)
  batch = ds.batches[0]
  entry = _ramp_entry(batch["audio"][0], _num_valid(batch)[0])
  expected = [letters.index(s) + 1 for s in _letters(RAMP_TRAIN[entry][1])]
  np.testing.assert_array_equal(batch["labels"][0][~batch["label_padding"][0]], expected)
  with pytest.raises(FileNotFoundError, match="config.input.vocabulary="):
    audio_tasks.make_audio_finetune_dataset(
      _ramp_config(ramp_manifest, vocabulary=str(tmp_path / "none.txt")), seed=0
    )


def test_assign_pad_buckets_takes_the_smallest_that_holds():
  lengths = np.array([1, 400, 401, 800, 801, 1200, 1201])
  np.testing.assert_array_equal(
    audio_tasks.assign_pad_buckets(lengths, RAMP_PADS), [0, 0, 1, 1, 2, 2, 3]
  )


@pytest.mark.parametrize(
  "task, overrides, error, message",
  [
    ("segment", {}, ValueError, r"config.head.task='segment'"),
    ("ctc", dict(source="folder", path="/tmp"), ValueError, "source='folder' has no labels"),
    ("ctc", dict(pad_lengths=(0, 400)), ValueError, "config.input.pad_lengths must be positive"),
    ("ctc", dict(max_label_length=0), ValueError, "config.input.max_label_length=0"),
    ("ctc", dict(split="dev"), ValueError, "no sentence clips in split 'dev'"),
    ("ctc", dict(batch_size=200), ValueError, "no pad length holds a full global batch of 200"),
  ],
)
def test_bad_config_is_a_clear_error(task, overrides, error, message):
  with pytest.raises(error, match=message):
    audio_tasks.make_audio_finetune_dataset(_config(task, **overrides), seed=0)


# ---------------------------------------------------------------------------------------------
# TFDS.


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A tiny TFDS dataset (ArrayRecord, no TensorFlow): int16 audio, text and a ClassLabel."""
  import tensorflow_datasets as tfds

  entries = {"train": [(500, "GO UP", 1), (900, "NO", 0), (0, "EMPTY", 0), (700, "UP", 1)]}
  entries["test"] = [(600, "NO GO", 0), (450, "UP", 1)]

  class TinyLabelledSpeechForTest(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = {
        "speech": tfds.features.Tensor(shape=(None,), dtype=np.int16),
        "text": tfds.features.Text(),
        "label": tfds.features.ClassLabel(names=["zero", "one"]),
      }
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(rows) for split, rows in entries.items()}

    def _generate_examples(self, rows):
      for i, (length, text, label) in enumerate(rows):
        audio = (_ramp_id(i) * _RAMP_STEP + np.arange(length)).astype(np.int16)
        yield i, {"speech": audio, "text": text, "label": label}

  data_dir = tmp_path_factory.mktemp("tfds")
  builder = TinyLabelledSpeechForTest(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return data_dir


def test_tfds_transcripts_and_class_labels(tfds_dir):
  fields = dict(
    source="tfds",
    path="tiny_labelled_speech_for_test",
    tfds_data_dir=str(tfds_dir),
    batch_size=1,
    pad_lengths=(1000,),
  )
  ds = audio_tasks.make_audio_finetune_dataset(_config("ctc", **fields), seed=0)
  assert ds.stats.skipped_empty == 1 and ds.batches_per_epoch == 3
  # The vocabulary is built from every train transcript, the empty record's included.
  assert ds.vocabulary.letters == tuple(sorted(set("GOUPNEMTY|")))
  texts = {500: "GO UP", 900: "NO", 700: "UP"}
  for index in range(3):
    batch = ds.batches[index]
    num_valid = int(_num_valid(batch)[0])
    ids = batch["labels"][0][~batch["label_padding"][0]]
    assert ds.vocabulary.decode(ids) == texts[num_valid]

  # TFDS shuffles records when it writes them: example order is the stored order.
  eval_set = audio_tasks.audio_eval_batches(_config("ctc", **fields), "test")
  assert sorted(eval_set.transcripts) == ["NO GO", "UP"]
  assert eval_set.vocabulary == ds.vocabulary

  eval_set = audio_tasks.audio_eval_batches(_config("classify", **fields), "test")
  assert eval_set.class_names == ("zero", "one")  # the ClassLabel's names, in its order
  assert eval_set.batch_size == 1 and eval_set.num_batches == 2
  label_of_length = {600: 0, 450: 1}
  for batch in eval_set.batches():
    assert batch["label"][0] == label_of_length[int(_num_valid(batch)[0])]
    assert eval_set.labels[batch["example_index"][0]] == batch["label"][0]
  with pytest.raises(ValueError, match=r"no 'words' feature \(config.input.tfds_text_feature\)"):
    config = _config("ctc", **fields, tfds_text_feature="words")
    audio_tasks.make_audio_finetune_dataset(config, seed=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e30])
def test_non_finite_audio_is_a_counted_skip_in_fine_tuning(tmp_path, caplog, bad):
  """Issue 23: a float file holding NaN, Inf or 1e30 is substituted in training batches and left
  out of the scores at evaluation, each time with its path, instead of a NaN loss later."""
  _write_ramp_split(tmp_path, "train", RAMP_TRAIN, offset=0)
  broken = tmp_path / "audio" / "train03.flac"
  wave = soundfile.read(broken, dtype="float32")[0]
  wave[10] = bad
  broken.unlink()
  broken = broken.with_suffix(".wav")
  soundfile.write(broken, wave, RATE, subtype="FLOAT")
  manifest = tmp_path / "train.tsv"
  manifest.write_text(manifest.read_text().replace("train03.flac", "train03.wav"))
  ds = audio_tasks.make_audio_finetune_dataset(_ramp_config(tmp_path), seed=0)
  with caplog.at_level(logging.WARNING):
    batches = [ds.batches[i] for i in range(ds.batches_per_epoch)]
  assert ds.stats.decode_failures >= 1 and str(broken) in caplog.text
  assert all(np.isfinite(b["audio"]).all() for b in batches)
  eval_set = audio_tasks.audio_eval_batches(_ramp_config(tmp_path), "train")
  entries = []
  for batch in eval_set.batches():
    assert np.isfinite(batch["audio"]).all()
    for row, num_valid, real in zip(batch["audio"], _num_valid(batch), batch["example_mask"]):
      if real:
        entries.append(_ramp_entry(row, num_valid))
  assert 3 not in entries and len(entries) == eval_set.num_examples - 1


def test_a_manifest_that_is_not_utf8_names_its_path(tmp_path):
  _write_ramp_split(tmp_path, "train", RAMP_TRAIN, offset=0)
  words = tmp_path / "train.wrd"
  words.write_bytes(words.read_bytes().replace(b"A", b"\xe9", 1))  # Latin-1, not UTF-8
  with pytest.raises(ValueError, match=f"{words} is not UTF-8 text"):
    audio_tasks.make_audio_finetune_dataset(_ramp_config(tmp_path), seed=0)
