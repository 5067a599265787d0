"""RandAugment and random erasing for image fine-tuning (spec §1.6, "ImageNet, v1").

data2vec's ImageNet fine-tuning builds its training view with timm's `create_transform`:
RandomResizedCrop (bicubic) → flip → RandAugment `rand-m9-mstd0.5-inc1` → ToTensor → Normalize →
RandomErasing(0.25, mode 'pixel'). (timm leaves colour jitter out when RandAugment is on.) This
module gives the two timm-specific steps, with every draw from an explicit numpy Generator so that
a view stays a pure function of (seed, epoch, record), as in `image.py`:

RandAugment, policy "rand-m9-mstd0.5-inc1":
  - 2 ops per image, drawn uniformly with replacement from the 15 "increasing" ops below;
  - each op is applied with probability 0.5;
  - its magnitude is N(9, 0.5²) clipped to [0, 10] (drawn only when the op is applied), mapped to
    the op's argument by timm's level functions, where the "increasing" ones get stronger as the
    magnitude grows (fewer posterize bits, a lower solarize threshold, enhance factors further
    from 1);
  - signed arguments (rotate, shear, translate, enhance offsets) get a random sign;
  - geometric ops resample bicubically and fill uncovered pixels with the ImageNet mean as uint8,
    (124, 116, 104).

Random erasing, timm's 'pixel' mode, on the normalised float image: with probability `prob` one
box of area U(0.02, 1/3) of the image and log-uniform aspect (h/w) in [0.3, 1/0.3] (up to 10
attempts to fit one) is filled with N(0, 1) noise per pixel and channel.
"""

import dataclasses
import math
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from d2v_jax.data.image import (
  IMAGENET_MEAN,
  adjust_brightness,
  adjust_contrast,
  adjust_saturation,
)

MAX_LEVEL = 10.0  # timm's magnitude scale: "m9" is 9 of 10
# timm's `img_mean` hparam: round(255 · mean) per channel.
FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)  # (124, 116, 104)
_BICUBIC = Image.Resampling.BICUBIC
_ERASE_ATTEMPTS = 10

# timm's `_RAND_INCREASING_TRANSFORMS` ("inc1") and `_RAND_TRANSFORMS` ("inc0"), in timm's order.
INCREASING_OPS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "PosterizeIncreasing",
  "SolarizeIncreasing",
  "SolarizeAdd",
  "ColorIncreasing",
  "ContrastIncreasing",
  "BrightnessIncreasing",
  "SharpnessIncreasing",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)
_NOT_INCREASING = {
  "PosterizeIncreasing": "Posterize",
  "SolarizeIncreasing": "Solarize",
  "ColorIncreasing": "Color",
  "ContrastIncreasing": "Contrast",
  "BrightnessIncreasing": "Brightness",
  "SharpnessIncreasing": "Sharpness",
}
PLAIN_OPS = tuple(_NOT_INCREASING.get(name, name) for name in INCREASING_OPS)

# Ops whose argument gets a random sign (timm's `_randomly_negate`).
SIGNED_OPS = frozenset(
  {
    "Rotate",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
  }
)


# ---------------------------------------------------------------------------------------------
# Magnitude → argument (timm's level functions; m in [0, 10]).


def _enhance_increasing(m: float, negate: bool) -> float:
  # 1 ± 0.9·m/10: the further from 1 the stronger; ≥ 0.1 (a factor of 0 would be a flat image).
  offset = m / MAX_LEVEL * 0.9
  return max(0.1, 1.0 + (-offset if negate else offset))


_LEVELS = {
  "Rotate": lambda m: m / MAX_LEVEL * 30.0,  # degrees
  "ShearX": lambda m: m / MAX_LEVEL * 0.3,
  "ShearY": lambda m: m / MAX_LEVEL * 0.3,
  "TranslateXRel": lambda m: m / MAX_LEVEL * 0.45,  # fraction of the width
  "TranslateYRel": lambda m: m / MAX_LEVEL * 0.45,
  "PosterizeIncreasing": lambda m: 4 - int(m / MAX_LEVEL * 4),  # bits kept: 4 → 0
  "Posterize": lambda m: int(m / MAX_LEVEL * 4),  # bits kept: 0 → 4
  "SolarizeIncreasing": lambda m: 256 - int(m / MAX_LEVEL * 256),  # threshold: 256 → 0
  "Solarize": lambda m: int(m / MAX_LEVEL * 256),
  "SolarizeAdd": lambda m: int(m / MAX_LEVEL * 110),  # added below 128
  "Color": lambda m: m / MAX_LEVEL * 1.8 + 0.1,  # factor 0.1 → 1.9
  "Contrast": lambda m: m / MAX_LEVEL * 1.8 + 0.1,
  "Brightness": lambda m: m / MAX_LEVEL * 1.8 + 0.1,
  "Sharpness": lambda m: m / MAX_LEVEL * 1.8 + 0.1,
}


def op_argument(name: str, magnitude: float, negate: bool = False) -> float | int | None:
  """The argument of op `name` at `magnitude` (timm's level function); None for argument-free ops.

  Args:
    name: an op of `INCREASING_OPS` or `PLAIN_OPS`.
    magnitude: m in [0, 10].
    negate: the sign draw of a signed op (`SIGNED_OPS`); ignored by the others.
  """
  if name in ("AutoContrast", "Equalize", "Invert"):
    return None
  if name.endswith("Increasing") and name not in ("PosterizeIncreasing", "SolarizeIncreasing"):
    return _enhance_increasing(magnitude, negate)
  if name not in _LEVELS:
    raise ValueError(f"unknown RandAugment op {name!r}")
  value = _LEVELS[name](magnitude)
  return -value if negate and name in SIGNED_OPS else value


# ---------------------------------------------------------------------------------------------
# The ops, on RGB PIL images.


def _affine(image: Image.Image, coefficients, fill) -> Image.Image:
  """PIL affine resampling: output pixel (x, y) reads input (a·x + b·y + c, d·x + e·y + f)."""
  return image.transform(
    image.size, Image.Transform.AFFINE, coefficients, resample=_BICUBIC, fillcolor=fill
  )


def _solarize_add(image: Image.Image, add: int) -> Image.Image:
  levels = np.arange(256)
  table = np.where(levels < 128, np.minimum(levels + add, 255), levels).tolist()
  return image.point(table * len(image.getbands()))


def _posterize(image: Image.Image, bits: int) -> Image.Image:
  # Keeps the top `bits` bits. A table rather than ImageOps.posterize, which (Pillow >= 11)
  # refuses bits = 0: "PosterizeIncreasing" at m = 10 asks for it (older Pillow gave black).
  if bits >= 8:
    return image
  table = (np.arange(256) & (0xFF << (8 - bits)) & 0xFF).tolist()
  return image.point(table * len(image.getbands()))


def _sharpness(image: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Sharpness(image).enhance(factor)


_OPS = {
  "AutoContrast": lambda im, _, __: ImageOps.autocontrast(im),
  "Equalize": lambda im, _, __: ImageOps.equalize(im),
  "Invert": lambda im, _, __: ImageOps.invert(im),
  # Counter-clockwise about the centre, same canvas.
  "Rotate": lambda im, deg, fill: im.rotate(deg, resample=_BICUBIC, fillcolor=fill),
  "Posterize": lambda im, bits, _: _posterize(im, bits),
  "Solarize": lambda im, threshold, _: ImageOps.solarize(im, threshold),
  "SolarizeAdd": lambda im, add, _: _solarize_add(im, add),
  # image.py's equivalents of ImageEnhance Color / Contrast / Brightness (same results, faster).
  "Color": lambda im, f, _: adjust_saturation(im, f),
  "Contrast": lambda im, f, _: adjust_contrast(im, f),
  "Brightness": lambda im, f, _: adjust_brightness(im, f),
  "Sharpness": lambda im, f, _: _sharpness(im, f),
  "ShearX": lambda im, s, fill: _affine(im, (1, s, 0, 0, 1, 0), fill),
  "ShearY": lambda im, s, fill: _affine(im, (1, 0, 0, s, 1, 0), fill),
  "TranslateXRel": lambda im, pct, fill: _affine(im, (1, 0, pct * im.width, 0, 1, 0), fill),
  "TranslateYRel": lambda im, pct, fill: _affine(im, (1, 0, 0, 0, 1, pct * im.height), fill),
}


def apply_op(image: Image.Image, name: str, argument, fill: tuple[int, int, int] = FILL):
  """Op `name` with `argument` (see `op_argument`) on an RGB image; same size and mode."""
  return _OPS[_NOT_INCREASING.get(name, name)](image, argument, fill)


# ---------------------------------------------------------------------------------------------
# The policy.


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """timm's RandAugment: `num_ops` ops per image, each applied with probability `prob`.

  Picklable (grain may run it in worker processes); all randomness comes from the Generator
  passed to `__call__`.

  Attributes:
    num_ops: ops drawn per image (uniformly, with replacement).
    magnitude: m, on timm's 0–10 scale.
    magnitude_std: std of the Gaussian noise on m per applied op; inf = U(0, m) instead; 0 = none.
    magnitude_max: upper clip of the noisy m (the lower one is 0).
    increasing: the "increasing" op set (`inc1`, `INCREASING_OPS`) or the plain one (`PLAIN_OPS`).
    prob: probability that a drawn op is applied.
    fill: RGB fill of pixels that geometric ops uncover.
  """

  num_ops: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.5
  magnitude_max: float = MAX_LEVEL
  increasing: bool = True
  prob: float = 0.5
  fill: tuple[int, int, int] = FILL

  def __post_init__(self):
    if self.num_ops < 0:
      raise ValueError(f"RandAugment num_ops must be >= 0, got {self.num_ops}")
    if not 0 <= self.magnitude <= self.magnitude_max:
      raise ValueError(
        f"RandAugment magnitude must lie in [0, magnitude_max={self.magnitude_max}], "
        f"got {self.magnitude}"
      )
    if self.magnitude_std < 0:
      raise ValueError(f"RandAugment magnitude_std must be >= 0, got {self.magnitude_std}")
    if not 0 <= self.prob <= 1:
      raise ValueError(f"RandAugment prob must lie in [0, 1], got {self.prob}")

  @property
  def ops(self) -> tuple[str, ...]:
    return INCREASING_OPS if self.increasing else PLAIN_OPS

  def draw_magnitude(self, rng: np.random.Generator) -> float:
    """m with timm's noise: N(m, std²) (or U(0, m) for std inf), clipped to [0, magnitude_max]."""
    magnitude = self.magnitude
    if self.magnitude_std == math.inf:
      magnitude = rng.uniform(0.0, magnitude)
    elif self.magnitude_std > 0:
      magnitude = rng.normal(magnitude, self.magnitude_std)
    return float(min(max(magnitude, 0.0), self.magnitude_max))

  def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """An RGB image → the augmented RGB image of the same size."""
    for index in rng.integers(0, len(self.ops), size=self.num_ops):
      if rng.random() >= self.prob:
        continue
      name = self.ops[index]
      magnitude = self.draw_magnitude(rng)
      negate = bool(rng.random() < 0.5) if name in SIGNED_OPS else False
      image = apply_op(image, name, op_argument(name, magnitude, negate), self.fill)
    return image


def parse_policy(policy: str, fill: tuple[int, int, int] = FILL) -> RandAugment:
  """A timm RandAugment string → `RandAugment`, e.g. "rand-m9-mstd0.5-inc1".

  Sections after "rand", in any order: m<magnitude>, n<num ops>, mstd<std> (> 100: uniform
  magnitude, as timm), mmax<max magnitude>, inc<0|1>. Unset ones keep timm's defaults (m 10, n 2,
  mstd 0, mmax 10, inc 0). timm's op weights (`w`) are not supported.

  Raises:
    ValueError: a string that is not such a policy.
  """
  sections = policy.split("-")
  if sections[0] != "rand":
    raise ValueError(f"RandAugment policy must start with 'rand', got {policy!r}")
  fields = dict(num_ops=2, magnitude=MAX_LEVEL, magnitude_std=0.0, increasing=False)
  magnitude_max = MAX_LEVEL
  seen = set()
  for section in sections[1:]:
    match = re.fullmatch(r"(mstd|mmax|inc|m|n)(\d+(?:\.\d*)?)", section)
    if match is None:
      raise ValueError(
        f"RandAugment policy {policy!r}: bad section {section!r} (expected m<float>, n<int>, "
        "mstd<float>, mmax<float> or inc<0|1>)"
      )
    key, value = match.groups()
    if key in seen:
      raise ValueError(f"RandAugment policy {policy!r}: section {key!r} given twice")
    seen.add(key)
    if key == "m":
      fields["magnitude"] = float(value)
    elif key == "n":
      if not value.isdigit():
        raise ValueError(f"RandAugment policy {policy!r}: n must be an integer, got {value!r}")
      fields["num_ops"] = int(value)
    elif key == "mstd":
      std = float(value)
      fields["magnitude_std"] = math.inf if std > 100 else std
    elif key == "mmax":
      magnitude_max = float(value)
    elif value not in ("0", "1"):
      raise ValueError(f"RandAugment policy {policy!r}: inc must be 0 or 1, got {value!r}")
    else:
      fields["increasing"] = value == "1"
  return RandAugment(**fields, magnitude_max=magnitude_max, fill=fill)


# ---------------------------------------------------------------------------------------------
# Random erasing.


def random_erasing_box(
  height: int,
  width: int,
  rng: np.random.Generator,
  *,
  min_area: float = 0.02,
  max_area: float = 1 / 3,
  min_aspect: float = 0.3,
) -> tuple[int, int, int, int] | None:
  """timm's erase box search: (top, left, h, w), or None if 10 attempts do not fit.

  Per attempt: area U(min_area, max_area) of the image, h/w log-uniform in
  [min_aspect, 1/min_aspect], sides rounded; it fits if h < height and w < width (strictly, as
  timm), then the corner is uniform over the positions that keep it inside.
  """
  area = height * width
  log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
  for _ in range(_ERASE_ATTEMPTS):
    target_area = rng.uniform(min_area, max_area) * area
    aspect = math.exp(rng.uniform(*log_aspect))
    h = int(round(math.sqrt(target_area * aspect)))
    w = int(round(math.sqrt(target_area / aspect)))
    if h < height and w < width:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  return None


def random_erasing(pixels: np.ndarray, rng: np.random.Generator, prob: float = 0.25) -> np.ndarray:
  """timm's RandomErasing, mode 'pixel', one box: a copy of `pixels` with a box of N(0, 1) noise.

  Meant for the normalised image (where N(0, 1) is on the scale of the data).

  Args:
    pixels: float[H, W, C], normalised.
    rng: the draws.
    prob: probability of erasing (spec: 0.25).

  Returns:
    float[H, W, C] in the input dtype; the input itself is not modified.
  """
  if not 0 <= prob <= 1:
    raise ValueError(f"random erasing prob must lie in [0, 1], got {prob}")
  if pixels.ndim != 3:
    raise ValueError(f"random_erasing expects [H, W, C] pixels, got shape {pixels.shape}")
  pixels = np.array(pixels)  # a copy
  if rng.random() >= prob:
    return pixels
  height, width, channels = pixels.shape
  box = random_erasing_box(height, width, rng)
  if box is not None:
    top, left, h, w = box
    noise = rng.standard_normal((h, w, channels), dtype=np.float32)  # [h, w, C]
    pixels[top : top + h, left : left + w] = noise
  return pixels
