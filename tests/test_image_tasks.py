"""Tests for the labelled image data of fine-tuning (d2v_jax/data/image_tasks.py).

Data: scikit-learn's digits, tiny ImageFolder trees of solid-colour images written here (any view
of image k without RandAugment is colour k, so a row tells which image it came from), and a tiny
TFDS dataset written as ArrayRecord without TensorFlow.
"""

import logging

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from d2v_jax.data import batching, image, image_sources, randaugment
from d2v_jax.data.image import IMAGENET_MEAN, IMAGENET_STD, normalize
from d2v_jax.data.image_tasks import (
  LoadEvalBatch,
  eval_view,
  image_eval_batches,
  make_finetune_augment,
  make_image_finetune_dataset,
)

SIZE = 16
BATCH = 8
BICUBIC = Image.Resampling.BICUBIC
NUM_TRAIN_DIGITS, NUM_TEST_DIGITS = 1442, 355


def _config(**overrides) -> ml_collections.ConfigDict:
  """A run config whose `input` has only the pretraining fields plus `overrides`."""
  fields = dict(
    source="embedded",
    path="",
    split="train",
    tfds_data_dir="",
    tfds_feature="image",
    image_size=SIZE,
    batch_size=BATCH,
    num_workers=0,
  )
  fields.update(overrides)
  return ml_collections.ConfigDict(dict(input=fields))


PLAIN = dict(randaugment="", erase_prob=0.0)  # no RandAugment, no erasing: colours survive


def _pixels(normalised: np.ndarray) -> np.ndarray:
  """Undoes the normalisation: float32[..., 3] -> pixel values (0..255, not rounded)."""
  return (normalised * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)) * 255


def _colour(k: int) -> tuple[int, int, int]:
  return (20 * k + 5, 250 - 20 * k, (37 * k) % 256)


def _class_tree(root, classes: dict[str, list[int]], size=(12, 9)):
  """root/<class>/img{k}.png filled with _colour(k), for the k listed under each class."""
  for name, colours in classes.items():
    (root / name).mkdir(parents=True, exist_ok=True)
    for k in colours:
      Image.new("RGB", size, _colour(k)).save(root / name / f"img{k:02d}.png")
  return root


def _which_colour(row: np.ndarray, num_colours: int) -> int:
  mean = _pixels(row).reshape(-1, 3).mean(axis=0)
  distances = [np.abs(mean - _colour(k)).max() for k in range(num_colours)]
  assert min(distances) < 1.0, "not a solid-colour row"
  return int(np.argmin(distances))


# ---------------------------------------------------------------------------------------------
# Training batches.


def test_batches_shapes_labels_and_views_match_the_source():
  config = _config()  # RandAugment and erasing at their defaults (on)
  ds = make_image_finetune_dataset(config, seed=3)
  assert ds.num_classes == 10 and ds.class_names == tuple(str(d) for d in range(10))
  assert ds.batches_per_epoch == NUM_TRAIN_DIGITS // BATCH and ds.image_size == SIZE
  source = image_sources.DigitsSource("train")
  plan = batching.EpochPlan(len(source), BATCH, 3)
  augment = make_finetune_augment(config.input, 3)
  spec_policy = randaugment.parse_policy("rand-m9-mstd0.5-inc1", fill=(124, 116, 104))
  assert augment.randaugment == spec_policy
  assert augment.erase_prob == 0.25 and augment.scale == (0.08, 1.0)
  for index in (0, ds.batches_per_epoch + 1):  # a batch of the first and of the second epoch
    batch = ds.batches[index]
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (BATCH, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (BATCH,) and batch["label"].dtype == np.int32
    epoch, records = plan.batch(index)
    np.testing.assert_array_equal(batch["label"], source.labels[records])
    # Each row is the view of its record: a function of (seed, epoch, record) only.
    for row, record in enumerate(records):
      expected = augment(source.pil_image(record), epoch, record)
      np.testing.assert_array_equal(batch["image"][row], expected)


def test_same_index_same_batch_other_seed_or_epoch_differs():
  def batches(seed, start=0):
    ds = make_image_finetune_dataset(_config(), seed=seed)
    return [ds.batches[start + i]["image"] for i in range(2)], ds.batches_per_epoch

  first, per_epoch = batches(seed=1)
  again, _ = batches(seed=1)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  other_seed, _ = batches(seed=2)
  next_epoch, _ = batches(seed=1, start=per_epoch)
  for other in (other_seed, next_epoch):
    assert all(not np.array_equal(a, b) for a, b in zip(first, other))


def test_iterator_resumes_exactly_from_its_state():
  config = _config(split="test", batch_size=64)  # 355 digits: 5 batches per epoch
  iterator = iter(make_image_finetune_dataset(config, seed=0))
  for _ in range(4):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]  # crosses into the next epoch
  iterator.close()
  resumed = iter(make_image_finetune_dataset(config, seed=0))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
  resumed.close()


def test_process_rows_concatenate_to_the_global_batch():
  whole = make_image_finetune_dataset(_config(), seed=5)
  parts = [
    make_image_finetune_dataset(_config(), seed=5, process_index=p, process_count=2)
    for p in range(2)
  ]
  for key in ("image", "label"):
    halves = [part.batches[2][key] for part in parts]
    assert len(halves[0]) == BATCH // 2
    np.testing.assert_array_equal(np.concatenate(halves), whole.batches[2][key])


def test_without_randaugment_and_erasing_a_full_crop_is_the_plain_resized_image():
  # Scale 1 on a square 8x8 digit: the whole image (an exact fit, or the central-crop fallback).
  config = _config(crop_scale=(1.0, 1.0), batch_size=64, **PLAIN)
  ds = make_image_finetune_dataset(config, seed=0)
  source = image_sources.DigitsSource("train")
  _, records = batching.EpochPlan(len(source), 64, 0).batch(0)
  batch = ds.batches[0]["image"]
  flipped = []
  for row, record in zip(batch, records):
    plain = image.eval_image(source[record], SIZE)
    if np.array_equal(row, plain):
      flipped.append(False)
    else:
      np.testing.assert_array_equal(row, plain[:, ::-1])
      flipped.append(True)
  assert 10 < sum(flipped) < 54  # p = 0.5 each
  # RandAugment and erasing change the views but not the crop or flip draws.
  augmented = make_image_finetune_dataset(_config(crop_scale=(1.0, 1.0), batch_size=64), seed=0)
  changed = [not np.array_equal(a, b) for a, b in zip(augmented.batches[0]["image"], batch)]
  assert sum(changed) > 32


def test_training_view_is_crop_flip_randaugment_normalise_erase_in_that_order():
  rng = np.random.default_rng(0)
  picture = Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8))  # 45 wide, 30 high
  config = _config(randaugment="rand-m9-mstd0.5-inc1", erase_prob=1.0)
  augment = make_finetune_augment(config.input, seed=7)
  policy = randaugment.parse_policy("rand-m9-mstd0.5-inc1")
  erased = 0
  for record in range(6):
    streams = {s: np.random.default_rng([7, s, 2, record]) for s in (11, 12, 13, 14)}
    top, left, h, w = image.random_resized_crop_params(
      30, 45, (0.08, 1.0), (3 / 4, 4 / 3), streams[11]
    )
    view = picture.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), BICUBIC)
    if streams[12].random() < 0.5:
      view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    view = policy(view, streams[13])
    plain = normalize(np.asarray(view), IMAGENET_MEAN, IMAGENET_STD)
    expected = randaugment.random_erasing(plain, streams[14], prob=1.0)
    got = augment(picture, 2, record)
    np.testing.assert_array_equal(got, expected)
    erased += not np.array_equal(got, plain)
  assert erased >= 4  # prob 1: a box of noise unless no box fits in 10 tries


# ---------------------------------------------------------------------------------------------
# Evaluation.


def test_digit_eval_set_covers_every_test_image_once_with_its_eval_view():
  config = _config(eval_batch_size=64, eval_crop_pct=1.0)
  evalset = image_eval_batches(config, "test")
  assert evalset.num_examples == NUM_TEST_DIGITS and evalset.num_batches == 6  # ceil(355 / 64)
  assert evalset.num_classes == 10 and evalset.batch_size == 64
  batches = list(evalset.batches())
  assert len(batches) == 6
  for batch in batches:
    assert set(batch) == {"image", "label", "example_mask"}
    assert batch["image"].shape == (64, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["example_mask"].dtype == bool
  images, labels, mask = (np.concatenate([b[k] for b in batches]) for k in batches[0])
  assert mask.sum() == NUM_TEST_DIGITS and mask[:NUM_TEST_DIGITS].all()
  source = image_sources.DigitsSource("test")
  np.testing.assert_array_equal(labels[mask], source.labels)
  # crop_pct 1 on the square digits: the whole image resized, as image.eval_image.
  expected = np.stack([image.eval_image(source[i], SIZE) for i in range(NUM_TEST_DIGITS)])
  np.testing.assert_allclose(images[mask], expected, atol=1e-6)
  # Filler rows repeat real examples (static shapes), masked out.
  np.testing.assert_array_equal(images[~mask], expected[: 384 - NUM_TEST_DIGITS])
  np.testing.assert_array_equal(labels[~mask], source.labels[: 384 - NUM_TEST_DIGITS])
  # Deterministic: a second pass gives the same batches.
  np.testing.assert_array_equal(next(evalset.batches())["image"], batches[0]["image"])
  # Two processes split every global batch.
  halves = [
    image_eval_batches(config, "test", process_index=p, process_count=2).batches_dataset[5]
    for p in range(2)
  ]
  for key in ("image", "label", "example_mask"):
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batches[5][key])


def test_eval_split_defaults_to_config_and_batch_size_to_the_training_one():
  evalset = image_eval_batches(_config())  # eval_split "test", eval_batch_size = batch_size
  assert evalset.num_examples == NUM_TEST_DIGITS and evalset.batch_size == BATCH
  assert image_eval_batches(_config(eval_split="all")).num_examples == 1797


def test_eval_view_resizes_the_shorter_side_and_crops_the_centre():
  rng = np.random.default_rng(1)
  wide = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))  # 20 wide, 12 high
  # S = 16, crop_pct 0.875: shorter side to int(16 / 0.875) = 18, the other to int(18·20/12) = 30;
  # centre crop: top round((18 - 16) / 2) = 1, left round((30 - 16) / 2) = 7.
  resized = np.asarray(wide.resize((30, 18), BICUBIC))
  expected = normalize(resized[1:17, 7:23], IMAGENET_MEAN, IMAGENET_STD)
  np.testing.assert_array_equal(eval_view(wide, SIZE, 0.875), expected)
  tall = wide.transpose(Image.Transpose.TRANSPOSE)  # 12 wide, 20 high
  resized = np.asarray(tall.resize((18, 30), BICUBIC))
  expected = normalize(resized[7:23, 1:17], IMAGENET_MEAN, IMAGENET_STD)
  np.testing.assert_array_equal(eval_view(tall, SIZE, 0.875), expected)
  # crop_pct 1: shorter side to 16, longer to int(16·20/12) = 26, left round(5.0) = 5.
  resized = np.asarray(wide.resize((26, 16), BICUBIC))
  expected = normalize(resized[:, 5:21], IMAGENET_MEAN, IMAGENET_STD)
  np.testing.assert_array_equal(eval_view(wide, SIZE, 1.0), expected)
  # 224 at the default crop_pct: from 256, offsets round(16.0) (as data2vec's 224 / 256).
  photo = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
  resized = np.asarray(photo.resize((341, 256), BICUBIC))  # int(256 · 400 / 300) = 341
  expected = normalize(resized[16:240, 58:282], IMAGENET_MEAN, IMAGENET_STD)  # round(58.5) = 58
  np.testing.assert_array_equal(eval_view(photo, 224), expected)


def test_folder_eval_uses_eval_path_and_the_training_label_space(tmp_path):
  train = _class_tree(tmp_path / "train", {"ant": [0, 1], "bee": [2, 3], "cat": [4, 5]})
  val = _class_tree(tmp_path / "val", {"bee": [6], "cat": [7, 8]})  # no "ant"
  config = _config(source="folder", path=str(train), eval_path=str(val), eval_batch_size=4)
  evalset = image_eval_batches(config, "validation")
  assert evalset.class_names == ("ant", "bee", "cat") and evalset.num_classes == 3
  (batch,) = list(evalset.batches())
  np.testing.assert_array_equal(batch["example_mask"], [True, True, True, False])
  # Labels are the training folder's: bee = 1, cat = 2 (not the val folder's own 0, 1).
  np.testing.assert_array_equal(batch["label"], [1, 2, 2, 1])
  assert [_which_colour(row, 9) for row in batch["image"]] == [6, 7, 8, 6]
  # split "train" evaluates the training folder.
  train_set = image_eval_batches(config, "train")
  assert train_set.num_examples == 6 and train_set.num_classes == 3
  rows = np.concatenate([b["label"] for b in train_set.batches()])
  np.testing.assert_array_equal(rows, [0, 0, 1, 1, 2, 2, 0, 0])
  # An evaluation class the training folder lacks is an error.
  _class_tree(tmp_path / "val", {"dog": [1]})
  with pytest.raises(ValueError, match=r"config.input.eval_path=.*classes.*lacks: \['dog'\]"):
    image_eval_batches(config, "validation")


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_flat_folder_is_refused_for_lack_of_labels(tmp_path):
  for k in range(4):
    Image.new("RGB", (6, 6), _colour(k)).save(tmp_path / f"img{k}.png")
  config = _config(source="folder", path=str(tmp_path), eval_path=str(tmp_path))
  with pytest.raises(ValueError, match=r"no class subdirectories.*config.input.path="):
    make_image_finetune_dataset(config, seed=0)
  with pytest.raises(ValueError, match=r"no class subdirectories.*config.input.eval_path="):
    image_eval_batches(config, "validation")


def test_corrupt_images_in_class_folders_are_skipped_or_substituted_and_counted(tmp_path, caplog):
  root = _class_tree(tmp_path, {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7]})
  (root / "a" / "broken.png").write_bytes(b"not a png" * 10)  # fails to open: skipped at indexing
  config = _config(source="folder", path=str(root), batch_size=4, eval_batch_size=4, **PLAIN)
  ds = make_image_finetune_dataset(config, seed=0)
  assert ds.stats.listed == 9 and ds.stats.skipped_unreadable == 1
  assert ds.num_classes == 2 and ds.batches_per_epoch == 2
  evalset = image_eval_batches(config, "train")
  # img03 (class a, the last of it) opens at indexing but is truncated afterwards.
  data = (root / "a" / "img03.png").read_bytes()
  (root / "a" / "img03.png").write_bytes(data[: len(data) // 2])
  with caplog.at_level(logging.WARNING):
    batches = [ds.batches[i] for i in range(ds.batches_per_epoch)]
  assert ds.stats.decode_failures == 1 and str(root / "a" / "img03.png") in caplog.text
  colours = [_which_colour(row, 8) for b in batches for row in b["image"]]
  labels = np.concatenate([b["label"] for b in batches])
  # img04 (class b) stands in for img03, with its own label.
  assert sorted(colours) == [0, 1, 2, 4, 4, 5, 6, 7]
  np.testing.assert_array_equal(labels, [int(k >= 4) for k in colours])
  # Evaluation leaves the broken image out of the metrics instead of counting another twice.
  rows = list(evalset.batches())
  mask = np.concatenate([b["example_mask"] for b in rows])
  np.testing.assert_array_equal(mask, [True] * 3 + [False] + [True] * 4)
  assert evalset.stats.decode_failures == 1


def test_a_label_outside_the_classes_is_an_error():
  source = image_sources.DigitsSource("test")
  source.labels = source.labels.copy()
  source.labels[2] = 12
  view = dict(image_size=SIZE, crop_pct=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)
  load = LoadEvalBatch(source, 4, slice(0, 4), view, np.arange(10))
  with pytest.raises(ValueError, match="sklearn digit #.* has label 12, outside the 10 classes"):
    load.map(0)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(randaugment="rand-x9"), "config.input.randaugment='rand-x9'"),
    (dict(randaugment="auto"), "config.input.randaugment='auto'"),
    (dict(erase_prob=1.5), "config.input.erase_prob"),
    (dict(crop_scale=(0.5, 0.1)), "config.input.crop_scale"),
    (dict(image_size=0), "config.input.image_size"),
    (dict(std=(0.2, 0.0, 0.2)), "config.input.std"),
  ],
)
def test_training_config_errors_name_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    make_image_finetune_dataset(_config(**overrides), seed=0)


def test_eval_config_errors_name_the_field(tmp_path):
  for crop_pct in (0.0, 1.2):
    with pytest.raises(ValueError, match="config.input.eval_crop_pct must lie in"):
      image_eval_batches(_config(eval_crop_pct=crop_pct))
  with pytest.raises(ValueError, match="config.input.split='validation'"):
    image_eval_batches(_config(), "validation")  # the digits have train | test | all
  with pytest.raises(ValueError, match="config.input.eval_batch_size=6.*process_count=4"):
    image_eval_batches(_config(eval_batch_size=6), process_count=4)
  root = _class_tree(tmp_path, {"a": [0], "b": [1]})
  with pytest.raises(ValueError, match="config.input.eval_path is required.*split='test'"):
    image_eval_batches(_config(source="folder", path=str(root)))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    missing = str(tmp_path / "nowhere")
    image_eval_batches(_config(source="folder", path=str(root), eval_path=missing))


# ---------------------------------------------------------------------------------------------
# TFDS: labels read per record.

NUM_TFDS_RECORDS = 6
TFDS_CORRUPT = 4


class LabelledImagesForFinetuneTest(tfds.core.GeneratorBasedBuilder):
  """A tiny labelled TFDS dataset; record 4's image is corrupt (module level: picklable)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = {
      "image": tfds.features.Image(shape=(None, None, 3)),
      "id": tfds.features.Tensor(shape=(), dtype=np.int64),
      "label": tfds.features.ClassLabel(names=["red", "green", "blue"]),
      "score": tfds.features.Tensor(shape=(), dtype=np.int64),
    }
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    generate = self._generate_examples
    return {"train": generate(range(4)), "test": generate(range(4, 6))}

  def _generate_examples(self, ids):
    for i in ids:
      picture = b"garbage" if i == TFDS_CORRUPT else Image.new("RGB", (7, 5), _colour(i))
      yield i, {"image": picture, "id": i, "label": i % 3, "score": i}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  LabelledImagesForFinetuneTest(
    data_dir=str(data_dir), file_format="array_record"
  ).download_and_prepare()
  return data_dir


def test_tfds_labels_are_read_with_each_record(tfds_dir):
  config = _config(
    source="tfds",
    path="labelled_images_for_finetune_test",
    tfds_data_dir=str(tfds_dir),
    batch_size=4,
    eval_batch_size=4,
    **PLAIN,
  )
  ds = make_image_finetune_dataset(config, seed=0)
  assert ds.class_names == ("red", "green", "blue") and ds.num_classes == 3
  batch = ds.batches[0]
  colours = [_which_colour(row, 6) for row in batch["image"]]
  assert sorted(colours) == [0, 1, 2, 3]
  np.testing.assert_array_equal(batch["label"], [k % 3 for k in colours])
  evalset = image_eval_batches(config, "test")
  assert evalset.num_examples == 2 and evalset.num_classes == 3
  (rows,) = list(evalset.batches())
  np.testing.assert_array_equal(np.sort(rows["label"][:2]), [4 % 3, 5 % 3])
  # The corrupt record is masked out; the other is the only example counted.
  assert rows["example_mask"].sum() == 1 and evalset.stats.decode_failures >= 1
  assert _which_colour(rows["image"][rows["example_mask"]][0], 6) == 5
  # A label feature that is not a ClassLabel gives no class count; a missing one no labels.
  with pytest.raises(ValueError, match="'score'.*not a ClassLabel"):
    make_image_finetune_dataset(_config(**{**config.input, "tfds_label_feature": "score"}), seed=0)
  with pytest.raises(ValueError, match="no label feature 'none'.*tfds_label_feature"):
    make_image_finetune_dataset(_config(**{**config.input, "tfds_label_feature": "none"}), seed=0)
