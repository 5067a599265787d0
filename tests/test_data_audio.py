"""Tests for the speech pretraining pipeline (d2v_jax/data/audio.py) and its sources.

All data is generated here. Most tests read a "ramp" folder: utterance k holds the int16 samples
k * 2048 + t (t = 0 .. L-1), stored losslessly as FLAC, so every cropped row tells which
utterance it came from and where the crop started.
"""

import logging

import grain
import ml_collections
import numpy as np
import pytest
import soundfile

from configs import audio as audio_config
from d2v_jax import evaluate
from d2v_jax.data import (
  audio,
  load_embedded_speech_index,
  make_audio_pretrain_dataset,
  read_audio,
  sources,
)

RATE = 16000
CROPS = (400, 800, 1200)
MIN_LENGTH = 200
BATCH = 4
# Per bucket: 2 short (skipped); 3 padded + 6 cropped to 400 (2 batches, 1 dropped);
# 4 cropped to 800 (1 batch); 5 cropped to 1200 (1 batch, 1 dropped).
RAMP_LENGTHS = (100, 150, 250, 300, 390, 400, 500, 799, 450, 600, 700, 800, 900, 1000, 1199)
RAMP_LENGTHS += (1200, 1500, 2000, 2047, 1300)
RAMP_BATCHES_PER_EPOCH = 4
_RAMP_STEP = 2048  # k * 2048 + t stays inside int16 for k in [-10, 9] and t < 2048


def _write(path, wave, rate=RATE):
  path.parent.mkdir(parents=True, exist_ok=True)
  lossless = path.suffix.lower() in (".wav", ".flac")  # OGG is Vorbis only
  soundfile.write(path, wave, rate, subtype="PCM_16" if lossless else None)
  return path


def _ramp_id(i: int) -> int:
  return i - len(RAMP_LENGTHS) // 2


@pytest.fixture(scope="module")
def ramp_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("ramp")
  for i, length in enumerate(RAMP_LENGTHS):
    samples = _ramp_id(i) * _RAMP_STEP + np.arange(length)
    _write(root / f"utt{i:02d}.flac", samples.astype(np.int16))
  return root


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory):
  """Loud noise with an offset, some of it short enough to be padded."""
  root = tmp_path_factory.mktemp("noise")
  rng = np.random.default_rng(0)
  for i, length in enumerate([250, 300, 350, 390, 500, 700, 900, 1100]):
    _write(root / f"n{i}.wav", (0.2 + 0.3 * rng.standard_normal(length)).clip(-1, 1))
  return root


def _input_cfg(path, **overrides) -> ml_collections.ConfigDict:
  cfg = dict(
    source="folder",
    path=str(path),
    split="train",
    tfds_data_dir="",
    tfds_feature="audio",
    sample_rate=RATE,
    batch_size=BATCH,
    crop_lengths=CROPS,
    min_length=MIN_LENGTH,
    normalize=False,
    num_workers=0,
  )
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["audio"], y["audio"])
    np.testing.assert_array_equal(x["padding_mask"], y["padding_mask"])


def _decode_ramp_row(row, num_valid):
  """(utterance index, crop start) of a row cut from the ramp folder with normalize=False."""
  samples = np.round(row[:num_valid] * 32768).astype(np.int64)
  ramp_id, start = divmod(int(samples[0]), _RAMP_STEP)
  np.testing.assert_array_equal(samples, samples[0] + np.arange(num_valid))  # one contiguous crop
  return ramp_id + len(RAMP_LENGTHS) // 2, start


# ---------------------------------------------------------------------------------------------
# Batches: shapes, buckets, crops, padding, normalisation.


def test_assign_buckets_takes_largest_crop_that_fits():
  lengths = np.array([10, 399, 400, 799, 800, 1199, 1200, 10**6])
  np.testing.assert_array_equal(audio.assign_buckets(lengths, CROPS), [0, 0, 0, 0, 1, 1, 2, 2])


def test_batches_are_bucketed_cropped_and_padded(ramp_dir):
  ds = make_audio_pretrain_dataset(_input_cfg(ramp_dir), seed=0)
  assert ds.batches_per_epoch == RAMP_BATCHES_PER_EPOCH
  assert ds.crop_lengths == CROPS
  iterator = iter(ds)
  for _ in range(2):  # two epochs
    seen = []
    for batch in _take(iterator, ds.batches_per_epoch):
      assert set(batch) == {"audio", "padding_mask"}
      assert batch["audio"].dtype == np.float32 and batch["padding_mask"].dtype == bool
      assert batch["audio"].shape == batch["padding_mask"].shape
      num_rows, length = batch["audio"].shape
      assert num_rows == BATCH and length in CROPS
      for row, mask in zip(batch["audio"], batch["padding_mask"]):
        num_valid = int((~mask).sum())
        assert not mask[:num_valid].any()  # padding only at the end
        np.testing.assert_array_equal(row[num_valid:], 0.0)
        utterance, start = _decode_ramp_row(row, num_valid)
        full_length = RAMP_LENGTHS[utterance]
        assert full_length >= MIN_LENGTH
        if full_length < CROPS[0]:  # padded whole
          assert (length, num_valid, start) == (CROPS[0], full_length, 0)
        else:  # cropped to the largest crop length that fits
          assert length == max(c for c in CROPS if c <= full_length)
          assert num_valid == length and start + length <= full_length
        seen.append(utterance)
    assert len(seen) == len(set(seen)) == RAMP_BATCHES_PER_EPOCH * BATCH  # each at most once


def test_short_utterances_are_skipped_and_counted(ramp_dir, caplog):
  with caplog.at_level(logging.INFO):
    ds = make_audio_pretrain_dataset(_input_cfg(ramp_dir), seed=0)
  assert ds.stats.skipped_short == sum(length < MIN_LENGTH for length in RAMP_LENGTHS) == 2
  assert ds.stats.listed == len(RAMP_LENGTHS)
  assert "utt00.flac" in caplog.text and "utt01.flac" in caplog.text
  assert "2 short" in caplog.text  # the summary line


def test_normalisation_over_valid_samples(noise_dir):
  raw = make_audio_pretrain_dataset(_input_cfg(noise_dir, batch_size=2), seed=3)
  normed = make_audio_pretrain_dataset(_input_cfg(noise_dir, batch_size=2, normalize=True), seed=3)
  num_padded_rows = 0
  for index in range(2 * raw.batches_per_epoch):
    x, y = raw.batches[index], normed.batches[index]
    np.testing.assert_array_equal(x["padding_mask"], y["padding_mask"])  # same crops
    for row, normed_row, mask in zip(x["audio"], y["audio"], y["padding_mask"]):
      valid = row[~mask]
      expected = (valid - valid.mean()) / np.sqrt(valid.var() + 1e-5)
      np.testing.assert_allclose(normed_row[~mask], expected, rtol=1e-5, atol=1e-5)
      assert abs(normed_row[~mask].mean()) < 1e-5
      assert normed_row[~mask].var() == pytest.approx(1.0, abs=1e-3)
      np.testing.assert_array_equal(normed_row[mask], 0.0)
      num_padded_rows += mask.any()
  assert num_padded_rows > 0


# ---------------------------------------------------------------------------------------------
# Sharding, determinism, resume.


def test_process_slices_concatenate_to_the_global_batch(ramp_dir):
  whole = make_audio_pretrain_dataset(_input_cfg(ramp_dir), seed=5)
  parts = [
    make_audio_pretrain_dataset(_input_cfg(ramp_dir), seed=5, process_index=p, process_count=2)
    for p in range(2)
  ]
  for index in range(2 * whole.batches_per_epoch):
    for key in ("audio", "padding_mask"):
      halves = [part.batches[index][key] for part in parts]
      assert halves[0].shape[0] == BATCH // 2
      np.testing.assert_array_equal(np.concatenate(halves), whole.batches[index][key])


def test_batch_size_must_divide_across_processes(ramp_dir):
  with pytest.raises(ValueError, match="batch_size=4.*process_count=3"):
    make_audio_pretrain_dataset(_input_cfg(ramp_dir), seed=0, process_count=3)


def test_same_seed_same_batches_other_seed_or_epoch_differs(ramp_dir):
  def first_batches(seed, start=0):
    ds = make_audio_pretrain_dataset(_input_cfg(ramp_dir), seed=seed)
    return [ds.batches[start + i] for i in range(RAMP_BATCHES_PER_EPOCH)]

  epoch0 = first_batches(seed=1)
  _assert_batches_equal(epoch0, first_batches(seed=1))
  for other in (first_batches(seed=2), first_batches(seed=1, start=RAMP_BATCHES_PER_EPOCH)):
    assert any(
      a["audio"].shape != b["audio"].shape or not np.array_equal(a["audio"], b["audio"])
      for a, b in zip(epoch0, other)
    )


@pytest.mark.parametrize("num_workers", [0, 1])
def test_iterator_resumes_exactly_from_its_state(ramp_dir, num_workers):
  ds = make_audio_pretrain_dataset(_input_cfg(ramp_dir, num_workers=num_workers), seed=0)
  iterator = iter(ds)
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 6)  # crosses into the next epoch
  iterator.close()
  resumed = iter(make_audio_pretrain_dataset(_input_cfg(ramp_dir, num_workers=num_workers), seed=0))
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 6), expected)
  resumed.close()


def test_iterator_checkpoints_with_orbax_beside_the_train_state(ramp_dir, tmp_path):
  import orbax.checkpoint as ocp

  def dataset():
    return make_audio_pretrain_dataset(_input_cfg(ramp_dir), seed=0)

  iterator = iter(dataset())
  _take(iterator, 2)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    state = {"w": np.arange(3.0)}
    manager.save(
      2,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)
      ),
    )
    manager.wait_until_finished()
    expected = _take(iterator, 3)
    resumed = iter(dataset())
    restored = manager.restore(
      2,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), data=grain.checkpoint.CheckpointRestore(resumed)
      ),
    )
  np.testing.assert_array_equal(restored["state"]["w"], state["w"])
  _assert_batches_equal(_take(resumed, 3), expected)


# ---------------------------------------------------------------------------------------------
# Sources.


def test_folder_source_is_recursive_sorted_and_filtered(tmp_path):
  for name, length in [("b/2.wav", 600), ("a.flac", 500), ("b/1.ogg", 700), ("c/3.WAV", 800)]:
    _write(tmp_path / name, np.zeros(length))
  (tmp_path / "notes.txt").write_text("not audio")
  source = sources.folder_source(tmp_path, RATE)
  assert [p.removeprefix(str(tmp_path) + "/") for p in source.paths] == [
    "a.flac",
    "b/1.ogg",
    "b/2.wav",
    "c/3.WAV",
  ]
  np.testing.assert_array_equal(source.lengths, [500, 700, 600, 800])
  assert source[1].dtype == np.float32 and source[1].shape == (700,)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.folder_source(tmp_path / "nowhere", RATE)


def test_manifest_source(ramp_dir, tmp_path):
  names = ["utt05.flac", "utt12.flac", "utt19.flac"]
  manifest = tmp_path / "train.tsv"
  rows = [f"{name}\t{RAMP_LENGTHS[int(name[3:5])]}" for name in names]
  rows.append("gone.flac\t1000")  # listed, but not on disk: skipped as unreadable
  manifest.write_text("\n".join([str(ramp_dir), *rows]) + "\n")
  source = sources.manifest_source(manifest, RATE)
  assert source.stats.listed == 4 and source.stats.skipped_unreadable == 1
  assert source.paths == [str(ramp_dir / name) for name in names]
  np.testing.assert_array_equal(source.lengths, [RAMP_LENGTHS[5], RAMP_LENGTHS[12], 1300])
  np.testing.assert_allclose(source[0] * 32768, _ramp_id(5) * _RAMP_STEP + np.arange(400))
  ds = make_audio_pretrain_dataset(
    _input_cfg(manifest, source="manifest", batch_size=1, crop_lengths=(400,)), seed=0
  )
  assert ds.batches[0]["audio"].shape == (1, 400)
  with pytest.raises(FileNotFoundError, match="missing.tsv"):
    sources.manifest_source(tmp_path / "missing.tsv", RATE)


def test_embedded_index_and_source(tmp_path):
  rows = []
  for i, (kind, split, length) in enumerate(
    [("word", "train", 5000), ("sentence", "train", 20000), ("word", "test", 6000)]
  ):
    _write(tmp_path / "clips" / f"{i}.flac", np.zeros(length))
    word = "yes" if kind == "word" else ""
    rows.append(f"clips/{i}.flac\t{length}\t{kind}\t{split}\t{word}\tsay yes\tf3\t150\t50")
  header = "path\tnum_samples\tkind\tsplit\tword\ttranscript\tvoice\tspeed\tpitch"
  (tmp_path / "index.tsv").write_text("\n".join([header, *rows]) + "\n")

  clips = load_embedded_speech_index(root=tmp_path)
  assert [(c.kind, c.split, c.num_samples) for c in clips] == [
    ("word", "train", 5000),
    ("sentence", "train", 20000),
    ("word", "test", 6000),
  ]
  assert clips[0].path == tmp_path / "clips" / "0.flac" and clips[0].word == "yes"
  assert [
    c.num_samples for c in load_embedded_speech_index(split="train", kind="word", root=tmp_path)
  ] == [5000]
  assert len(load_embedded_speech_index(split="all", root=tmp_path)) == 3

  cfg = audio_config.get_config().input  # the real config group, pointed at this copy
  cfg.path, cfg.batch_size, cfg.crop_lengths = str(tmp_path), 2, (4000,)
  ds = make_audio_pretrain_dataset(cfg, seed=0)
  assert ds.stats.listed == 2  # the train split only
  assert ds.batches[0]["audio"].shape == (2, 4000)
  with pytest.raises(FileNotFoundError, match="index.tsv"):
    load_embedded_speech_index(root=tmp_path / "nowhere")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A tiny TFDS dataset written as ArrayRecord with an int16 Tensor feature (no TensorFlow)."""
  import tensorflow_datasets as tfds

  lengths = [500, 0, 900, 1300, 450]  # one empty record

  class TinySpeechForTest(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = {"audio": tfds.features.Tensor(shape=(None,), dtype=np.int16)}
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, length in enumerate(lengths):
        yield i, {"audio": (i * 1000 + np.arange(length)).astype(np.int16)}

  data_dir = tmp_path_factory.mktemp("tfds")
  TinySpeechForTest(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_source(tfds_dir):
  source = sources.TfdsAudioSource("tiny_speech_for_test", "train", RATE, data_dir=str(tfds_dir))
  assert source.stats.skipped_empty == 1 and len(source) == 4
  assert sorted(source.lengths) == [450, 500, 900, 1300]
  for i in range(len(source)):
    wave = source[i]
    assert wave.dtype == np.float32 and wave.shape == (source.lengths[i],)
    first = round(wave[0] * 32768)  # record i holds i * 1000 + t
    np.testing.assert_array_equal(np.round(wave * 32768), first + np.arange(len(wave)))
  cfg = _input_cfg(
    "tiny_speech_for_test", source="tfds", tfds_data_dir=str(tfds_dir), crop_lengths=(400,)
  )
  ds = make_audio_pretrain_dataset(cfg, seed=0)
  assert ds.batches_per_epoch == 1 and ds.batches[0]["audio"].shape == (BATCH, 400)


# ---------------------------------------------------------------------------------------------
# Bad input.


def _good_level(i: int) -> float:
  return (i + 1) / 20


def _folder_with(tmp_path, extra: dict[str, np.ndarray | bytes], rate=RATE, num_good=4):
  """`num_good` usable files (good{i}.flac holds the constant _good_level(i)), plus `extra`."""
  for i in range(num_good):
    _write(tmp_path / f"good{i}.flac", np.full(500 + i, _good_level(i)))
  for name, content in extra.items():
    if isinstance(content, bytes):
      (tmp_path / name).write_bytes(content)
    else:
      _write(tmp_path / name, content, rate)
  return tmp_path


def test_corrupt_files_are_skipped_and_logged(tmp_path, caplog):
  garbage = np.random.default_rng(0).bytes(4000)
  folder = _folder_with(tmp_path, {"bad.flac": garbage, "bad.wav": garbage})
  with caplog.at_level(logging.WARNING):
    ds = make_audio_pretrain_dataset(_input_cfg(folder), seed=0)
  assert ds.stats.skipped_unreadable == 2
  assert str(folder / "bad.flac") in caplog.text and str(folder / "bad.wav") in caplog.text
  assert ds.batches[0]["audio"].shape == (BATCH, 400)


def test_stereo_is_downmixed(tmp_path, caplog):
  stereo = np.stack([np.full(600, 0.5), np.full(600, -0.25)], axis=1)  # [T, 2]
  folder = _folder_with(tmp_path, {"stereo.wav": stereo}, num_good=3)
  np.testing.assert_allclose(read_audio(folder / "stereo.wav", RATE), 0.125, atol=1e-4)
  with caplog.at_level(logging.WARNING):
    ds = make_audio_pretrain_dataset(_input_cfg(folder), seed=0)
  assert ds.stats.downmixed == 1
  assert caplog.text.count("stereo.wav") == 1
  rows = ds.batches[0]["audio"]
  assert rows.shape == (BATCH, 400) and np.isclose(rows, 0.125, atol=1e-4).all(axis=1).any()


def test_wrong_sample_rate_is_an_error(tmp_path):
  folder = _folder_with(tmp_path, {"narrow.wav": np.zeros(800)}, rate=8000)
  with pytest.raises(ValueError, match=r"narrow\.wav.*8000 Hz, expected 16000 Hz"):
    make_audio_pretrain_dataset(_input_cfg(folder), seed=0)
  with pytest.raises(ValueError, match="8000 Hz"):
    read_audio(folder / "narrow.wav", RATE)


def test_empty_files_are_skipped(tmp_path):
  # A 0-frame WAV keeps its header; libsndfile writes a 0-frame FLAC as a zero-byte file.
  folder = _folder_with(tmp_path, {"empty.wav": np.zeros(0), "empty.flac": b""})
  ds = make_audio_pretrain_dataset(_input_cfg(folder), seed=0)
  assert ds.stats.skipped_empty == 2 and ds.stats.skipped_unreadable == 0


def test_source_without_usable_files_is_an_error(tmp_path):
  folder = _folder_with(tmp_path, {"bad.flac": b"garbage" * 100}, num_good=0)
  with pytest.raises(ValueError, match=f"folder {folder}.*no usable records"):
    make_audio_pretrain_dataset(_input_cfg(folder), seed=0)
  with pytest.raises(ValueError, match="empty list has no usable records"):
    sources.AudioFileSource("empty list", [], RATE)


def test_too_few_utterances_for_a_batch_is_an_error(tmp_path):
  folder = _folder_with(tmp_path, {}, num_good=3)
  with pytest.raises(ValueError, match="no length bucket holds a full global batch of 4"):
    make_audio_pretrain_dataset(_input_cfg(folder), seed=0)


def test_decode_failure_after_indexing_is_substituted(tmp_path, caplog):
  folder = _folder_with(tmp_path, {}, num_good=8)  # one bucket, 2 batches per epoch
  ds = make_audio_pretrain_dataset(_input_cfg(folder), seed=0)
  (folder / "good3.flac").unlink()  # passed the header check, cannot be decoded now
  with caplog.at_level(logging.WARNING):
    epoch = [ds.batches[i] for i in range(ds.batches_per_epoch)]
  assert ds.stats.decode_failures == 1
  assert "good3.flac" in caplog.text
  rows = np.concatenate([b["audio"] for b in epoch])  # [8, 400]
  assert not np.concatenate([b["padding_mask"] for b in epoch]).any()
  # good4, the next member of good3's bucket, stands in for it.
  levels = sorted(np.round(rows[:, 0] * 20).astype(int) - 1)  # the i of each row's good{i}
  assert levels == [0, 1, 2, 4, 4, 5, 6, 7]


@pytest.mark.parametrize(
  "bad, says", [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"), (1e30, r"reach 1e\+30")]
)
def test_non_finite_samples_are_substituted_and_named(tmp_path, caplog, bad, says):
  """Issue 23: NaN, Inf or 1e30 samples in a float WAV never reach a batch; the file is named."""
  wave = np.full(500, 0.5, np.float32)
  wave[7] = bad
  folder = _folder_with(tmp_path, {}, num_good=8)
  soundfile.write(folder / "good3.wav", wave, RATE, subtype="FLOAT")  # same bucket as good3
  (folder / "good3.flac").unlink()
  with pytest.raises(sources.NonFiniteAudioError, match=f"good3.wav: .*{says}"):
    read_audio(folder / "good3.wav", RATE)
  ds = make_audio_pretrain_dataset(_input_cfg(folder), seed=0)
  with caplog.at_level(logging.WARNING):
    rows = np.concatenate([ds.batches[i]["audio"] for i in range(ds.batches_per_epoch)])
  assert np.isfinite(rows).all() and ds.stats.decode_failures == 1
  assert str(folder / "good3.wav") in caplog.text


def test_a_manifest_that_is_not_utf8_names_its_path(tmp_path):
  manifest = tmp_path / "train.tsv"
  manifest.write_bytes(b"/data\n\xff\xfe.wav\t100\n")
  with pytest.raises(ValueError, match=f"{manifest} is not UTF-8 text"):
    sources.manifest_source(manifest, RATE)


def test_probe_sets_skip_undecodable_clips_and_count_them(monkeypatch, caplog):
  """Issue 23: a probe-set clip with NaN samples is skipped with its path and counted."""
  clips = sources.load_embedded_speech_index(split="test", kind="word")
  bad = str(clips[3].path)
  real = sources.read_audio

  def read(path, rate):
    if str(path) == bad:
      raise sources.NonFiniteAudioError(f"{path}: 1 of 100 samples are NaN or infinite")
    return real(path, rate)

  monkeypatch.setattr(sources, "read_audio", read)
  with caplog.at_level(logging.WARNING):
    data = evaluate.load_word_clips("test")
  assert len(data.labels) == len(clips) - 1
  assert bad in caplog.text and f"skipped 1 of {len(clips)} clips" in caplog.text
  assert np.isfinite(data.inputs).all()
