"""Feature extraction: layers, masks and padding invariance of `Extractor`, the CLI's files."""

import json

import jax
import numpy as np
import pytest
import soundfile
from PIL import Image

from d2v_jax import extract, pretrained
from d2v_jax.data import image as image_data
from d2v_jax.models import audio as audio_model
from tests import helpers

SAMPLE_RATE = 16000


@pytest.fixture(scope="module")
def audio_extractor(tmp_path_factory):
  workdir = helpers.save_pretraining_checkpoint(
    tmp_path_factory.mktemp("audio_run"), helpers.tiny_config(), helpers.tiny_params()
  )
  return extract.load_extractor(workdir, compiler_options=helpers.FAST_COMPILE)


@pytest.fixture(scope="module")
def image_extractor(tmp_path_factory):
  workdir = helpers.save_pretraining_checkpoint(
    tmp_path_factory.mktemp("image_run"), helpers.image_step_config(), helpers.image_params()
  )
  step_dir = workdir / "checkpoints" / "1"  # a step directory works as well as the workdir
  return extract.load_extractor(step_dir, compiler_options=helpers.FAST_COMPILE)


@pytest.fixture(scope="module")
def text_extractor(tmp_path_factory):
  workdir = helpers.save_pretraining_checkpoint(
    tmp_path_factory.mktemp("text_run"), helpers.text_step_config(), helpers.text_params()
  )
  return extract.load_extractor(workdir, compiler_options=helpers.FAST_COMPILE)


def tone(num_samples: int, seed: int) -> np.ndarray:
  """A harmonic tone with noise, not normalised (the extractor normalises)."""
  rng = np.random.default_rng(seed)
  t = np.arange(num_samples) / SAMPLE_RATE
  f0 = rng.uniform(100, 300)
  wave = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 5))
  return (0.3 * wave + 0.05 * rng.standard_normal(num_samples) + 0.1).astype(np.float32)


def normalized(wave):
  return (wave - wave.mean()) / np.sqrt(wave.var() + 1e-5)


def test_padded_waveform_gives_the_features_of_the_unpadded_one(audio_extractor):
  short, full = tone(11000, 0), tone(16000, 1)
  features = audio_extractor.extract_waveforms([short, full], SAMPLE_RATE)
  frames = audio_model.output_lengths(16000)  # 49: the longest input's frames
  assert features.layers.shape == (3, 2, frames, 32)  # encoder input + 2 blocks
  assert features.layer_ids == (0, 1, 2) and features.cls is None
  valid = audio_model.output_lengths(11000)  # 34
  np.testing.assert_array_equal(features.padding_mask[0], np.arange(frames) >= valid)
  assert not features.padding_mask[1].any()
  assert np.all(features.layers[:, 0, valid:] == 0)  # padded frames read zero
  # The same clip alone, unpadded, normalised here by an independent numpy reference.
  alone = audio_extractor(normalized(short)[None])
  assert alone.layers.shape == (3, 1, valid, 32)
  np.testing.assert_allclose(features.valid(0), alone.layers[:, 0], atol=1e-4)
  assert np.abs(alone.layers).max() > 0.1  # not trivially equal
  # Layer 0 is the encoder input, not a copy of a block's output.
  assert not np.allclose(features.layers[0], features.layers[1], atol=1e-2)


def test_waveform_arguments_are_checked(audio_extractor):
  with pytest.raises(ValueError, match="8000 Hz.*16000 Hz"):
    audio_extractor.extract_waveforms([tone(8000, 0)], 8000)
  with pytest.raises(ValueError, match=r"waves\[1\].*shorter than one frame"):
    audio_extractor.extract_waveforms([tone(8000, 0), tone(300, 1)], SAMPLE_RATE)
  with pytest.raises(ValueError, match=r"waves\[0\].*mono"):
    audio_extractor.extract_waveforms([np.zeros((2, 8000), np.float32)], SAMPLE_RATE)
  with pytest.raises(ValueError, match="needs an image model"):
    audio_extractor.extract_images([np.zeros((8, 8, 3), np.uint8)])
  with pytest.raises(ValueError, match="layers 0..2"):
    audio_extractor.extract_waveforms([tone(8000, 0)], SAMPLE_RATE, layers=[3])


def test_resolve_layers():
  assert extract.resolve_layers("all", 12) == tuple(range(13))
  assert extract.resolve_layers(None, 2) == (0, 1, 2)
  assert extract.resolve_layers("last", 12) == (12,)
  assert extract.resolve_layers("0, 6,-1", 12) == (0, 6, 12)
  with pytest.raises(ValueError, match="out of range"):
    extract.resolve_layers("13", 12)
  with pytest.raises(ValueError, match="comma-separated"):
    extract.resolve_layers("first", 12)


def test_image_batch_shapes_and_the_deterministic_view(image_extractor):
  rng = np.random.default_rng(0)
  array = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
  grey = Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L")
  features = image_extractor.extract_images([array, grey])
  assert features.layers.shape == (3, 2, 16, 32)  # 16x16 images in 4x4 patches
  assert features.cls.shape == (2, 32)
  assert not features.padding_mask.any()
  # Same as the model on the evaluation view, prepared independently of the batch helper.
  view = image_data.eval_image(array, 16)[None]
  direct = image_extractor(np.concatenate([view, view]))
  np.testing.assert_allclose(features.layers[:, 0], direct.layers[:, 0], atol=1e-5)
  np.testing.assert_allclose(features.cls[0], direct.cls[0], atol=1e-5)
  with pytest.raises(ValueError, match=r"images\[0\].*uint8"):
    image_extractor.extract_images([np.zeros((8, 8, 3), np.float32)])


def test_text_features_do_not_depend_on_padding(text_extractor):
  short = "In the beginning God created the heaven and the earth."
  long = short + " And the earth was without form, and void; and darkness was upon the face."
  alone = text_extractor.extract_texts([short])
  batch = text_extractor.extract_texts([short, long])
  num_tokens = len(text_extractor.tokenizer.encode(short)) + 2  # <s> ... </s>
  assert (~alone.padding_mask[0]).sum() == num_tokens
  assert alone.layers.shape == (3, 1, num_tokens, 32)
  longest = len(text_extractor.tokenizer.encode(long)) + 2
  assert batch.layers.shape == (3, 2, longest, 32) and longest > num_tokens
  np.testing.assert_array_equal(batch.padding_mask[0], np.arange(longest) >= num_tokens)
  np.testing.assert_allclose(batch.valid(0), alone.valid(0), atol=1e-5)
  with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
    text_extractor.extract_texts([short, "   "])


def test_weighted_layer_sum_starts_as_the_mean_and_follows_its_weights():
  rng = np.random.default_rng(0)
  scales = np.array([1, 3, 10], np.float32)[:, None, None, None]
  layers = rng.normal(size=(3, 2, 5, 4)).astype(np.float32) * scales
  module = extract.WeightedLayerSum()
  params = module.init(jax.random.key(0), layers)
  np.testing.assert_allclose(module.apply(params, layers), layers.mean(0), atol=1e-6)
  # softmax([0, log 3, -inf-ish]) = [1/4, 3/4, 0]
  weights = {"params": {"weights": np.array([0.0, np.log(3.0), -30.0], np.float32)}}
  want = 0.25 * layers[0] + 0.75 * layers[1]
  np.testing.assert_allclose(module.apply(weights, layers), want, atol=1e-5)
  normed = extract.WeightedLayerSum(layer_norm=True).apply(params, list(layers))
  mean, var = layers.mean(-1, keepdims=True), layers.var(-1, keepdims=True)
  np.testing.assert_allclose(normed, ((layers - mean) / np.sqrt(var + 1e-5)).mean(0), atol=1e-5)


def test_cli_writes_audio_features_and_skips_a_corrupt_file(audio_extractor, tmp_path):
  folder = tmp_path / "wavs"
  (folder / "speaker").mkdir(parents=True)
  waves = {"a.wav": tone(8000, 2), "speaker/b.flac": tone(12000, 3)}
  for name, wave in waves.items():
    soundfile.write(folder / name, wave, SAMPLE_RATE)
  (folder / "broken.wav").write_bytes(b"RIFF0000WAVEnot really audio")
  summary = extract.run_extraction(audio_extractor, folder, tmp_path / "out", "all", "npz")
  assert summary["written"] == 2 and summary["skipped"] == 1
  reference = audio_extractor.extract_waveforms(
    [soundfile.read(folder / n, dtype="float32")[0] for n in waves], SAMPLE_RATE
  )
  for row, (name, wave) in enumerate(waves.items()):
    saved = np.load(tmp_path / "out" / name.replace(".wav", ".npz").replace(".flac", ".npz"))
    assert saved["layers"].shape == (3, audio_model.output_lengths(len(wave)), 32)
    np.testing.assert_array_equal(saved["layer_ids"], [0, 1, 2])
    np.testing.assert_allclose(saved["layers"], reference.valid(row), atol=1e-4)
  index = (tmp_path / "out" / "index.tsv").read_text().splitlines()
  assert index[0] == "file\tinput\tlength" and len(index) == 3
  assert sorted(line.split("\t")[0] for line in index[1:]) == ["a.npz", "speaker/b.npz"]
  # A fairseq manifest of the same files names its outputs after the paths under its root.
  manifest = tmp_path / "train.tsv"
  manifest.write_text(f"{folder}\nspeaker/b.flac\t12000\nbroken.wav\t100\n")
  summary = extract.run_extraction(audio_extractor, manifest, tmp_path / "from_manifest")
  assert summary["written"] == 1 and summary["skipped"] == 1
  saved = np.load(tmp_path / "from_manifest" / "speaker" / "b.npz")
  np.testing.assert_allclose(saved["layers"], reference.valid(1), atol=1e-4)
  # Another sample rate is refused, naming the file, rather than silently misread.
  soundfile.write(folder / "c.wav", tone(8000, 4), 8000)
  with pytest.raises(ValueError, match="c.wav: sample rate 8000 Hz, expected 16000"):
    extract.run_extraction(audio_extractor, folder, tmp_path / "out")


def test_cli_images_last_layer_as_npy(image_extractor, tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(folder / "one.png")
  (folder / "two.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  summary = extract.run_extraction(image_extractor, folder, tmp_path / "out", "last", "npy")
  assert summary["written"] == 1 and summary["skipped"] == 1 and summary["layers"] == [2]
  layers = np.load(tmp_path / "out" / "one.npy")
  cls = np.load(tmp_path / "out" / "one.cls.npy")
  reference = image_extractor.extract_images([pixels])
  np.testing.assert_allclose(layers, reference.layers[2:, 0], atol=1e-5)
  np.testing.assert_allclose(cls, reference.cls[0], atol=1e-5)


def test_cli_text_file_names_outputs_by_line(text_extractor, tmp_path):
  lines = ["In the beginning God created the heaven and the earth.", "", "And God said."]
  (tmp_path / "verses.txt").write_text("\n".join(lines) + "\n")
  summary = extract.run_extraction(text_extractor, tmp_path / "verses.txt", tmp_path / "out")
  assert summary["written"] == 2 and summary["blank_lines"] == 1 and summary["skipped"] == 0
  saved = np.load(tmp_path / "out" / "line000003.npz")
  assert saved["layers"].shape == (3, len(text_extractor.tokenizer.encode(lines[2])) + 2, 32)
  assert "cls" not in saved


def test_wrong_paths_give_clear_errors(audio_extractor, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    extract.run_extraction(tmp_path / "no_such_run", tmp_path, tmp_path / "out")
  with pytest.raises(FileNotFoundError, match="missing_folder"):
    extract.run_extraction(audio_extractor, tmp_path / "missing_folder", tmp_path / "out")
  with pytest.raises(ValueError, match="format="):
    extract.run_extraction(audio_extractor, tmp_path, tmp_path / "out", fmt="h5")


def test_input_settings_default_to_the_modality_config_without_config_json(tmp_path):
  helpers.save_pretraining_checkpoint(
    tmp_path, helpers.image_step_config(), helpers.image_params(), with_config=False
  )
  run = pretrained.load_pretrained(tmp_path)
  input_cfg = extract.run_input_config(run)
  assert tuple(input_cfg.mean) == image_data.IMAGENET_MEAN
  (tmp_path / "config.json").write_text(json.dumps({"modality": "audio", "input": {}}))
  with pytest.raises(ValueError, match="audio run"):
    extract.run_input_config(run)


def test_cli_skips_non_finite_audio_and_writes_the_rest(audio_extractor, tmp_path, caplog):
  """Issue 23: a NaN or 1e30 file is a counted skip naming its path, not the job's end."""
  folder = tmp_path / "wavs"
  folder.mkdir()
  soundfile.write(folder / "a.wav", tone(8000, 2), SAMPLE_RATE)
  for name, bad in (("nan.wav", np.nan), ("huge.wav", 1e30)):
    wave = tone(8000, 3)
    wave[100] = bad
    soundfile.write(folder / name, wave, SAMPLE_RATE, subtype="FLOAT")
  with caplog.at_level("WARNING"):
    summary = extract.run_extraction(audio_extractor, folder, tmp_path / "out")
  assert summary["written"] == 1 and summary["skipped"] == 2
  assert str(folder / "nan.wav") in caplog.text and str(folder / "huge.wav") in caplog.text
  assert (tmp_path / "out" / "a.npz").is_file()
