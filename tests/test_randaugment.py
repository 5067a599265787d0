"""Tests for d2v_jax/data/randaugment.py: timm's RandAugment ("rand-m9-mstd0.5-inc1") and
random erasing ('pixel' mode), with hand-computed magnitude mappings and numpy references of the
pixel ops.
"""

import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from d2v_jax.data import randaugment
from d2v_jax.data.randaugment import RandAugment, apply_op, op_argument, parse_policy

ALL_OPS = sorted(set(randaugment.INCREASING_OPS) | set(randaugment.PLAIN_OPS))


def _image(height, width, seed=0, low=40, high=200):
  """A random RGB image with values in [low, high) (so autocontrast and equalize change it)."""
  pixels = np.random.default_rng(seed).integers(low, high, (height, width, 3), dtype=np.uint8)
  return Image.fromarray(pixels)


@pytest.mark.parametrize("size", [(5, 7), (11, 9), (1, 3)])  # (height, width)
def test_every_op_keeps_size_and_mode(size):
  image = _image(*size)
  for name in ALL_OPS:
    for magnitude in (0.0, 4.5, 9.0, 10.0):
      for negate in (False, True):
        out = apply_op(image, name, op_argument(name, magnitude, negate))
        assert out.size == image.size and out.mode == "RGB", (name, magnitude, negate)


def test_every_increasing_op_changes_an_image_at_magnitude_9():
  image = _image(31, 29)  # PIL's equalize is the identity on images of < ~256 pixels
  for name in randaugment.INCREASING_OPS:
    for negate in (False, True):
      out = apply_op(image, name, op_argument(name, 9.0, negate))
      assert not np.array_equal(np.asarray(out), np.asarray(image)), (name, negate)


@pytest.mark.parametrize(
  "name, magnitude, negate, expected",
  [
    ("Rotate", 10.0, False, 30.0),
    ("Rotate", 10.0, True, -30.0),
    ("Rotate", 9.0, False, 27.0),
    ("ShearX", 9.0, True, -0.27),
    ("ShearY", 10.0, False, 0.3),
    ("TranslateXRel", 10.0, False, 0.45),
    ("TranslateYRel", 5.0, True, -0.225),
    # bits kept, 4 - ⌊4m/10⌋: fewer bits as m grows
    ("PosterizeIncreasing", 0.0, False, 4),
    ("PosterizeIncreasing", 4.9, False, 3),  # ⌊1.96⌋ = 1
    ("PosterizeIncreasing", 9.0, False, 1),  # ⌊3.6⌋ = 3
    ("PosterizeIncreasing", 10.0, False, 0),
    ("Posterize", 9.0, False, 3),
    # threshold 256 - ⌊25.6m⌋: lower (more pixels inverted) as m grows
    ("SolarizeIncreasing", 0.0, False, 256),
    ("SolarizeIncreasing", 9.0, False, 26),  # ⌊230.4⌋ = 230
    ("SolarizeIncreasing", 10.0, False, 0),
    ("Solarize", 9.0, False, 230),
    ("SolarizeAdd", 9.0, False, 99),
    ("SolarizeAdd", 10.0, False, 110),
    # enhance factors 1 ± 0.09m, at least 0.1
    ("ColorIncreasing", 9.0, False, 1.81),
    ("ContrastIncreasing", 9.0, True, 0.19),
    ("BrightnessIncreasing", 10.0, True, 0.1),
    ("SharpnessIncreasing", 0.0, True, 1.0),
    ("Brightness", 9.0, True, 1.72),  # plain: 0.18m + 0.1, unsigned
    ("AutoContrast", 9.0, False, None),
    ("Equalize", 9.0, True, None),
  ],
)
def test_magnitude_mappings_by_hand(name, magnitude, negate, expected):
  got = op_argument(name, magnitude, negate)
  if expected is None:
    assert got is None
  else:
    assert got == pytest.approx(expected, abs=1e-9)
    assert type(got) is type(expected), "posterize bits and solarize thresholds are integers"


def test_solarize_threshold_and_posterize_bits_decrease_with_magnitude():
  grid = np.linspace(0, 10, 41)
  thresholds = [op_argument("SolarizeIncreasing", m) for m in grid]
  bits = [op_argument("PosterizeIncreasing", m) for m in grid]
  assert all(np.diff(thresholds) <= 0) and thresholds[0] > thresholds[-1]
  assert all(np.diff(bits) <= 0) and bits[0] > bits[-1]


def test_unknown_op_raises():
  with pytest.raises(ValueError, match="unknown RandAugment op"):
    op_argument("Cutout", 9.0)


def test_pixel_ops_match_numpy_references():
  image = _image(9, 11, low=0, high=256)
  x = np.asarray(image).astype(np.int32)
  np.testing.assert_array_equal(apply_op(image, "Invert", None), 255 - x)
  np.testing.assert_array_equal(apply_op(image, "PosterizeIncreasing", 2), x & 0b11000000)
  np.testing.assert_array_equal(apply_op(image, "PosterizeIncreasing", 0), np.zeros_like(x))
  np.testing.assert_array_equal(
    apply_op(image, "SolarizeIncreasing", 100), np.where(x >= 100, 255 - x, x)
  )
  np.testing.assert_array_equal(apply_op(image, "SolarizeIncreasing", 256), x)
  np.testing.assert_array_equal(
    apply_op(image, "SolarizeAdd", 99), np.where(x < 128, np.minimum(x + 99, 255), x)
  )
  # image.py's fast enhancements stand in for PIL's ImageEnhance: the same pixels.
  for name, enhancer in [
    ("ColorIncreasing", ImageEnhance.Color),
    ("ContrastIncreasing", ImageEnhance.Contrast),
    ("BrightnessIncreasing", ImageEnhance.Brightness),
    ("SharpnessIncreasing", ImageEnhance.Sharpness),
  ]:
    for factor in (0.19, 1.81):
      np.testing.assert_array_equal(
        apply_op(image, name, factor), enhancer(image).enhance(factor), err_msg=name
      )


def test_translate_shifts_and_fills_with_the_imagenet_mean():
  assert randaugment.FILL == (124, 116, 104)
  image = _image(7, 10, low=0, high=256)
  x = np.asarray(image)
  # +0.3 of width 10 = 3 pixels: output column c reads input column c + 3 (content moves left).
  out = np.asarray(apply_op(image, "TranslateXRel", 0.3))
  np.testing.assert_array_equal(out[:, :7], x[:, 3:])
  np.testing.assert_array_equal(out[:, 7:], np.broadcast_to((124, 116, 104), (7, 3, 3)))
  # -2/7 of height 7 = -2 pixels: content moves down, the top two rows are fill.
  out = np.asarray(apply_op(image, "TranslateYRel", -2 / 7))
  np.testing.assert_array_equal(out[2:], x[:-2])
  np.testing.assert_array_equal(out[:2], np.broadcast_to((124, 116, 104), (2, 10, 3)))


def test_rotate_turns_counter_clockwise_about_the_centre():
  pixels = np.zeros((21, 21, 3), np.uint8)
  pixels[10, 14:18] = 255  # a bar to the right of the centre
  out = np.asarray(apply_op(Image.fromarray(pixels), "Rotate", 90.0))[..., 0]
  # Counter-clockwise by 90°: the bar (4 to 7 pixels right of the centre) now points up.
  assert out[3:7, 10].min() > 200 and out[10, 14:18].max() < 60
  rotated = np.asarray(apply_op(Image.fromarray(pixels), "Rotate", 30.0))
  corners = rotated[[0, 0, -1, -1], [0, -1, 0, -1]]  # uncovered by a 30° turn: fill
  np.testing.assert_array_equal(corners, np.broadcast_to((124, 116, 104), (4, 3)))


def test_seeded_generator_gives_the_same_augmentation():
  augment = RandAugment()
  image = _image(13, 15)
  outputs = [np.asarray(augment(image, np.random.default_rng([5, s]))) for s in range(8)]
  again = [np.asarray(augment(image, np.random.default_rng([5, s]))) for s in range(8)]
  for a, b in zip(outputs, again):
    np.testing.assert_array_equal(a, b)
  assert len({o.tobytes() for o in outputs}) > 4


def _record_draws(monkeypatch, augment, num_images):
  """(name, magnitude, negate) of every applied op over `num_images` calls (ops themselves off)."""
  draws = []
  real_argument = randaugment.op_argument

  def recording_argument(name, magnitude, negate=False):
    draws.append((name, magnitude, negate))
    return real_argument(name, magnitude, negate)

  monkeypatch.setattr(randaugment, "op_argument", recording_argument)
  monkeypatch.setattr(randaugment, "apply_op", lambda image, *_: image)
  rng = np.random.default_rng(0)
  image = _image(3, 3)
  for _ in range(num_images):
    augment(image, rng)
  return draws


def test_policy_draws_follow_rand_m9_mstd05_inc1(monkeypatch):
  n = 3000
  draws = _record_draws(monkeypatch, parse_policy("rand-m9-mstd0.5-inc1"), n)
  # 2 ops per image, each applied with probability 1/2: ~3000 applied (std ~39).
  assert abs(len(draws) - n) < 160, len(draws)
  names = np.array([d[0] for d in draws])
  counts = np.array([np.sum(names == op) for op in randaugment.INCREASING_OPS])
  assert set(names) == set(randaugment.INCREASING_OPS)
  # Uniform over 15 ops: ~200 each (std ~14).
  assert abs(counts - len(draws) / 15).max() < 60, counts
  magnitudes = np.array([d[1] for d in draws])
  assert abs(magnitudes.mean() - 9.0) < 0.05 and abs(magnitudes.std() - 0.5) < 0.05
  # Clipped at 10: P(N(9, 0.25) > 10) = P(Z > 2) ≈ 0.023 of the draws are exactly 10.
  assert magnitudes.max() == 10.0 and 0.01 < (magnitudes == 10.0).mean() < 0.04
  negated = np.array([d[2] for d in draws])
  signed = np.isin(names, sorted(randaugment.SIGNED_OPS))
  assert abs(negated[signed].mean() - 0.5) < 0.05
  assert not negated[~signed].any()


def test_magnitude_is_clipped_at_magnitude_max(monkeypatch):
  draws = _record_draws(monkeypatch, RandAugment(magnitude=9.8, magnitude_std=0.5), 400)
  magnitudes = np.array([d[1] for d in draws])
  # P(N(9.8, 0.25) > 10) = P(Z > 0.4) ≈ 0.34: those are exactly 10.
  assert magnitudes.max() == 10.0 and 0.25 < (magnitudes == 10.0).mean() < 0.43


def test_parse_policy():
  assert parse_policy("rand-m9-mstd0.5-inc1") == RandAugment(
    num_ops=2, magnitude=9.0, magnitude_std=0.5, magnitude_max=10.0, increasing=True
  )
  plain = parse_policy("rand-n3-m7")
  assert (plain.num_ops, plain.magnitude, plain.magnitude_std, plain.increasing) == (3, 7, 0, False)
  assert plain.ops == randaugment.PLAIN_OPS
  assert parse_policy("rand-inc1-mstd101").magnitude_std == math.inf  # timm: > 100 is uniform
  assert parse_policy("rand-m12-mmax15").magnitude_max == 15.0


@pytest.mark.parametrize(
  "policy, message",
  [
    ("", "start with 'rand'"),
    ("augmix-m9", "start with 'rand'"),
    ("rand-m9-w0", "bad section 'w0'"),
    ("rand-m", "bad section 'm'"),
    ("rand-m9-mstd", "bad section 'mstd'"),
    ("rand-m9-", "bad section ''"),
    ("rand-mx9", "bad section"),
    ("rand-n2.5", "n must be an integer"),
    ("rand-inc2", "inc must be 0 or 1"),
    ("rand-m9-m8", "given twice"),
    ("rand-m11", "magnitude must lie in"),
  ],
)
def test_parse_policy_rejects_malformed_strings(policy, message):
  with pytest.raises(ValueError, match=message):
    parse_policy(policy)


# ---------------------------------------------------------------------------------------------
# Random erasing.


def test_random_erasing_with_prob_0_changes_nothing():
  pixels = np.random.default_rng(0).standard_normal((12, 10, 3)).astype(np.float32)
  for seed in range(50):
    out = randaugment.random_erasing(pixels, np.random.default_rng(seed), prob=0.0)
    np.testing.assert_array_equal(out, pixels)


def test_random_erasing_fills_one_box_of_allowed_area_with_noise():
  height, width = 24, 32
  pixels = np.full((height, width, 3), 100.0, np.float32)  # N(0, 1) noise never hits 100
  original = pixels.copy()
  areas, noise = [], []
  for seed in range(60):
    out = randaugment.random_erasing(pixels, np.random.default_rng(seed), prob=1.0)
    assert out.dtype == np.float32
    changed = out != 100.0  # [H, W, 3]
    assert (changed == changed[..., :1]).all(), "all channels of a pixel are erased"
    changed = changed[..., 0]
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    h, w = rows.size, cols.size
    assert changed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all(), "one rectangle"
    assert changed.sum() == h * w and h < height and w < width
    # Before rounding to integers the sides were √(t·r) in [h - 1/2, h + 1/2] and √(t/r) in
    # [w - 1/2, w + 1/2], with area t in [0.02, 1/3] of the image and r = h/w in [0.3, 1/0.3].
    assert (h + 0.5) * (w + 0.5) >= 0.02 * height * width, (h, w)
    assert (h - 0.5) * (w - 0.5) <= height * width / 3, (h, w)
    assert (h + 0.5) / (w - 0.5) >= 0.3 and (h - 0.5) / (w + 0.5) <= 1 / 0.3, (h, w)
    areas.append(h * w)
    noise.append(out[changed].ravel())
  np.testing.assert_array_equal(pixels, original)  # the input is left as it was
  noise = np.concatenate(noise)
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
  # Mean area ~ (0.02 + 1/3)/2 of 768 ≈ 136 pixels.
  assert 100 < np.mean(areas) < 170, np.mean(areas)


def test_random_erasing_probability():
  pixels = np.zeros((16, 16, 3), np.float32)
  erased = [
    not np.array_equal(randaugment.random_erasing(pixels, np.random.default_rng(s)), pixels)
    for s in range(800)
  ]
  assert abs(np.mean(erased) - 0.25) < 0.05, np.mean(erased)  # std ~0.015


def test_random_erasing_bad_arguments():
  with pytest.raises(ValueError, match="prob"):
    randaugment.random_erasing(np.zeros((4, 4, 3)), np.random.default_rng(0), prob=1.5)
  with pytest.raises(ValueError, match=r"\[H, W, C\]"):
    randaugment.random_erasing(np.zeros((4, 4)), np.random.default_rng(0))
