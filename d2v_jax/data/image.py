"""Image pretraining input pipeline (data2vec v1 vision, spec §1.2 and §1.5): augmented views.

Batches are `{"image": float32[b, S, S, 3]}` (NHWC, S = `config.input.image_size`), normalised
with a per-channel mean and std (ImageNet's by default). The teacher and the student see the same
augmented view (spec §1.2), so each image gives one view. The augmentations are those of the
published code (data2vec_vision `DataAugmentationForBEiT`), in its order:
  1. ColorJitter(brightness, contrast, saturation; hue 0) on the whole image: factors drawn from
     [max(0, 1 - s), 1 + s] and applied in a random order; the results equal PIL's ImageEnhance,
     i.e. torchvision's PIL path (contrast blends with the mean grey level of the whole image);
  2. RandomResizedCrop to S x S: torchvision's parameter search (scale (0.08, 1), log-uniform ratio
     (3/4, 4/3), 10 attempts, then its central-crop fallback), PIL bicubic resampling;
  3. horizontal flip with probability 0.5. It is applied to the S x S crop rather than to the whole
     image before cropping: the same distribution (the crop window's is mirror-symmetric), cheaper.
Then /255 and (x - mean) / std.

Each epoch shuffles the images (seed from `(seed, epoch)`) and cuts them into full global batches
(the remainder is dropped). A `grain.MapDataset` over global batch indices 0, 1, 2, ... (epoch after
epoch, without end) loads and augments the members of a batch. Every augmentation draw comes from a
numpy Generator seeded by `(seed, stream, epoch, record)`, one stream per augmentation (so turning
one off leaves the others' draws unchanged): a batch is a pure function of its index, and a grain
iterator restored with `set_state` continues exactly.

Multi-process: process p of P takes rows [p*b, (p+1)*b) of every global batch (b = batch/P), so
the processes together see each global batch exactly once. Every process must use the same seed.
"""

import dataclasses
import math
from collections.abc import Sequence

import grain
import numpy as np
from absl import logging
from PIL import Image, ImageEnhance, ImageStat

from d2v_jax.data import batching, image_sources

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BICUBIC = Image.Resampling.BICUBIC
_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop
# A batch is decoded and augmented by one thread (PIL releases the GIL while decoding and
# resampling); a few in flight keep the accelerator fed without holding many large batches.
_READ_THREADS = 4
_PREFETCH_BATCHES = 4
# Independent numpy seed streams; the stream id keeps (seed, epoch) and (seed, epoch, record) apart.
# (Stream 0 is the per-epoch shuffle of batching.EpochPlan.)
_CROP_STREAM, _FLIP_STREAM, _JITTER_STREAM = 1, 2, 3


# ---------------------------------------------------------------------------------------------
# Augmentations (each a function of an explicit numpy Generator).


def random_resized_crop_params(
  height: int,
  width: int,
  scale: tuple[float, float],
  ratio: tuple[float, float],
  rng: np.random.Generator,
) -> tuple[int, int, int, int]:
  """torchvision's `RandomResizedCrop.get_params`: a window of random area and aspect ratio.

  Args:
    height, width: the image size.
    scale: range of the window's area, as a fraction of the image's.
    ratio: range of the window's width / height, sampled log-uniformly.
    rng: the draws (two uniforms per attempt, then two integers).

  Returns:
    (top, left, crop height, crop width). After 10 attempts that do not fit, the central crop of
    the whole image clamped to the ratio range.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(_CROP_ATTEMPTS):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def color_jitter_params(
  strengths: tuple[float, float, float], rng: np.random.Generator
) -> tuple[tuple[int, float], ...]:
  """torchvision's `ColorJitter.get_params` without hue: ((op, factor), ...) in application order.

  Ops 0, 1, 2 are brightness, contrast, saturation; an op of strength s has its factor drawn from
  U[max(0, 1 - s), 1 + s]; ops of strength 0 are left out. All draws are made whatever the
  strengths, so a stream's draws do not depend on them.
  """
  order = rng.permutation(3)
  factors = [rng.uniform(max(0.0, 1.0 - s), 1.0 + s) for s in strengths]
  return tuple((int(op), float(factors[op])) for op in order if strengths[op] > 0)


_LEVELS = Image.frombytes("L", (256, 1), bytes(range(256)))  # every 8-bit value once


def _blend_table(level: int, factor: float) -> list[int]:
  """PIL's `Image.blend(flat grey `level`, image, factor)` for every input value: a point table.

  Blending is per value, so this table applied with `Image.point` gives exactly what
  ImageEnhance's blend gives, at a fraction of the cost on a large image.
  """
  blended = Image.blend(Image.new("L", (256, 1), level), _LEVELS, factor)
  return np.asarray(blended)[0].tolist() * 3  # the same table for R, G and B


def adjust_brightness(image: Image.Image, factor: float) -> Image.Image:
  """= `ImageEnhance.Brightness(image).enhance(factor)` (torchvision's adjust_brightness)."""
  return image.point(_blend_table(0, factor))


def adjust_contrast(image: Image.Image, factor: float) -> Image.Image:
  """= `ImageEnhance.Contrast(image).enhance(factor)`: blend with the image's mean grey level."""
  mean = int(ImageStat.Stat(image.convert("L")).mean[0] + 0.5)
  return image.point(_blend_table(mean, factor))


def adjust_saturation(image: Image.Image, factor: float) -> Image.Image:
  """= torchvision's adjust_saturation: blend with the image's per-pixel grey level."""
  return ImageEnhance.Color(image).enhance(factor)


_ADJUSTMENTS = (adjust_brightness, adjust_contrast, adjust_saturation)


def color_jitter(image: Image.Image, params: Sequence[tuple[int, float]]) -> Image.Image:
  """Applies `color_jitter_params` to an RGB image (uint8 arithmetic, as torchvision's PIL path)."""
  for op, factor in params:
    image = _ADJUSTMENTS[op](image, factor)
  return image


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8[..., 3] RGB -> float32 (pixels / 255 - mean) / std."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return (pixels.astype(np.float32) * (1 / (255 * std)) - mean / std).astype(np.float32)


def eval_image(
  image: np.ndarray | Image.Image,
  image_size: int,
  mean: Sequence[float] = IMAGENET_MEAN,
  std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
  """The deterministic evaluation view: the whole image resized to S x S (bicubic), normalised.

  Args:
    image: uint8[H, W, 3] RGB, or an RGB PIL image.
    image_size: S.

  Returns:
    float32[S, S, 3].
  """
  if not isinstance(image, Image.Image):
    image = Image.fromarray(np.asarray(image, np.uint8))
  resized = image.resize((image_size, image_size), _BICUBIC)
  return normalize(np.asarray(resized), mean, std)  # [S, S, 3]


@dataclasses.dataclass(frozen=True)
class Augment:
  """The training view of one image: colour jitter, random resized crop, flip, normalisation.

  Picklable (grain may run it in worker processes). Draws for `record` in `epoch` come from
  Generators seeded by (seed, stream, epoch, record), one stream per augmentation.
  """

  image_size: int
  scale: tuple[float, float]
  ratio: tuple[float, float]
  flip: bool
  jitter: tuple[float, float, float]  # brightness, contrast, saturation strengths
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

  def jitter_params(self, epoch: int, record: int) -> tuple[tuple[int, float], ...]:
    """The colour jitter of `record` in `epoch`: ((op, factor), ...), see `color_jitter_params`."""
    if not any(self.jitter):
      return ()
    return color_jitter_params(self.jitter, self._rng(_JITTER_STREAM, epoch, record))

  def __call__(self, image: Image.Image, epoch: int, record: int) -> np.ndarray:
    """An RGB image -> float32[S, S, 3], the view of `record` in `epoch`."""
    image = color_jitter(image, self.jitter_params(epoch, record))
    top, left, h, w = self.crop_box(image.height, image.width, epoch, record)
    # crop then resize, as torchvision's resized_crop (a resize `box` would also sample outside it)
    crop = image.crop((left, top, left + w, top + h)).resize((self.image_size,) * 2, _BICUBIC)
    pixels = np.asarray(crop)  # [S, S, 3] uint8
    if self.flips(epoch, record):
      pixels = pixels[:, ::-1]
    return normalize(pixels, self.mean, self.std)


# ---------------------------------------------------------------------------------------------
# Batches.


def read_or_substitute(
  source: image_sources.ImageSource, record: int, failures: batching.DecodeFailures
) -> tuple[int, Image.Image]:
  """Decodes `record`; if that fails, the next record (in source order) that decodes.

  The open at index time makes this rare (a truncated file, one changed since); a deterministic
  substitute keeps the batch full and the resumed iterator exact. The substitute's own draws
  (seeded by its record) and label are used.
  """
  num_records = len(source)
  for offset in range(num_records):
    candidate = (record + offset) % num_records
    try:
      return candidate, source.pil_image(candidate)
    except image_sources.DECODE_ERRORS as e:
      failures(candidate, e)
  raise RuntimeError(f"{source.name}: no image decodes any more")


class LoadImageBatch(grain.transforms.Map):
  """Global batch index -> this process's rows of that batch, decoded and augmented.

  Module level and picklable (grain may run it in worker processes). Counters it updates
  (`stats.decode_failures`) are only visible in the process that ran it.
  """

  def __init__(
    self, source: image_sources.ImageSource, plan: batching.EpochPlan, rows: slice, augment: Augment
  ):
    self.source = source
    self.plan = plan
    self.rows = rows
    self.augment = augment
    self._failures = batching.DecodeFailures(source, "the next image")

  def map(self, element: int) -> dict[str, np.ndarray]:
    epoch, records = self.plan.batch(element)
    records = records[self.rows]  # [b]
    size = self.augment.image_size
    images = np.empty((len(records), size, size, 3), np.float32)  # [b, S, S, 3]
    for row, record in enumerate(records):
      used, image = read_or_substitute(self.source, int(record), self._failures)
      images[row] = self.augment(image, epoch, used)
    return {"image": images}


@dataclasses.dataclass(frozen=True)
class ImagePretrainDataset:
  """The training input: iterate it for batches; checkpoint the iterator with orbax.

  Attributes:
    batches: random access, global batch index (across epochs) -> this process's batch.
    iter_dataset: `batches` as an (infinite) grain IterDataset; `iter()` of it is a
      `grain.DatasetIterator` whose `get_state()`/`set_state()` resume exactly.
    stats: what indexing skipped or converted (and decode failures seen in this process).
    batches_per_epoch: global batches per pass over the source.
    image_size: S, the side of every image of a batch.
  """

  batches: grain.MapDataset
  iter_dataset: grain.IterDataset
  stats: image_sources.ImageStats
  batches_per_epoch: int
  image_size: int

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.iter_dataset)


def make_augment(input_cfg, seed: int) -> Augment:
  """The training augmentation that `config.input` describes (fields: see the pipeline)."""
  image_size = int(input_cfg.image_size)
  if image_size <= 0:
    raise ValueError(f"config.input.image_size must be positive, got {input_cfg.image_size}")
  scale = _pair(input_cfg.crop_scale, "crop_scale")
  if not 0 < scale[0] <= scale[1] <= 1:
    raise ValueError(f"config.input.crop_scale must satisfy 0 < min <= max <= 1, got {scale}")
  ratio = _pair(input_cfg.crop_ratio, "crop_ratio")
  if not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f"config.input.crop_ratio must satisfy 0 < min <= max, got {ratio}")
  jitter = input_cfg.color_jitter
  jitter = (float(jitter),) * 3 if np.ndim(jitter) == 0 else tuple(float(s) for s in jitter)
  if len(jitter) != 3 or min(jitter) < 0:
    raise ValueError(
      "config.input.color_jitter must be a strength >= 0 or three (brightness, contrast, "
      f"saturation), got {input_cfg.color_jitter}"
    )
  mean, std = _triple(input_cfg.mean, "mean"), _triple(input_cfg.std, "std")
  if min(std) <= 0:
    raise ValueError(f"config.input.std must be positive, got {std}")
  return Augment(image_size, scale, ratio, bool(input_cfg.flip), jitter, mean, std, seed)


def make_image_pretrain_dataset(
  input_cfg, *, seed: int, process_index: int = 0, process_count: int = 1
) -> ImagePretrainDataset:
  """The pretraining pipeline that `config.input` describes.

  Args:
    input_cfg: `config.input`, with the fields
      source, path, split, tfds_data_dir, tfds_feature: the images (`image_sources`);
      image_size: S, the side of the square crops;
      batch_size: the global batch;
      crop_scale: (min, max) area of a crop as a fraction of the image (spec: (0.08, 1.0));
      crop_ratio: (min, max) width / height of a crop (spec: (3/4, 4/3));
      flip: random horizontal flips (p 0.5);
      color_jitter: brightness/contrast/saturation strength (spec: 0.4), or three of them; 0 = off;
      mean, std: per-channel (RGB) normalisation of pixels / 255;
      num_workers: grain worker processes (0: threads in this process).
    seed: data seed (non-negative), the same on every process.
    process_index: this process (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).

  Returns:
    The dataset; `iter()` of it yields this process's `batch_size // process_count` rows of
    every global batch.

  Raises:
    ValueError: bad config values, an unusable source, or fewer images than one global batch.
    FileNotFoundError: the source's path does not exist.
  """
  batch_size = input_cfg.batch_size
  rows = batching.process_rows(batch_size, process_index, process_count)
  augment = make_augment(input_cfg, seed)
  source = image_sources.make_image_source(input_cfg)
  plan = batching.EpochPlan(len(source), batch_size, seed)
  logging.info(
    "%s: %s; %d images used -> %d global batches of %d per epoch, %dx%d crops.",
    source.name,
    image_sources.summarize(source.stats),
    len(source),
    plan.batches_per_epoch,
    batch_size,
    augment.image_size,
    augment.image_size,
  )
  if plan.batches_per_epoch == 0:
    raise ValueError(
      f"{source.name} has {len(source)} usable images, fewer than one global batch of "
      f"{batch_size}: lower config.input.batch_size"
    )

  batches, iter_dataset = batching.endless_batches(
    LoadImageBatch(source, plan, rows, augment),
    num_workers=input_cfg.num_workers,
    read_threads=_READ_THREADS,
    prefetch=_PREFETCH_BATCHES,
  )
  return ImagePretrainDataset(
    batches, iter_dataset, source.stats, plan.batches_per_epoch, augment.image_size
  )


# ---------------------------------------------------------------------------------------------
# Linear-probe data: the embedded digits, deterministic views.


@dataclasses.dataclass(frozen=True)
class ImageProbeData:
  """Labelled images for a linear probe.

  Attributes:
    images: float32[N, S, S, 3], `eval_image` views.
    labels: int32[N].
    class_names: the name of every label.
  """

  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]


def load_digit_probe_sets(
  image_size: int,
  mean: Sequence[float] = IMAGENET_MEAN,
  std: Sequence[float] = IMAGENET_STD,
) -> tuple[ImageProbeData, ImageProbeData]:
  """(train, test) of the embedded digits (`image_sources.digit_split_indices`), as eval views.

  Memory: 1,797 x S^2 x 12 bytes in all (59 MB at S = 64).
  """
  train, test = (
    _probe_set(image_sources.DigitsSource(split), image_size, mean, std)
    for split in ("train", "test")
  )
  return train, test


def _probe_set(source, image_size, mean, std) -> ImageProbeData:
  images = np.stack([eval_image(source[i], image_size, mean, std) for i in range(len(source))])
  return ImageProbeData(images, source.labels.astype(np.int32), source.class_names)


def _pair(value, field: str) -> tuple[float, float]:
  values = tuple(float(v) for v in value)
  if len(values) != 2:
    raise ValueError(f"config.input.{field} must be (min, max), got {value}")
  return values


def _triple(value, field: str) -> tuple[float, float, float]:
  values = tuple(float(v) for v in value)
  if len(values) != 3:
    raise ValueError(f"config.input.{field} must have 3 values (R, G, B), got {value}")
  return values
