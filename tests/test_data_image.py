"""Tests for the image pretraining pipeline (d2v_jax/data/image.py) and its sources.

All data is generated here, or is scikit-learn's digits. Several tests read folders of solid-colour
images: any crop of image k is colour k, so every augmented row (without colour jitter) tells which
image it came from.
"""

import io
import logging
import pickle
import struct
import zlib

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, ImageEnhance

from d2v_jax.data import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  eval_image,
  image,
  image_sources,
  load_digit_probe_sets,
  make_image_pretrain_dataset,
  make_image_source,
)

SIZE = 16
BICUBIC = Image.Resampling.BICUBIC
BATCH = 8
NUM_DIGITS = 1797


def _input_cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(
    source="embedded",
    path="",
    split="train",
    tfds_data_dir="",
    tfds_feature="image",
    image_size=SIZE,
    batch_size=BATCH,
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    flip=True,
    color_jitter=0.4,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    num_workers=0,
  )
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _take(iterator, n):
  return [next(iterator)["image"] for _ in range(n)]


def _pixels(normalised: np.ndarray) -> np.ndarray:
  """Undoes the normalisation: float32[..., 3] -> pixel values (0..255, not rounded)."""
  return (normalised * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)) * 255


def _colour(k: int) -> tuple[int, int, int]:
  return (20 * k + 5, 250 - 20 * k, (37 * k) % 256)


def _solid_folder(root, num_images: int, size=(12, 9)):
  """Flat folder: img{k}.png filled with _colour(k)."""
  root.mkdir(parents=True, exist_ok=True)
  for k in range(num_images):
    Image.new("RGB", size, _colour(k)).save(root / f"img{k:02d}.png")
  return root


def _which_colour(row: np.ndarray, num_images: int) -> int:
  """The k of a row cut from a solid-colour image k (colour jitter off)."""
  mean = _pixels(row).reshape(-1, 3).mean(axis=0)
  distances = [np.abs(mean - _colour(k)).max() for k in range(num_images)]
  assert min(distances) < 1.0, "not a solid-colour row"
  return int(np.argmin(distances))


@pytest.fixture(scope="module")
def noise_image_dir(tmp_path_factory):
  """One smooth random 120x90 RGB image (large next to the crops)."""
  root = tmp_path_factory.mktemp("noise")
  rng = np.random.default_rng(0)
  small = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8))
  small.resize((120, 90), Image.Resampling.BILINEAR).save(root / "noise.png")
  return root


# ---------------------------------------------------------------------------------------------
# Batches: shapes, normalisation, determinism, sharding, resume.


def test_batches_have_the_right_shape_dtype_and_normalisation():
  ds = make_image_pretrain_dataset(_input_cfg(color_jitter=0.0), seed=0)
  assert ds.image_size == SIZE
  assert ds.batches_per_epoch == 1442 // BATCH
  assert ds.stats.listed == 1442 and ds.stats.converted == 0
  iterator = iter(ds)
  for batch in [next(iterator) for _ in range(3)]:
    assert set(batch) == {"image"}
    assert batch["image"].shape == (BATCH, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    pixels = _pixels(batch["image"])
    # Undoing mean/std gives whole pixel values in [0, 255]: (x / 255 - mean) / std was applied.
    np.testing.assert_allclose(pixels, np.round(pixels), atol=2e-3)
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
    # Digits are grey: without colour jitter the 3 channels agree.
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=2e-3)


def test_same_index_same_batch_other_seed_or_epoch_differs():
  def batches(seed, start=0, n=3):
    ds = make_image_pretrain_dataset(_input_cfg(), seed=seed)
    return [ds.batches[start + i]["image"] for i in range(n)], ds.batches_per_epoch

  first, per_epoch = batches(seed=1)
  again, _ = batches(seed=1)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  other_seed, _ = batches(seed=2)
  next_epoch, _ = batches(seed=1, start=per_epoch)
  for other in (other_seed, next_epoch):
    assert all(not np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_iterator_resumes_exactly_from_its_state(num_workers):
  cfg = _input_cfg(batch_size=64, num_workers=num_workers)  # 22 batches per epoch
  iterator = iter(make_image_pretrain_dataset(cfg, seed=0))
  _take(iterator, 20)
  state = iterator.get_state()
  expected = _take(iterator, 4)  # crosses into the next epoch
  iterator.close()
  resumed = iter(make_image_pretrain_dataset(cfg, seed=0))
  resumed.set_state(state)
  for a, b in zip(_take(resumed, 4), expected):
    np.testing.assert_array_equal(a, b)
  resumed.close()


def test_process_rows_concatenate_to_the_global_batch():
  whole = make_image_pretrain_dataset(_input_cfg(), seed=5)
  parts = [
    make_image_pretrain_dataset(_input_cfg(), seed=5, process_index=p, process_count=2)
    for p in range(2)
  ]
  for index in (0, 1, whole.batches_per_epoch + 3):
    halves = [part.batches[index]["image"] for part in parts]
    assert halves[0].shape == (BATCH // 2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(np.concatenate(halves), whole.batches[index]["image"])
  with pytest.raises(ValueError, match="batch_size=8.*process_count=3"):
    make_image_pretrain_dataset(_input_cfg(), seed=0, process_count=3)


def test_each_epoch_shuffles_and_uses_every_image_at_most_once(tmp_path):
  folder = _solid_folder(tmp_path, num_images=10)
  cfg = _input_cfg(source="folder", path=str(folder), batch_size=4, color_jitter=0.0)
  ds = make_image_pretrain_dataset(cfg, seed=0)
  assert ds.batches_per_epoch == 2  # 10 // 4, 2 images dropped per epoch
  epochs = []
  for epoch in range(3):
    rows = np.concatenate([ds.batches[epoch * 2 + i]["image"] for i in range(2)])
    epochs.append([_which_colour(row, 10) for row in rows])
    assert len(set(epochs[-1])) == 8
  assert epochs[0] != epochs[1] != epochs[2]


# ---------------------------------------------------------------------------------------------
# Augmentations.


def test_random_resized_crop_params_stay_in_range():
  height, width = 600, 800
  rng = np.random.default_rng(0)
  boxes = np.array(
    [
      image.random_resized_crop_params(height, width, (0.08, 1.0), (3 / 4, 4 / 3), rng)
      for _ in range(2000)
    ]
  )
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  area = h * w / (height * width)
  aspect = w / h
  # Rounding w and h to integers moves the area and ratio by well under 1%.
  assert area.min() >= 0.08 * 0.99 and area.max() <= 1.0
  assert aspect.min() >= 0.75 * 0.99 and aspect.max() <= 4 / 3 * 1.01
  # ... and the draws span the ranges.
  assert area.min() < 0.1 and area.max() > 0.9
  assert aspect.min() < 0.78 and aspect.max() > 1.28
  # The top-left corner is uniform over the free space: both edges are reached.
  assert (top == 0).any() and (left + w == width).any()


def test_random_resized_crop_falls_back_to_the_central_crop():
  rng = np.random.default_rng(0)
  params = image.random_resized_crop_params
  # No window of 8-100% of the area with ratio 3/4..4/3 fits a 10x1000 strip.
  assert params(10, 1000, (0.08, 1.0), (3 / 4, 4 / 3), rng) == (0, (1000 - 13) // 2, 10, 13)
  assert params(1000, 10, (0.08, 1.0), (3 / 4, 4 / 3), rng) == ((1000 - 13) // 2, 0, 13, 10)
  # A whole-image scale that a ratio range excluding the image's own cannot meet.
  assert params(100, 100, (1.0, 1.0), (1.5, 2.0), rng) == ((100 - 67) // 2, 0, 67, 100)
  assert params(60, 80, (1.0, 1.0), (4 / 3, 4 / 3), rng) == (0, 0, 60, 80)


def _augment(cfg, seed):
  return image.make_augment(cfg, seed)


def test_without_colour_jitter_a_row_is_the_plain_resized_crop(noise_image_dir):
  cfg = _input_cfg(source="folder", path=str(noise_image_dir), batch_size=1, color_jitter=0.0)
  cfg.flip = False
  ds = make_image_pretrain_dataset(cfg, seed=3)
  augment = _augment(cfg, seed=3)
  source = Image.open(noise_image_dir / "noise.png").convert("RGB")
  boxes = set()
  for epoch in range(4):  # one image, one batch per epoch: epoch = batch index, record 0
    top, left, h, w = augment.crop_box(90, 120, epoch, 0)
    boxes.add((top, left, h, w))
    crop = source.crop((left, top, left + w, top + h)).resize(
      (SIZE, SIZE), Image.Resampling.BICUBIC
    )
    expected = (np.asarray(crop) / 255 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(ds.batches[epoch]["image"][0], expected, atol=1e-5)
  assert len(boxes) == 4

  # Colour jitter keeps the crop and changes the colours: it acts on the whole image first.
  cfg.color_jitter = 0.4
  jittered = make_image_pretrain_dataset(cfg, seed=3)
  assert augment.jitter_params(0, 0) == ()
  augment = _augment(cfg, seed=3)
  for epoch in range(4):
    params = augment.jitter_params(epoch, 0)
    assert sorted(op for op, _ in params) == [0, 1, 2]
    whole = image.color_jitter(source, params)
    top, left, h, w = augment.crop_box(90, 120, epoch, 0)
    crop = whole.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), BICUBIC)
    row = jittered.batches[epoch]["image"][0]
    np.testing.assert_allclose(_pixels(row), np.asarray(crop), atol=2e-3)
    assert not np.allclose(row, ds.batches[epoch]["image"][0], atol=0.05)


def test_colour_jitter_factors_and_ops():
  rng = np.random.default_rng(0)
  draws = [image.color_jitter_params((0.4, 0.4, 0.4), rng) for _ in range(500)]
  factors = np.array([f for params in draws for _, f in params])
  assert factors.min() >= 0.6 and factors.max() <= 1.4
  assert factors.min() < 0.62 and factors.max() > 1.38
  assert len({tuple(op for op, _ in params) for params in draws}) == 6  # every order occurs
  assert image.color_jitter_params((0.0, 0.4, 0.0), rng)[0][0] == 1  # only contrast is left
  grey = Image.new("RGB", (4, 4), (100, 100, 100))
  colour = Image.new("RGB", (4, 4), (200, 100, 0))
  # Brightness scales; contrast of a flat image and saturation of a grey one change nothing.
  np.testing.assert_array_equal(np.asarray(image.color_jitter(grey, [(0, 1.3)])), 130)
  np.testing.assert_array_equal(np.asarray(image.color_jitter(grey, [(1, 0.6), (2, 1.4)])), 100)
  # Saturation 0 leaves the grey level (ITU-R 601-2 luma, as PIL's L) in all 3 channels.
  desaturated = np.asarray(image.color_jitter(colour, [(2, 0.0)]))
  np.testing.assert_array_equal(desaturated, round(200 * 0.299 + 100 * 0.587))


def test_colour_adjustments_equal_pil_image_enhance():
  rng = np.random.default_rng(0)
  picture = Image.fromarray(rng.integers(0, 256, (23, 31, 3), dtype=np.uint8))
  enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
  for adjust, enhancer in zip(image._ADJUSTMENTS, enhancers):
    for factor in (0.0, 0.6, 0.97, 1.0, 1.25, 1.4):
      np.testing.assert_array_equal(
        np.asarray(adjust(picture, factor)), np.asarray(enhancer(picture).enhance(factor))
      )


def test_flip_mirrors_the_same_crop(noise_image_dir):
  cfg = _input_cfg(source="folder", path=str(noise_image_dir), batch_size=1, color_jitter=0.0)
  flipped = make_image_pretrain_dataset(cfg, seed=0)
  cfg.flip = False
  plain = make_image_pretrain_dataset(cfg, seed=0)
  augment = _augment(_input_cfg(), seed=0)
  mirrored = []
  for epoch in range(12):
    a, b = flipped.batches[epoch]["image"][0], plain.batches[epoch]["image"][0]
    mirrored.append(augment.flips(epoch, 0))
    np.testing.assert_array_equal(a, b[:, ::-1] if mirrored[-1] else b)
    assert not np.array_equal(b, b[:, ::-1])
  assert any(mirrored) and not all(mirrored)


def test_augment_config_errors():
  for field, value in [
    ("crop_scale", (0.5, 0.2)),
    ("crop_scale", (0.0, 1.0)),
    ("crop_ratio", (1.0,)),
    ("color_jitter", -0.1),
    ("color_jitter", (0.4, 0.4)),
    ("std", (0.2, 0.0, 0.2)),
    ("mean", (0.5, 0.5)),
    ("image_size", 0),
  ]:
    with pytest.raises(ValueError, match=f"config.input.{field}"):
      make_image_pretrain_dataset(_input_cfg(**{field: value}), seed=0)
  augment = image.make_augment(_input_cfg(color_jitter=(0.1, 0.0, 0.3)), seed=0)
  assert augment.jitter == (0.1, 0.0, 0.3)


# ---------------------------------------------------------------------------------------------
# Evaluation views and the digits.


def test_eval_image_resizes_the_whole_image_and_normalises():
  rng = np.random.default_rng(0)
  square = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  expected = (square / 255 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
  np.testing.assert_allclose(eval_image(square, SIZE), expected, atol=1e-5)  # same size: as is
  flat = eval_image(np.full((5, 9, 3), (255, 0, 128), np.uint8), SIZE, (0.5, 0.5, 0.5), (0.5,) * 3)
  assert flat.shape == (SIZE, SIZE, 3) and flat.dtype == np.float32
  np.testing.assert_allclose(
    flat.reshape(-1, 3), [[1.0, -1.0, 128 / 127.5 - 1]] * SIZE**2, atol=1e-5
  )
  # Left half dark, right half bright: stays so after resizing (no crop, no flip).
  halves = np.zeros((8, 8, 3), np.uint8)
  halves[:, 4:] = 255
  out = _pixels(eval_image(halves, SIZE))
  assert out[:, : SIZE // 2 - 1].max() < 30 and out[:, SIZE // 2 + 1 :].min() > 225


def test_digits_split_is_stratified_disjoint_and_deterministic():
  images, labels = image_sources.load_digits_rgb()
  assert images.shape == (NUM_DIGITS, 8, 8, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images[..., 0], images[..., 1])
  ink = images[..., 0] * (16 / 255)  # back to load_digits' 0..16 levels
  np.testing.assert_allclose(ink, np.round(ink), atol=0.04)
  assert images.max() == 255 and images.min() == 0

  train = image_sources.digit_split_indices(labels, "train")
  test = image_sources.digit_split_indices(labels, "test")
  assert len(train) == 1442 and len(test) == 355
  assert not set(train) & set(test)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(NUM_DIGITS))
  np.testing.assert_array_equal(test, image_sources.digit_split_indices(labels, "test"))
  per_class = np.bincount(labels, minlength=10)
  np.testing.assert_array_equal(np.bincount(labels[test], minlength=10), per_class // 5)
  np.testing.assert_array_equal(image_sources.digit_split_indices(labels, "all"), np.arange(1797))

  source = image_sources.DigitsSource("test")
  assert len(source) == 355 and source.class_names == tuple("0123456789")
  np.testing.assert_array_equal(source.labels, labels[test])
  np.testing.assert_array_equal(source[3], images[test[3]])
  assert source.pil_image(3).mode == "RGB" and f"#{test[3]}" in source.describe(3)


def test_digit_probe_sets():
  train, test = load_digit_probe_sets(12)
  assert train.images.shape == (1442, 12, 12, 3) and test.images.shape == (355, 12, 12, 3)
  assert train.images.dtype == np.float32 and test.labels.dtype == np.int32
  assert train.class_names == tuple("0123456789")
  _, labels = image_sources.load_digits_rgb()
  np.testing.assert_array_equal(
    test.labels, labels[image_sources.digit_split_indices(labels, "test")]
  )
  source = image_sources.DigitsSource("train")
  np.testing.assert_array_equal(train.images[7], eval_image(source[7], 12))


# ---------------------------------------------------------------------------------------------
# Folder source: layouts, pixel formats, bad files.


def _png48(rgb16: np.ndarray) -> bytes:
  """A 16-bit-per-channel RGB PNG (PIL cannot write one from an array)."""
  height, width, _ = rgb16.shape
  rows = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(height))

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
  return (
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", header)
    + chunk(b"IDAT", zlib.compress(rows))
    + (chunk(b"IEND", b""))
  )


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
  """Two classes of images in every pixel format, two bad files and files to ignore."""
  root = tmp_path_factory.mktemp("mixed")
  (root / "a").mkdir()
  (root / "b" / "deeper").mkdir(parents=True)
  Image.new("RGB", (6, 5), (200, 100, 50)).save(root / "a" / "rgb.png")
  Image.new("L", (6, 5), 77).save(root / "a" / "grey.png")
  palette = Image.new("P", (6, 5), 1)
  palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
  palette.save(root / "a" / "palette.png")
  palette.save(root / "a" / "palette_t.png", transparency=1)  # transparent: white
  rgba = np.zeros((5, 6, 4), np.uint8)
  rgba[..., :3] = (10, 20, 30)
  rgba[:, :3, 3] = 255  # left half opaque, right half fully transparent
  Image.fromarray(rgba, "RGBA").save(root / "a" / "rgba.png")
  Image.new("LA", (6, 5), (50, 255)).save(root / "a" / "la.png")
  (root / "a" / "._rgb.png").write_bytes(b"AppleDouble metadata")  # hidden: ignored
  Image.new("CMYK", (16, 16), (0, 255, 0, 0)).save(root / "b" / "cmyk.jpg", quality=95)
  Image.fromarray(np.full((5, 6), 257 * 123, np.uint16)).save(root / "b" / "deep.png")
  (root / "b" / "deeper" / "deep48.png").write_bytes(
    _png48(np.broadcast_to(np.array([65535, 32896, 257 * 7], np.uint16), (5, 6, 3)))
  )
  Image.new("RGB", (16, 16), (0, 128, 255)).save(root / "b" / "photo.JPEG", quality=95)
  (root / "b" / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
  (root / "b" / "empty.png").write_bytes(b"")
  (root / "b" / "notes.txt").write_text("not an image")
  Image.new("RGB", (4, 4)).save(root / "stray.png")  # beside class folders: ignored
  return root


def test_folder_source_converts_formats_and_skips_bad_files(mixed_dir, caplog):
  with caplog.at_level(logging.INFO):
    source = image_sources.FolderImageSource(mixed_dir)
  assert source.stats.listed == 12
  assert source.stats.skipped_unreadable == 2
  assert str(mixed_dir / "b" / "corrupt.jpg") in caplog.text
  assert str(mixed_dir / "b" / "empty.png") in caplog.text
  assert "stray.png" in caplog.text  # ignored, with a warning
  assert source.stats.converted == 8
  assert source.stats.converted_modes == {
    "L": 1,
    "P": 2,
    "RGBA": 1,
    "LA": 1,
    "CMYK": 1,
    "I;16": 1,
    "RGB;16": 1,
  }
  assert source.class_names == ("a", "b")
  names = [p.removeprefix(str(mixed_dir) + "/") for p in source.paths]
  assert names == [
    "a/grey.png",
    "a/la.png",
    "a/palette.png",
    "a/palette_t.png",
    "a/rgb.png",
    "a/rgba.png",
    "b/cmyk.jpg",
    "b/deep.png",
    "b/deeper/deep48.png",
    "b/photo.JPEG",
  ]
  np.testing.assert_array_equal(source.labels, [0] * 6 + [1] * 4)

  def pixels(name):
    out = source[names.index(name)]
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    return out

  np.testing.assert_array_equal(pixels("a/rgb.png"), np.full((5, 6, 3), (200, 100, 50)))
  np.testing.assert_array_equal(pixels("a/grey.png"), 77)
  np.testing.assert_array_equal(pixels("a/la.png"), 50)
  np.testing.assert_array_equal(pixels("a/palette.png"), np.full((5, 6, 3), (0, 0, 255)))
  np.testing.assert_array_equal(pixels("a/palette_t.png"), 255)
  rgba = pixels("a/rgba.png")
  np.testing.assert_array_equal(rgba[:, :3], np.full((5, 3, 3), (10, 20, 30)))
  np.testing.assert_array_equal(rgba[:, 3:], 255)  # transparent: white
  np.testing.assert_array_equal(pixels("b/deep.png"), 123)  # 16-bit scaled, not clipped
  np.testing.assert_array_equal(pixels("b/deeper/deep48.png"), np.full((5, 6, 3), (255, 128, 7)))
  assert np.abs(pixels("b/cmyk.jpg").astype(int) - (255, 0, 255)).max() <= 8  # lossy JPEG
  assert np.abs(pixels("b/photo.JPEG").astype(int) - (0, 128, 255)).max() <= 8

  # The pipeline reads every format.
  cfg = _input_cfg(source="folder", path=str(mixed_dir), batch_size=10)
  ds = make_image_pretrain_dataset(cfg, seed=0)
  assert ds.stats.converted == 8
  assert ds.batches[0]["image"].shape == (10, SIZE, SIZE, 3)
  assert np.isfinite(ds.batches[1]["image"]).all()


def test_flat_folder_has_no_labels(tmp_path):
  folder = _solid_folder(tmp_path, num_images=3)
  source = make_image_source(_input_cfg(source="folder", path=str(folder)))
  assert source.labels is None and source.class_names is None and len(source) == 3
  np.testing.assert_array_equal(source[2], np.full((9, 12, 3), _colour(2)))


def test_decode_failure_after_indexing_is_substituted(tmp_path, caplog):
  folder = _solid_folder(tmp_path, num_images=8)
  cfg = _input_cfg(source="folder", path=str(folder), batch_size=4, color_jitter=0.0)
  ds = make_image_pretrain_dataset(cfg, seed=0)
  data = (folder / "img03.png").read_bytes()
  (folder / "img03.png").write_bytes(data[: len(data) // 2])  # opened at index time; truncated now
  with caplog.at_level(logging.WARNING):
    rows = np.concatenate([ds.batches[i]["image"] for i in range(ds.batches_per_epoch)])
  assert ds.stats.decode_failures == 1
  assert str(folder / "img03.png") in caplog.text
  # img04, the next image, stands in for img03.
  assert sorted(_which_colour(row, 8) for row in rows) == [0, 1, 2, 4, 4, 5, 6, 7]


def test_source_errors(tmp_path):
  def build(**overrides):
    return make_image_pretrain_dataset(_input_cfg(**overrides), seed=0)

  with pytest.raises(ValueError, match="Unknown config.input.source 'nope'"):
    build(source="nope")
  with pytest.raises(ValueError, match="config.input.path is required for source='folder'"):
    build(source="folder")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    build(source="folder", path=str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.txt").write_text("no images here")
  with pytest.raises(ValueError, match=f"folder {tmp_path / 'empty'}.*no usable images"):
    build(source="folder", path=str(tmp_path / "empty"))
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "x.jpg").write_bytes(b"garbage" * 100)
  with pytest.raises(ValueError, match="no usable images.*skipped_unreadable=1"):
    build(source="folder", path=str(tmp_path / "bad"))
  with pytest.raises(ValueError, match="config.input.split='val'"):
    build(split="val")
  with pytest.raises(ValueError, match="config.input.path='/data' is not used"):
    build(path="/data")
  with pytest.raises(ValueError, match="1442 usable images, fewer than one global batch of 2048"):
    build(batch_size=2048)
  with pytest.raises(FileNotFoundError, match="config.input.tfds_data_dir"):
    build(source="tfds", path="cifar10", tfds_data_dir=str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------
# TFDS (ArrayRecord, written and read without TensorFlow).


def _encoded(picture: Image.Image, fmt: str) -> bytes:
  buffer = io.BytesIO()
  picture.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buffer.getvalue()


def _tfds_record(i: int) -> dict:
  """Record i: its pixels, and the same picture encoded in another format for "image"."""
  height, width = 5 + i, 7 + 2 * i
  rgb = np.full((height, width, 3), _colour(i), np.uint8)
  grey = np.full((height, width), 40 * i, np.uint8)
  kind = ("png", "grey", "palette", "cmyk", "corrupt", "pil")[i]
  if kind == "png":
    picture = _encoded(Image.fromarray(rgb), "PNG")
  elif kind == "grey":
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    picture = _encoded(Image.fromarray(grey), "PNG")
  elif kind == "palette":
    picture = _encoded(Image.fromarray(rgb).quantize(2), "PNG")  # exact for one colour
  elif kind == "cmyk":
    picture = _encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG")
  elif kind == "corrupt":
    picture = b"not an image at all"
  else:
    picture = Image.fromarray(rgb)  # a PIL image: TFDS encodes it with PIL, no TensorFlow
  return {
    "image": picture,
    "pixels": rgb,
    "png": _encoded(Image.fromarray(rgb), "PNG"),
    "grey": grey,
    "depth": grey.astype(np.float32),
    "id": i,
    "label": i % 2,
  }


NUM_TFDS_RECORDS = 6
TFDS_CONVERTED = 3  # grey, palette and CMYK records of "image"
TFDS_CORRUPT = 4


class TinyImagesForTest(tfds.core.GeneratorBasedBuilder):
  """A tiny TFDS image dataset (module level: its sources must pickle, as for grain workers)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = {
      "image": tfds.features.Image(shape=(None, None, 3)),
      "pixels": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
      "png": tfds.features.Tensor(shape=(), dtype=np.object_),
      "grey": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib"),
      "depth": tfds.features.Tensor(shape=(None, None), dtype=np.float32, encoding="zlib"),
      "id": tfds.features.Tensor(shape=(), dtype=np.int64),
      "label": tfds.features.ClassLabel(names=["cat", "dog"]),
    }
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(NUM_TFDS_RECORDS):
      yield i, _tfds_record(i)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """TinyImagesForTest written as ArrayRecord, without TensorFlow."""
  data_dir = tmp_path_factory.mktemp("tfds")
  TinyImagesForTest(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def _tfds_source(tfds_dir, feature, **kwargs):
  return image_sources.TfdsImageSource(
    "tiny_images_for_test", "train", data_dir=str(tfds_dir), feature=feature, **kwargs
  )


def test_tfds_image_feature_is_decoded_with_pil(tfds_dir):
  source = _tfds_source(tfds_dir, "image")
  assert len(source) == NUM_TFDS_RECORDS and source.stats.listed == NUM_TFDS_RECORDS
  assert source.class_names == ("cat", "dog")
  ids = [source.data[i]["id"] for i in range(len(source))]  # TFDS shuffles the records
  np.testing.assert_array_equal(source.labels, np.array(ids) % 2)
  for _ in range(2):  # conversions are counted once per record
    for index, i in enumerate(ids):
      if i == TFDS_CORRUPT:
        with pytest.raises(image_sources.DECODE_ERRORS):
          source[index]
        assert f"record {index}" in source.describe(index)
        continue
      expected = _tfds_record(i)["pixels"]
      tolerance = 8 if i == 3 else 0  # the CMYK record is a JPEG
      assert np.abs(source[index].astype(int) - expected).max() <= tolerance
  assert source.stats.converted == TFDS_CONVERTED
  assert source.stats.converted_modes == {"L": 1, "P": 1, "CMYK": 1}


def test_tfds_tensor_features(tfds_dir):
  pixels, png, grey = (_tfds_source(tfds_dir, f) for f in ("pixels", "png", "grey"))
  for index in range(NUM_TFDS_RECORDS):
    record = _tfds_record(pixels.data[index]["id"])
    np.testing.assert_array_equal(pixels[index], record["pixels"])
    np.testing.assert_array_equal(png[index], record["pixels"])
    np.testing.assert_array_equal(grey[index], np.repeat(record["grey"][..., None], 3, axis=-1))
  assert pixels.stats.converted == png.stats.converted == 0
  # grain may pickle the source into worker processes.
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(pixels))[2], pixels[2])
  assert grey.stats.converted == NUM_TFDS_RECORDS
  assert _tfds_source(tfds_dir, "pixels", label_feature="none").labels is None
  with pytest.raises(ValueError, match="tiny_images_for_test.*'depth'.*tfds_feature"):
    _tfds_source(tfds_dir, "depth")
  with pytest.raises(ValueError, match="no 'photo' feature"):
    _tfds_source(tfds_dir, "photo")
  with pytest.raises(FileNotFoundError, match="'no_such_dataset'.*config.input.path"):
    image_sources.TfdsImageSource("no_such_dataset", "train", data_dir=str(tfds_dir))


def test_tfds_pipeline_substitutes_the_corrupt_record(tfds_dir, caplog):
  cfg = _input_cfg(
    source="tfds",
    path="tiny_images_for_test",
    tfds_data_dir=str(tfds_dir),
    batch_size=NUM_TFDS_RECORDS,  # every record in the one batch of an epoch
  )
  ds = make_image_pretrain_dataset(cfg, seed=0)
  assert ds.batches_per_epoch == 1
  with caplog.at_level(logging.WARNING):
    batch = ds.batches[0]["image"]
  assert batch.shape == (NUM_TFDS_RECORDS, SIZE, SIZE, 3) and np.isfinite(batch).all()
  assert ds.stats.decode_failures == 1 and "tiny_images_for_test" in caplog.text
