"""Labelled images for classification fine-tuning (spec §1.6, "ImageNet, v1").

Training batches are `{"image": float32[b, S, S, 3], "label": int32[b]}`; evaluation batches add
`"example_mask": bool[b]`. The views are those of data2vec_vision's `run_class_finetuning.py`
(timm's `create_transform` for training, BEiT's `build_transform` for evaluation):

Training view, in this order:
  1. RandomResizedCrop to S x S: `image.random_resized_crop_params` (area `config.input.crop_scale`,
     default (0.08, 1); log-uniform ratio `config.input.crop_ratio`, default (3/4, 4/3)), bicubic;
  2. horizontal flip with probability 0.5 (`config.input.flip`, default on);
  3. RandAugment `config.input.randaugment` (default "rand-m9-mstd0.5-inc1"; "" turns it off), on
     the S x S crop, filling uncovered pixels with round(255 · mean) as timm does;
  4. /255 and (x - mean) / std;
  5. random erasing, 'pixel' mode, with probability `config.input.erase_prob` (default 0.25).
There is no colour jitter: timm applies it only when RandAugment is off, and the spec's recipe
has RandAugment on (`config.input.color_jitter`, a pretraining knob, is not read here).

Evaluation view (deterministic): resize the shorter side to int(S / crop_pct) (bicubic; the longer
side keeps the aspect ratio, truncated as torchvision's Resize does), then take the central S x S
(torchvision's CenterCrop offsets). crop_pct is `config.input.eval_crop_pct`, in (0, 1], default
0.875 (224 from 256, as data2vec for 224² inputs). With crop_pct 1 a square image is resized whole
to S x S, which is exactly `image.eval_image`: set it for the embedded 8 x 8 digits, whose strokes
reach the border (the 0.875 crop would cut them). Non-square images always keep their aspect
ratio: crop_pct 1 crops the longer side to S.

Every training draw comes from a numpy Generator seeded by (seed, stream, epoch, record), one
stream per augmentation (streams 11-14, apart from `image.py`'s 1-3 and the shuffle's 0, so a
fine-tuning run does not replay its pretraining views): a batch is a pure function of its index,
and a grain iterator restored with `set_state` continues exactly. Shuffling, per-process rows and
resumption are `batching`'s, as for pretraining.

Labels come from the source (`image_sources`): the embedded digits' classes, a folder's class
subdirectories (a flat folder has no labels and is refused), or a TFDS ClassLabel feature
(`config.input.tfds_label_feature`, default "label"; read per record with its image, never all
at once: reading every ImageNet record for its label would read all of ImageNet).
"""

import dataclasses
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from d2v_jax.data import batching, image_sources, randaugment
from d2v_jax.data.image import (
  _PREFETCH_BATCHES,
  _READ_THREADS,
  IMAGENET_MEAN,
  IMAGENET_STD,
  _pair,
  _triple,
  normalize,
  random_resized_crop_params,
  read_or_substitute,
)

DEFAULT_RANDAUGMENT = "rand-m9-mstd0.5-inc1"  # spec §1.6
DEFAULT_ERASE_PROB = 0.25
DEFAULT_EVAL_CROP_PCT = 0.875
DEFAULT_EVAL_SPLIT = "test"
_BICUBIC = Image.Resampling.BICUBIC
# Numpy seed streams of the fine-tuning view, distinct from image.py's pretraining streams (1-3)
# and from batching.EpochPlan's shuffle (0).
_CROP_STREAM, _FLIP_STREAM, _RANDAUGMENT_STREAM, _ERASE_STREAM = 11, 12, 13, 14


# ---------------------------------------------------------------------------------------------
# Views.


@dataclasses.dataclass(frozen=True)
class FinetuneAugment:
  """The training view of one image: crop, flip, RandAugment, normalisation, random erasing.

  Picklable (grain may run it in worker processes). Draws for `record` in `epoch` come from
  Generators seeded by (seed, stream, epoch, record), one stream per augmentation, so turning one
  augmentation off leaves the others' draws unchanged.
  """

  image_size: int
  scale: tuple[float, float]
  ratio: tuple[float, float]
  flip: bool
  randaugment: randaugment.RandAugment | None  # None: off
  erase_prob: float
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  seed: int

  def _rng(self, stream: int, epoch: int, record: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, stream, epoch, record])

  def crop_box(self, height: int, width: int, epoch: int, record: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the crop of `record` (of size height x width) in `epoch`."""
    rng = self._rng(_CROP_STREAM, epoch, record)
    return random_resized_crop_params(height, width, self.scale, self.ratio, rng)

  def flips(self, epoch: int, record: int) -> bool:
    """Whether `record` is mirrored in `epoch`."""
    return self.flip and bool(self._rng(_FLIP_STREAM, epoch, record).random() < 0.5)

  def __call__(self, image: Image.Image, epoch: int, record: int) -> np.ndarray:
    """An RGB image -> float32[S, S, 3], the view of `record` in `epoch`."""
    top, left, h, w = self.crop_box(image.height, image.width, epoch, record)
    # crop then resize, as torchvision's resized_crop (a resize `box` would also sample outside it)
    view = image.crop((left, top, left + w, top + h)).resize((self.image_size,) * 2, _BICUBIC)
    if self.flips(epoch, record):  # before RandAugment, as timm's order
      view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if self.randaugment is not None:
      view = self.randaugment(view, self._rng(_RANDAUGMENT_STREAM, epoch, record))
    pixels = normalize(np.asarray(view), self.mean, self.std)  # [S, S, 3]
    if self.erase_prob > 0:
      pixels = randaugment.random_erasing(
        pixels, self._rng(_ERASE_STREAM, epoch, record), self.erase_prob
      )
    return pixels


def eval_resize_size(height: int, width: int, image_size: int, crop_pct: float) -> tuple[int, int]:
  """(height, width) after torchvision's Resize(int(S / crop_pct)): the shorter side to that."""
  short = int(image_size / crop_pct)
  if height <= width:
    return short, int(short * width / height)
  return int(short * height / width), short


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int]:
  """(top, left) of torchvision's CenterCrop(size) of a height x width image (no padding)."""
  return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def eval_view(
  image: Image.Image | np.ndarray,
  image_size: int,
  crop_pct: float = DEFAULT_EVAL_CROP_PCT,
  mean: Sequence[float] = IMAGENET_MEAN,
  std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
  """The deterministic evaluation view: shorter side to int(S / crop_pct), central S x S.

  Args:
    image: an RGB PIL image, or uint8[H, W, 3].
    image_size: S.
    crop_pct: in (0, 1]; the central crop's share of the resized shorter side.
    mean, std: per-channel normalisation of pixels / 255.

  Returns:
    float32[S, S, 3].
  """
  if not isinstance(image, Image.Image):
    image = Image.fromarray(np.asarray(image, np.uint8))
  height, width = eval_resize_size(image.height, image.width, image_size, crop_pct)
  resized = image.resize((width, height), _BICUBIC)  # PIL: a same-size resize is a copy
  top, left = center_crop_box(height, width, image_size)
  crop = resized.crop((left, top, left + image_size, top + image_size))
  return normalize(np.asarray(crop), mean, std)  # [S, S, 3]


# ---------------------------------------------------------------------------------------------
# Config.


def make_finetune_augment(input_cfg, seed: int) -> FinetuneAugment:
  """The training view that `config.input` describes (fields: see the module docstring)."""
  image_size = _image_size(input_cfg)
  scale = _pair(input_cfg.get("crop_scale", (0.08, 1.0)), "crop_scale")
  if not 0 < scale[0] <= scale[1] <= 1:
    raise ValueError(f"config.input.crop_scale must satisfy 0 < min <= max <= 1, got {scale}")
  ratio = _pair(input_cfg.get("crop_ratio", (3 / 4, 4 / 3)), "crop_ratio")
  if not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f"config.input.crop_ratio must satisfy 0 < min <= max, got {ratio}")
  mean, std = _normalisation(input_cfg)
  policy = input_cfg.get("randaugment", DEFAULT_RANDAUGMENT)
  augment = None
  if policy:
    # timm's fill for uncovered pixels: the normalisation mean as 8-bit RGB.
    fill = tuple(min(255, round(255 * m)) for m in mean)
    try:
      augment = randaugment.parse_policy(policy, fill=fill)
    except ValueError as e:
      raise ValueError(f"config.input.randaugment={policy!r}: {e}") from e
  erase_prob = float(input_cfg.get("erase_prob", DEFAULT_ERASE_PROB))
  if not 0 <= erase_prob <= 1:
    raise ValueError(f"config.input.erase_prob must lie in [0, 1], got {erase_prob}")
  flip = bool(input_cfg.get("flip", True))
  return FinetuneAugment(image_size, scale, ratio, flip, augment, erase_prob, mean, std, seed)


def _image_size(input_cfg) -> int:
  image_size = int(input_cfg.image_size)
  if image_size <= 0:
    raise ValueError(f"config.input.image_size must be positive, got {input_cfg.image_size}")
  return image_size


def _normalisation(input_cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
  mean = _triple(input_cfg.get("mean", IMAGENET_MEAN), "mean")
  std = _triple(input_cfg.get("std", IMAGENET_STD), "std")
  if min(std) <= 0:
    raise ValueError(f"config.input.std must be positive, got {std}")
  return mean, std


def _eval_crop_pct(input_cfg) -> float:
  crop_pct = float(input_cfg.get("eval_crop_pct", DEFAULT_EVAL_CROP_PCT))
  if not 0 < crop_pct <= 1:
    raise ValueError(
      f"config.input.eval_crop_pct must lie in (0, 1] (1: no border cut from the shorter side), "
      f"got {crop_pct}"
    )
  return crop_pct


# ---------------------------------------------------------------------------------------------
# Labels.


def _has_labels(source) -> bool:
  if isinstance(source, image_sources.TfdsImageSource):
    return source.label_feature is not None  # `source.labels` would read every record
  return source.labels is not None


def require_labels(source, input_cfg, path_field: str = "path") -> tuple[str, ...]:
  """The class names of a labelled source; a clear error for a source without labels.

  `path_field` names the config field that holds a folder source's path (for the message).

  Raises:
    ValueError: a flat folder (no class subdirectories), a TFDS dataset without the label feature
      or whose label is not a ClassLabel (no class count).
  """
  if not _has_labels(source):
    if input_cfg.source == "folder":
      raise ValueError(
        f"{source.name} has no class subdirectories: fine-tuning needs labelled images, an "
        f"ImageFolder tree <root>/<class>/<image> (config.input.{path_field}={input_cfg.path!r})"
      )
    raise ValueError(
      f"{source.name} has no label feature "
      f"{input_cfg.get('tfds_label_feature', 'label')!r} (config.input.tfds_label_feature): "
      "fine-tuning needs labelled images"
    )
  if not source.class_names:
    raise ValueError(
      f"{source.name}: the label feature {source.label_feature!r} "
      "(config.input.tfds_label_feature) is not a ClassLabel, so the number of classes is unknown"
    )
  return tuple(source.class_names)


def record_label(source, record: int) -> int:
  """The label of `record` (TFDS: read from the record itself, see the module docstring)."""
  if isinstance(source, image_sources.TfdsImageSource):
    return int(source.data[record][source.label_feature])
  return int(source.labels[record])


def _checked_label(source, record: int, label_map: np.ndarray) -> int:
  """`record`'s label in the training label space (`label_map`: source label -> that)."""
  label = record_label(source, record)
  if not 0 <= label < len(label_map):
    raise ValueError(
      f"{source.describe(record)} has label {label}, outside the {len(label_map)} classes of "
      f"{source.name}"
    )
  return int(label_map[label])


# ---------------------------------------------------------------------------------------------
# Training batches.


class LoadLabelledBatch(grain.transforms.Map):
  """Global batch index -> this process's rows of that batch: training views and labels.

  Module level and picklable (grain may run it in worker processes). Counters it updates
  (`stats.decode_failures`) are only visible in the process that ran it. A record that fails to
  decode is replaced by the next one that decodes, with that record's own label and draws.
  """

  def __init__(
    self,
    source: image_sources.ImageSource,
    plan: batching.EpochPlan,
    rows: slice,
    augment: FinetuneAugment,
    num_classes: int,
  ):
    self.source = source
    self.plan = plan
    self.rows = rows
    self.augment = augment
    self.label_map = np.arange(num_classes, dtype=np.int32)  # training labels are the source's
    self._failures = batching.DecodeFailures(source, "the next image (and its label)")

  def map(self, element: int) -> dict[str, np.ndarray]:
    epoch, records = self.plan.batch(element)
    records = records[self.rows]  # [b]
    size = self.augment.image_size
    images = np.empty((len(records), size, size, 3), np.float32)  # [b, S, S, 3]
    labels = np.empty(len(records), np.int32)  # [b]
    for row, record in enumerate(records):
      used, image = read_or_substitute(self.source, int(record), self._failures)
      images[row] = self.augment(image, epoch, used)
      labels[row] = _checked_label(self.source, used, self.label_map)
    return {"image": images, "label": labels}


@dataclasses.dataclass(frozen=True)
class ImageFinetuneDataset:
  """The fine-tuning training input: iterate it for batches; checkpoint the iterator with orbax.

  Attributes:
    batches: random access, global batch index (across epochs) -> this process's batch.
    iter_dataset: `batches` as an (infinite) grain IterDataset; `iter()` of it is a
      `grain.DatasetIterator` whose `get_state()`/`set_state()` resume exactly.
    stats: what indexing skipped or converted (and decode failures seen in this process).
    batches_per_epoch: global batches per pass over the source (the remainder is dropped).
    image_size: S, the side of every image of a batch.
    num_classes: the number of labels (the classifier's outputs).
    class_names: the name of every label.
  """

  batches: grain.MapDataset
  iter_dataset: grain.IterDataset
  stats: image_sources.ImageStats
  batches_per_epoch: int
  image_size: int
  num_classes: int
  class_names: tuple[str, ...]

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.iter_dataset)


def make_image_finetune_dataset(
  config: ml_collections.ConfigDict, *, seed: int, process_index: int = 0, process_count: int = 1
) -> ImageFinetuneDataset:
  """The labelled training pipeline that `config.input` describes.

  Args:
    config: the run config; reads `config.input`:
      source, path, split, tfds_data_dir, tfds_feature, tfds_label_feature: the labelled images
        (`image_sources.make_image_source`; a folder needs class subdirectories);
      image_size: S; batch_size: the global batch; num_workers: grain worker processes;
      crop_scale, crop_ratio, flip, randaugment, erase_prob, mean, std: the view (module
        docstring; each optional, with the spec's value as default).
    seed: data seed (non-negative), the same on every process.
    process_index: this process (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).

  Returns:
    The dataset; `iter()` of it yields this process's `batch_size // process_count` rows of
    every global batch.

  Raises:
    ValueError: bad config values, a source without labels or usable images, or fewer images
      than one global batch.
    FileNotFoundError: the source's path does not exist.
  """
  input_cfg = config.input
  batch_size = input_cfg.batch_size
  rows = batching.process_rows(batch_size, process_index, process_count)
  augment = make_finetune_augment(input_cfg, seed)
  source = image_sources.make_image_source(input_cfg)
  class_names = require_labels(source, input_cfg)
  plan = batching.EpochPlan(len(source), batch_size, seed)
  logging.info(
    "%s: %s; %d labelled images in %d classes -> %d global batches of %d per epoch, %dx%d views, "
    "RandAugment %r, erase prob %g.",
    source.name,
    image_sources.summarize(source.stats),
    len(source),
    len(class_names),
    plan.batches_per_epoch,
    batch_size,
    augment.image_size,
    augment.image_size,
    input_cfg.get("randaugment", DEFAULT_RANDAUGMENT),
    augment.erase_prob,
  )
  if plan.batches_per_epoch == 0:
    raise ValueError(
      f"{source.name} has {len(source)} usable images, fewer than one global batch of "
      f"{batch_size}: lower config.input.batch_size"
    )
  batches, iter_dataset = batching.endless_batches(
    LoadLabelledBatch(source, plan, rows, augment, len(class_names)),
    num_workers=input_cfg.get("num_workers", 0),
    read_threads=_READ_THREADS,
    prefetch=_PREFETCH_BATCHES,
  )
  return ImageFinetuneDataset(
    batches,
    iter_dataset,
    source.stats,
    plan.batches_per_epoch,
    augment.image_size,
    len(class_names),
    class_names,
  )


# ---------------------------------------------------------------------------------------------
# Evaluation batches.


class LoadEvalBatch(grain.transforms.Map):
  """Eval batch index -> this process's rows of it: eval views, labels and `example_mask`.

  Global eval batch k holds examples [k·B, (k+1)·B); past the last example the rows repeat
  earlier ones (wrapping around) with `example_mask` False. A record that fails to decode keeps
  its row and label, with a zero image and `example_mask` False (counted in
  `stats.decode_failures`): leaving it out of the metrics beats counting another image twice.
  """

  def __init__(
    self,
    source: image_sources.ImageSource,
    batch_size: int,
    rows: slice,
    view: dict,
    label_map: np.ndarray,
  ):
    self.source = source
    self.batch_size = batch_size
    self.rows = rows
    self.view = view  # eval_view's keyword arguments
    self.label_map = label_map
    self._failures = batching.DecodeFailures(source, "a zero image, left out (example_mask False)")

  def map(self, element: int) -> dict[str, np.ndarray]:
    positions = element * self.batch_size + np.arange(self.batch_size)  # [B] global
    positions = positions[self.rows]  # [b]
    num_records = len(self.source)
    mask = positions < num_records  # [b]
    records = positions % num_records  # filler rows repeat real examples
    size = self.view["image_size"]
    images = np.zeros((len(records), size, size, 3), np.float32)  # [b, S, S, 3]
    labels = np.empty(len(records), np.int32)  # [b]
    for row, record in enumerate(records):
      record = int(record)
      labels[row] = _checked_label(self.source, record, self.label_map)
      try:
        image = self.source.pil_image(record)
      except image_sources.DECODE_ERRORS as e:
        self._failures(record, e)
        mask[row] = False
        continue
      images[row] = eval_view(image, **self.view)
    return {"image": images, "label": labels, "example_mask": mask}


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """A finite, deterministic evaluation set.

  Attributes:
    batches_dataset: random access, eval batch index -> this process's rows of that batch.
    num_batches: eval batches in one pass.
    num_examples: images in the set: the rows with `example_mask` True, but for images that
      fail to decode while evaluating (masked out and counted in `stats.decode_failures`).
    batch_size: the global eval batch (`config.input.eval_batch_size`).
    image_size: S.
    num_classes: the number of labels, the training set's (see `image_eval_batches`).
    class_names: the name of every label.
    stats: what indexing skipped or converted, and decode failures seen while evaluating.
  """

  batches_dataset: grain.MapDataset
  num_batches: int
  num_examples: int
  batch_size: int
  image_size: int
  num_classes: int
  class_names: tuple[str, ...]
  stats: image_sources.ImageStats

  def batches(self) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the set, in order: a fresh iterator on every call."""
    options = grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
    return iter(self.batches_dataset.to_iter_dataset(options))


def _visible_subdirectories(root: str) -> tuple[str, ...]:
  """A folder's class names under `image_sources.list_image_folder`'s rule (sorted, no dot)."""
  path = Path(root)
  if not path.is_dir():
    return ()
  return tuple(sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")))


def _eval_source_config(input_cfg, split: str) -> ml_collections.ConfigDict:
  """The `make_image_source` fields of the evaluation images."""
  path = input_cfg.path
  if input_cfg.source == "folder" and split != "train":
    path = input_cfg.get("eval_path", "")
    if not path:
      raise ValueError(
        f"config.input.eval_path is required to evaluate source='folder' on split={split!r} "
        "(a folder of class subdirectories, as config.input.path); split='train' evaluates on "
        "config.input.path"
      )
  return ml_collections.ConfigDict(
    dict(
      source=input_cfg.source,
      path=path,
      split=split,
      tfds_data_dir=input_cfg.get("tfds_data_dir", ""),
      tfds_feature=input_cfg.get("tfds_feature", "image"),
      tfds_label_feature=input_cfg.get("tfds_label_feature", "label"),
    )
  )


def _training_label_map(
  input_cfg, eval_source_cfg, class_names: tuple[str, ...]
) -> tuple[np.ndarray, tuple[str, ...]]:
  """(eval label -> training label, the training class names).

  Only folders can disagree: an evaluation folder's classes are its own subdirectories, which
  must be among the training folder's (a missing class would shift every later label).
  """
  if input_cfg.source != "folder" or eval_source_cfg.path == input_cfg.path:
    return np.arange(len(class_names), dtype=np.int32), class_names
  train_names = _visible_subdirectories(input_cfg.path)
  if not train_names:  # no training folder to compare with: the set's own classes
    return np.arange(len(class_names), dtype=np.int32), class_names
  unknown = sorted(set(class_names) - set(train_names))
  if unknown:
    raise ValueError(
      f"config.input.eval_path={eval_source_cfg.path!r} has classes that "
      f"config.input.path={input_cfg.path!r} lacks: {unknown[:5]}"
      + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    )
  index = {name: i for i, name in enumerate(train_names)}
  return np.array([index[name] for name in class_names], np.int32), train_names


def image_eval_batches(
  config: ml_collections.ConfigDict,
  split: str | None = None,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> EvalSet:
  """The evaluation set of `split`: eval views of every image once, in source order.

  Args:
    config: the run config; reads `config.input`: the source fields as for training, plus
      eval_split (default "test"), eval_path (folder sources), eval_batch_size (default
      batch_size), eval_crop_pct (default 0.875), image_size, mean, std.
    split: which images; None: `config.input.eval_split`.
      embedded: a split of the digits, "train" | "test" | "all" ("test": 355 held-out digits);
      tfds: any TFDS split spec ("validation" for imagenet2012, "test" for cifar10);
      folder: "train" is the training folder `config.input.path`, any other split the folder
        `config.input.eval_path` (its classes must be among the training folder's; labels are
        the training folder's).
    process_index, process_count: multi-process evaluation: each process gets rows
      [p·b, (p+1)·b) of every global eval batch (b = eval_batch_size / P), so the processes
      together see every example once. The defaults give the full set to the caller.

  Returns:
    The set: `batches()` yields `{"image": f32[b, S, S, 3], "label": int32[b],
    "example_mask": bool[b]}` with static shapes; rows past the last example repeat real
    examples with `example_mask` False.

  Raises:
    ValueError: bad config values, or a source without labels or usable images.
    FileNotFoundError: the evaluation images do not exist.
  """
  input_cfg = config.input
  split = input_cfg.get("eval_split", DEFAULT_EVAL_SPLIT) if split is None else split
  batch_size = input_cfg.get("eval_batch_size", None) or input_cfg.batch_size
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
      f"config.input.eval_batch_size={batch_size} (default: batch_size) must be positive and "
      f"divisible by process_count={process_count}"
    )
  rows = batching.process_rows(batch_size, process_index, process_count)
  mean, std = _normalisation(input_cfg)
  view = dict(
    image_size=_image_size(input_cfg), crop_pct=_eval_crop_pct(input_cfg), mean=mean, std=std
  )
  source_cfg = _eval_source_config(input_cfg, split)
  source = image_sources.make_image_source(source_cfg)
  path_field = "eval_path" if input_cfg.source == "folder" and split != "train" else "path"
  class_names = require_labels(source, source_cfg, path_field)
  label_map, class_names = _training_label_map(input_cfg, source_cfg, class_names)
  num_batches = math.ceil(len(source) / batch_size)
  logging.info(
    "Evaluation set %s: %s; %d images -> %d batches of %d, crop_pct %g.",
    source.name,
    image_sources.summarize(source.stats),
    len(source),
    num_batches,
    batch_size,
    view["crop_pct"],
  )
  load = LoadEvalBatch(source, batch_size, rows, view, label_map)
  return EvalSet(
    grain.MapDataset.range(num_batches).map(load),
    num_batches,
    len(source),
    batch_size,
    view["image_size"],
    len(class_names),
    class_names,
    source.stats,
  )
