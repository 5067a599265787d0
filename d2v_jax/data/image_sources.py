"""Image sources: random-access sequences of RGB uint8 images, for the vision pipeline (spec §1.2).

Every source has `name` (for messages), `stats` (counters), `labels` (int32[N] or None),
`class_names` (tuple or None), `len(source)`, `source[i] -> uint8[H, W, 3]`,
`source.pil_image(i)` (the same image as an RGB `PIL.Image`, what the augmentations work on) and
`source.describe(i)` (the file path or TFDS record, for logs).

Three kinds (`config.input.source`):
  embedded  scikit-learn's handwritten digits (`load_digits`: 1,797 real 8x8 scans, 10 classes),
            the offline default; see `digit_split_indices` for the train/test split;
  folder    an ImageFolder tree `root/<class>/**/<image>` (classes sorted -> labels 0, 1, ...), or a
            flat folder of images (labels None);
  tfds      a TFDS dataset prepared as ArrayRecord, read with `tfds.data_source` (no TensorFlow).

Pixel formats. Everything becomes 8-bit RGB: greyscale (1, L, I;16, I) is repeated to 3 channels
(16-bit values scaled by 255/65535, not clipped as PIL's own conversion does), palette (P) is
expanded, CMYK and YCbCr are converted by PIL, 16-bit RGB PNGs keep their high byte (PIL), and
images with alpha (RGBA, LA, PA, or P with a transparent colour) are composited on white: the colour
under fully transparent pixels is undefined (often black), white is what a viewer shows. Each of
these is counted in `stats.converted` (and per stored mode in `stats.converted_modes`). EXIF
orientation is not applied, as in torchvision's ImageFolder loader.

Bad files. The folder source opens every file at index time (a cheap header read, no decode):
files that cannot be opened (corrupt, empty, not an image) are skipped, counted and logged with
their paths. A file that opens but later fails to decode (truncated, changed since) raises one of
`DECODE_ERRORS`; the pipeline substitutes another record deterministically and counts it.
"""

import concurrent.futures
import dataclasses
import functools
import io
import struct
from pathlib import Path
from typing import Protocol

import numpy as np
from absl import logging
from PIL import Image

# torchvision's IMG_EXTENSIONS (matched case-insensitively) plus .gif.
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
# What PIL and its plugins raise on malformed data, and what reading a record may raise; the
# pipeline substitutes another record for these and lets anything else (a bug) propagate.
DECODE_ERRORS = (
  OSError,  # includes PIL.UnidentifiedImageError and "image file is truncated"
  ValueError,
  SyntaxError,  # some PIL plugins report malformed headers this way
  EOFError,
  struct.error,
  RuntimeError,
  Image.DecompressionBombError,
)
# Per class, every `DIGITS_TEST_EVERY`-th digit (in load_digits order) is a test digit.
DIGITS_TEST_EVERY = 5
DIGITS_SPLITS = ("train", "test", "all")
# Opening a file is mostly I/O, which releases the GIL: threads speed up scans of big folders.
_SCAN_THREADS = 16
_LOG_EVERY = 50_000
_WHITE = (255, 255, 255)


@dataclasses.dataclass
class ImageStats:
  """What indexing and loading dropped or changed.

  Counters updated while loading (`decode_failures`, and `converted` for TFDS) are only visible in
  the process that loaded the images.
  """

  listed: int = 0  # images the source lists
  skipped_unreadable: int = 0  # could not be opened at index time (corrupt, empty, not an image)
  converted: int = 0  # stored in another pixel format, converted to 8-bit RGB
  decode_failures: int = 0  # opened at index time, failed to decode later; substituted
  converted_modes: dict[str, int] = dataclasses.field(default_factory=dict)  # stored mode -> count


class ImageSource(Protocol):
  """What the pipeline needs from a source."""

  name: str
  stats: ImageStats
  labels: np.ndarray | None  # int32[N]
  class_names: tuple[str, ...] | None

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> np.ndarray: ...

  def pil_image(self, index: int) -> Image.Image: ...

  def describe(self, index: int) -> str: ...


# ---------------------------------------------------------------------------------------------
# Pixel formats.


def stored_mode(image: Image.Image) -> str:
  """The pixel format of an opened (not yet loaded) image: PIL's mode, or "RGB;16" for a 16-bit
  RGB PNG, which PIL opens as mode RGB and reduces to 8 bits while decoding."""
  if image.mode == "RGB" and image.tile:
    rawmode = image.tile[0].args
    rawmode = rawmode[0] if isinstance(rawmode, tuple) and rawmode else rawmode
    if isinstance(rawmode, str) and ";16" in rawmode:
      return "RGB;16"
  return image.mode


def to_rgb(image: Image.Image) -> Image.Image:
  """The image in mode RGB (8 bits per channel); see the module docstring for each mode."""
  mode = image.mode
  if mode == "RGB":
    return image
  if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
    # PIL's convert clips these to 255; scale the 16-bit range instead (mode I, 32-bit, is what
    # some decoders give for 16-bit data: clipped to it).
    values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)  # [H, W]
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
  if mode == "P":  # a transparent palette entry becomes alpha, composited below
    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
  if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE + (255,)), rgba).convert("RGB")
  return image.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV, F (clipped), RGBX, RGB from P


def _count_conversion(stats: ImageStats, mode: str) -> None:
  stats.converted += 1
  stats.converted_modes[mode] = stats.converted_modes.get(mode, 0) + 1


def decode_image(data: bytes) -> tuple[Image.Image, str]:
  """Decodes an encoded image (PNG, JPEG, ...) to RGB.

  Returns:
    (the RGB image, the mode it was stored in).

  Raises:
    One of `DECODE_ERRORS` when the bytes are not a decodable image.
  """
  with Image.open(io.BytesIO(data)) as image:
    mode = stored_mode(image)
    image.load()
    return to_rgb(image), mode


def _require_images(source: ImageSource) -> None:
  if len(source) == 0:
    raise ValueError(
      f"Image source {source.name} has no usable images (listed {source.stats.listed}): "
      f"{source.stats}"
    )


# ---------------------------------------------------------------------------------------------
# Embedded: scikit-learn's digits.


@functools.cache
def load_digits_rgb() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits of `sklearn.datasets.load_digits`, as 8-bit RGB.

  Returns:
    (uint8[1797, 8, 8, 3] images: the 0..16 ink levels scaled by 255/16, grey in all 3 channels,
    int32[1797] labels 0..9).
  """
  from sklearn.datasets import load_digits  # ~1 s import; only this source needs it

  digits = load_digits()
  grey = np.round(digits.images * (255 / 16)).astype(np.uint8)  # [N, 8, 8]
  return np.repeat(grey[..., None], 3, axis=-1), digits.target.astype(np.int32)


def digit_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
  """The records of a split of the digits: deterministic and stratified by class.

  Within each class, in `load_digits` order, every 5th digit (ranks 4, 9, 14, ...) is a test digit
  and the others are training digits: floor(n / 5) of a class of n, 1,442 train / 355 test.

  Args:
    labels: int[N] the class of every digit.
    split: "train", "test" or "all".

  Returns:
    int64[n] indices into `labels`, increasing.
  """
  if split not in DIGITS_SPLITS:
    raise ValueError(
      f"config.input.split={split!r} is not a split of the embedded digits: {DIGITS_SPLITS}"
    )
  if split == "all":
    return np.arange(len(labels))
  rank = np.zeros(len(labels), np.int64)  # position of each digit within its class
  for label in np.unique(labels):
    members = labels == label
    rank[members] = np.arange(members.sum())
  is_test = rank % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1
  return np.flatnonzero(is_test if split == "test" else ~is_test)


class DigitsSource:
  """One split of scikit-learn's 8x8 digits, in memory (the conversion to RGB is not counted)."""

  def __init__(self, split: str = "train"):
    images, labels = load_digits_rgb()
    self.indices = digit_split_indices(labels, split)  # [N] into load_digits
    self.images = images[self.indices]  # [N, 8, 8, 3]
    self.labels = labels[self.indices]  # [N]
    self.class_names = tuple(str(d) for d in range(10))
    self.name = f"embedded sklearn digits (split={split})"
    self.stats = ImageStats(listed=len(self.indices))

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> np.ndarray:
    return self.images[index]

  def pil_image(self, index: int) -> Image.Image:
    return Image.fromarray(self.images[index])

  def describe(self, index: int) -> str:
    return f"sklearn digit #{self.indices[index]} (label {self.labels[index]})"


# ---------------------------------------------------------------------------------------------
# Folders.


def _probe(path: Path) -> str | Exception:
  """The stored mode of an image file (header only), or the exception that opening it raised."""
  try:
    if path.stat().st_size == 0:
      return OSError("empty file (0 bytes)")
    with Image.open(path) as image:
      return stored_mode(image)
  except Exception as e:  # PIL's plugins raise many types on malformed files
    return e


def _is_visible(path: Path) -> bool:
  return not path.name.startswith(".")  # .DS_Store, AppleDouble "._x.jpg", .git, ...


def _image_files(folder: Path, recursive: bool) -> list[Path]:
  candidates = folder.rglob("*") if recursive else folder.iterdir()
  return sorted(
    p
    for p in candidates
    if p.suffix.lower() in IMAGE_SUFFIXES
    and p.is_file()
    and all(_is_visible(part) for part in p.relative_to(folder).parents[:-1])
    and _is_visible(p)
  )


def list_image_folder(root: Path) -> tuple[list[Path], np.ndarray | None, tuple[str, ...] | None]:
  """The image files of an ImageFolder tree, or of a flat folder.

  If any subdirectory of `root` holds images (at any depth), every visible subdirectory is a class
  (sorted names -> labels 0, 1, ..., as torchvision's ImageFolder) and images directly in `root`
  are ignored (logged). Otherwise the images in `root` are taken without labels.

  Returns:
    (sorted paths, int32[N] labels or None, class names or None).
  """
  class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and _is_visible(d))
  per_class = [_image_files(d, recursive=True) for d in class_dirs]
  top_level = _image_files(root, recursive=False)
  if not any(per_class):
    return top_level, None, None
  if top_level:
    logging.warning(
      "Ignoring %d images directly in %s (e.g. %s): with class subdirectories, only images "
      "inside them are used",
      len(top_level),
      root,
      top_level[0],
    )
  for name, files in zip(class_dirs, per_class):
    if not files:
      logging.warning("Class directory %s holds no images", name)
  paths = [p for files in per_class for p in files]
  labels = np.repeat(np.arange(len(class_dirs), dtype=np.int32), [len(f) for f in per_class])
  return paths, labels, tuple(d.name for d in class_dirs)


class FolderImageSource:
  """The images of a folder, checked by opening each at index time; `source[i]` decodes file i."""

  def __init__(self, root: str | Path):
    """Lists and opens every image file; keeps the ones that open.

    Raises:
      FileNotFoundError: `root` is not a directory.
      ValueError: no file could be used.
    """
    root = Path(root)
    if not root.is_dir():
      raise FileNotFoundError(f"Image folder {root} not found (config.input.path)")
    self.name = f"folder {root}"
    paths, labels, self.class_names = list_image_folder(root)
    self.stats = ImageStats(listed=len(paths))
    keep = np.zeros(len(paths), bool)
    examples = {}  # stored mode -> first file in that mode, for the summary
    for i, (path, mode) in enumerate(zip(paths, self._scan(paths))):
      if isinstance(mode, Exception):
        self.stats.skipped_unreadable += 1
        logging.warning("Skipping unreadable image file %s (%s)", path, mode)
        continue
      keep[i] = True
      if mode != "RGB":
        _count_conversion(self.stats, mode)
        examples.setdefault(mode, path)
    self.paths = [str(p) for p, k in zip(paths, keep) if k]
    self.labels = labels[keep] if labels is not None else None
    if examples:
      logging.warning(
        "%s: converting %d images to 8-bit RGB when loading (stored mode: count, e.g.): %s",
        self.name,
        self.stats.converted,
        "; ".join(f"{m}: {self.stats.converted_modes[m]}, {p}" for m, p in examples.items()),
      )
    _require_images(self)

  def _scan(self, paths: list[Path]) -> list[str | Exception]:
    modes = []
    with concurrent.futures.ThreadPoolExecutor(_SCAN_THREADS) as pool:
      for mode in pool.map(_probe, paths):
        modes.append(mode)
        if len(modes) % _LOG_EVERY == 0:
          logging.info("%s: opened %d of %d image files", self.name, len(modes), len(paths))
    return modes

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> np.ndarray:
    return np.asarray(self.pil_image(index))

  def pil_image(self, index: int) -> Image.Image:
    with Image.open(self.paths[index]) as image:
      image.load()  # decode here, so that a bad file raises inside the caller's substitution
      return to_rgb(image)

  def describe(self, index: int) -> str:
    return self.paths[index]


# ---------------------------------------------------------------------------------------------
# TFDS (ArrayRecord).


class TfdsImageSource:
  """A TFDS dataset prepared as ArrayRecord (e.g. imagenet2012, cifar10), without TensorFlow.

  The image feature can be:
    - `tfds.features.Image` (uint8 or uint16): read with `SkipDecoding` and decoded here with PIL,
      so every pixel format converts as for files. Writing such a dataset needs no TensorFlow when
      the examples are encoded bytes, file paths or PIL images; only numpy arrays need TF's encoder.
    - `tfds.features.Tensor` of uint8, shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (RGBA):
      decoded pixels (stored with `encoding="zlib"` or "bytes" when H and W vary).
    - `tfds.features.Tensor` of strings (shape ()): encoded image bytes, decoded with PIL.
  Float images (an Image of float32) and other features are refused at construction.

  Records are not read at construction (ImageNet is 1.28M of them): a record that fails to decode
  is substituted by the pipeline and counted then, and conversions are counted on each record's
  first decode in a process. `labels` reads every record once, on first use.
  """

  def __init__(
    self,
    name: str,
    split: str,
    data_dir: str | None = None,
    feature: str = "image",
    label_feature: str = "label",
  ):
    import tensorflow_datasets as tfds  # slow import; only this source needs it

    if data_dir and not Path(data_dir).is_dir():
      raise FileNotFoundError(f"TFDS data_dir {data_dir} not found (config.input.tfds_data_dir)")
    self.name = f"tfds {name} (split={split})"
    self.feature = feature
    try:
      data = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise FileNotFoundError(
        f"TFDS dataset {name!r} (config.input.path) not found in "
        f"{data_dir or 'the default TFDS data dir'} (config.input.tfds_data_dir)"
      ) from e
    features = data.dataset_info.features
    if feature not in features:
      raise ValueError(
        f"{self.name}: no {feature!r} feature (config.input.tfds_feature); "
        f"it has {list(features.keys())}"
      )
    self._kind = self._feature_kind(features[feature])
    # Reading a record decodes every Image feature in it with TFDS's numpy decoder, which hands
    # over CMYK as 4 channels and palette images as indices, and fails on a bad image in a feature
    # that is not even used: keep the bytes of all of them; `pil_image` decodes the one it needs.
    skip = {
      key: tfds.decode.SkipDecoding()
      for key, info in features.items()
      if isinstance(info, tfds.features.Image)
    }
    if skip:
      data = tfds.data_source(name, split=split, data_dir=data_dir or None, decoders=skip)
    self.data = data
    self.label_feature = label_feature if label_feature in features else None
    label_info = features[label_feature] if self.label_feature else None
    self.class_names = tuple(label_info.names) if hasattr(label_info, "names") else None
    self.stats = ImageStats(listed=len(data))
    self._converted_records: set[int] = set()  # counted once per record and process
    _require_images(self)

  def _feature_kind(self, info) -> str:
    """'encoded' (bytes for PIL) or 'pixels' (a uint8 array); raises for anything else."""
    import tensorflow_datasets as tfds

    dtype = np.dtype(getattr(info, "np_dtype", None) or object)
    shape = tuple(getattr(info, "shape", ()) or ())
    if isinstance(info, tfds.features.Image) and dtype in (np.uint8, np.uint16):
      return "encoded"
    if type(info) is tfds.features.Tensor:
      if dtype == np.dtype(object) and shape == ():
        return "encoded"
      if dtype == np.uint8 and (len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3, 4))):
        return "pixels"
    raise ValueError(
      f"{self.name}: feature {self.feature!r} (config.input.tfds_feature) is {info!r}, which this "
      "source cannot read without TensorFlow. Supported: Image of uint8/uint16 (encoded bytes), "
      "Tensor of uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], Tensor of strings (encoded "
      "image bytes)."
    )

  @functools.cached_property
  def labels(self) -> np.ndarray | None:
    """int32[N] the label of every record (reads every record once), or None without labels."""
    if self.label_feature is None:
      return None
    logging.info("%s: reading the %r of %d records", self.name, self.label_feature, len(self))
    return np.asarray([self.data[i][self.label_feature] for i in range(len(self))], np.int32)

  def __len__(self) -> int:
    return len(self.data)

  def __getitem__(self, index: int) -> np.ndarray:
    return np.asarray(self.pil_image(index))

  def pil_image(self, index: int) -> Image.Image:
    value = self.data[int(index)][self.feature]
    if self._kind == "encoded":
      image, mode = decode_image(value)
    else:
      pixels = np.asarray(value)  # [H, W] or [H, W, C]
      if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
      mode = "L" if pixels.ndim == 2 else ("RGB" if pixels.shape[2] == 3 else "RGBA")
      image = to_rgb(Image.fromarray(pixels, mode))
    if mode != "RGB" and index not in self._converted_records:
      self._converted_records.add(index)
      _count_conversion(self.stats, mode)
    return image

  def describe(self, index: int) -> str:
    return f"{self.name} record {index}"


# ---------------------------------------------------------------------------------------------


def make_image_source(input_cfg) -> ImageSource:
  """Builds the source that `config.input` names.

  Reads the fields `source` (embedded | folder | tfds), `path` (the folder, or the TFDS dataset
  name; empty for embedded), `split` (embedded: train | test | all; TFDS: any split spec such as
  "train[:10%]"; not used by folder), `tfds_data_dir`, `tfds_feature` and, if present,
  `tfds_label_feature` (default "label").

  Raises:
    ValueError: an unknown source or split, a path where none is read or none where one is
      needed, an unsupported TFDS feature, or a source without usable images.
    FileNotFoundError: the folder, TFDS data_dir or TFDS dataset does not exist.
  """
  kind, path = input_cfg.source, input_cfg.path
  if kind == "embedded":
    if path:
      raise ValueError(
        f"config.input.path={path!r} is not used by source='embedded' (the sklearn digits): "
        "leave it empty, or use source=folder or tfds"
      )
    return DigitsSource(input_cfg.split)
  if kind not in ("folder", "tfds"):
    raise ValueError(f"Unknown config.input.source {kind!r}: embedded | folder | tfds")
  if not path:
    raise ValueError(
      f"config.input.path is required for source={kind!r} "
      f"({'the image folder' if kind == 'folder' else 'the TFDS dataset name'})"
    )
  if kind == "folder":
    return FolderImageSource(path)
  return TfdsImageSource(
    path,
    input_cfg.split,
    data_dir=input_cfg.tfds_data_dir or None,
    feature=input_cfg.tfds_feature,
    label_feature=input_cfg.get("tfds_label_feature", "label"),
  )


def summarize(stats: ImageStats) -> str:
  """One line for logs: what a source dropped or changed."""
  modes = ", ".join(f"{m} {n}" for m, n in sorted(stats.converted_modes.items()))
  return (
    f"{stats.listed} listed, {stats.skipped_unreadable} unreadable (skipped), "
    f"{stats.converted} converted to RGB" + (f" ({modes})" if modes else "")
  )
