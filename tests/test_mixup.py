"""Tests for d2v_jax/mixup.py: batch mixup/cutmix with label smoothing (timm `Mixup`, "batch").

Constructed batches make the mixing readable: row i of `_planes` is the constant i, so a mixed
row shows lam directly (mixup: lam·i + (1 - lam)·(B-1-i)) and a cut row shows which pixels came
from the partner. lam is read back from the targets independently, and the two must agree.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax import mixup
from tests.helpers import fast_jit

B, H, W, C, K = 4, 7, 9, 2, 6  # odd image sides exercise the box's clipping and odd cuts
SMOOTH = 0.1
OFF, ON = SMOOTH / K, 1 - SMOOTH + SMOOTH / K
LABELS = np.array([0, 3, 1, 5], np.int32)  # row and partner labels all differ


def _planes(batch=B, height=H, width=W):
  """float32[batch, height, width, C]: row i is the constant i."""
  return np.broadcast_to(
    np.arange(batch, dtype=np.float32)[:, None, None, None], (batch, height, width, C)
  ).copy()


@functools.cache
def _mixer(**hparams):
  hparams = {"label_smoothing": SMOOTH, **hparams}
  return fast_jit(lambda key, x, y: mixup.mix_batch(key, x, y, K, **hparams))


@functools.cache
def _many(num_keys, batch, height, width, **hparams):
  """vmap of `mix_batch` over `num_keys` keys of one constructed batch: (images, targets)."""
  x, y = jnp.asarray(_planes(batch, height, width)), jnp.arange(batch) % K
  mix = functools.partial(mixup.mix_batch, num_classes=K, **hparams)
  keys = jax.random.split(jax.random.key(7), num_keys)
  images, targets = fast_jit(jax.vmap(lambda k: mix(k, x, y)))(keys)
  return np.asarray(images), np.asarray(targets)


def _lam_from_targets(targets):
  """lam of every row, from the weight of its own label (labels of row and partner differ)."""
  own = np.asarray(targets)[np.arange(B), LABELS]
  return (own - OFF) / (ON - OFF)


def test_smooth_one_hot_values_by_hand():
  got = np.asarray(mixup.smooth_one_hot(jnp.array([2, 0]), 4, 0.1))
  # off = 0.1 / 4 = 0.025, on = 1 - 0.1 + 0.025 = 0.925
  np.testing.assert_allclose(got, [[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]])
  np.testing.assert_array_equal(mixup.smooth_one_hot(jnp.array([1]), 3, 0.0), [[0, 1, 0]])


@pytest.mark.parametrize(
  "hparams",
  [dict(mixup_alpha=0.0, cutmix_alpha=0.0), dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0)],
)
def test_off_leaves_images_and_only_smooths(hparams):
  x = np.random.default_rng(0).standard_normal((B, H, W, C)).astype(np.float32)
  images, targets = _mixer(**hparams)(jax.random.key(0), x, LABELS)
  np.testing.assert_array_equal(images, x)
  np.testing.assert_allclose(targets, mixup.smooth_one_hot(LABELS, K, SMOOTH))


def test_mixup_blends_with_the_reversed_batch_at_the_targets_lam():
  mix = _mixer(mixup_alpha=0.8, cutmix_alpha=0.0)
  x = np.random.default_rng(0).standard_normal((B, H, W, C)).astype(np.float32)
  lams = []
  for seed in range(4):
    key = jax.random.key(seed)
    planes, targets = mix(key, _planes(), LABELS)
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)
    lam = _lam_from_targets(targets)
    assert np.ptp(lam) < 1e-6, "one lam for the whole batch"
    lam = lam[0]
    # Row 0 = lam·0 + (1 - lam)·(B - 1): lam read from the pixels agrees with the targets'.
    np.testing.assert_allclose(1 - np.asarray(planes)[0] / (B - 1), lam, atol=1e-6)
    expected = lam * _planes() + (1 - lam) * _planes()[::-1]
    np.testing.assert_allclose(planes, expected, atol=1e-5)
    # The same key on other images: the same lam, partner = the reversed batch.
    images, _ = mix(key, x, LABELS)
    np.testing.assert_allclose(images, lam * x + (1 - lam) * x[::-1], atol=1e-5)
    lams.append(lam)
  assert len(set(np.round(lams, 6))) == 4 and 0 < min(lams) and max(lams) < 1


def test_cutmix_partner_pixels_share_equals_one_minus_lam():
  mix = _mixer(mixup_alpha=0.0, cutmix_alpha=1.0)
  cut_sizes = set()
  for seed in range(12):
    images, targets = mix(jax.random.key(seed), _planes(), LABELS)
    images, targets = np.asarray(images), np.asarray(targets)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    lam = _lam_from_targets(targets)
    from_partner = images == (B - 1 - np.arange(B))[:, None, None, None]  # [B, H, W, C]
    kept = images == np.arange(B)[:, None, None, None]
    assert (from_partner | kept).all(), "cutmix pastes pixels, it does not blend"
    cut = from_partner[..., 0]  # [B, H, W]
    assert (cut == cut[:1]).all() and (from_partner == cut[..., None]).all(), "one box, all C"
    np.testing.assert_allclose(cut.mean(axis=(1, 2)), 1 - lam, atol=1e-6)
    rows, cols = np.flatnonzero(cut[0].any(1)), np.flatnonzero(cut[0].any(0))
    if rows.size:  # the pasted pixels fill their bounding rectangle
      assert cut[0][rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
      cut_sizes.add((rows.size, cols.size))
  assert len(cut_sizes) > 2, cut_sizes


@pytest.mark.parametrize(
  "lam, center, expected",
  [
    # H=10, W=8, lam 0.75: √0.25 = 0.5, cuts ⌊5⌋ = 5 and 4, halves 2 and 2.
    (0.75, (5, 4), (3, 7, 2, 6)),
    (0.75, (0, 7), (0, 2, 5, 8)),  # clipped at the top and the right
    # lam 0.19: √0.81 = 0.9, cuts ⌊9⌋ = 9 and ⌊7.2⌋ = 7, halves 4 and 3.
    (0.19, (9, 0), (5, 10, 0, 3)),
    (0.999, (5, 4), (5, 5, 4, 4)),  # cut ⌊0.316⌋ = 0: an empty box
  ],
)
def test_cutmix_bounds_by_hand(lam, center, expected):
  got = mixup.cutmix_bounds(jnp.float32(lam), *center, 10, 8)
  assert tuple(int(v) for v in got) == expected
  mask = np.asarray(mixup.box_mask(got, 10, 8))
  top, bottom, left, right = expected
  reference = np.zeros((10, 8), bool)
  reference[top:bottom, left:right] = True
  np.testing.assert_array_equal(mask, reference)


def test_choice_between_mixup_cutmix_and_none_follows_prob_and_switch_prob():
  """prob 0.6, switch 0.5: blended 0.3, pasted 0.3 (less the rare empty boxes), unchanged 0.4."""
  n = 1000
  images, targets = _many(
    n, 2, 16, 16, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.0, prob=0.6, switch_prob=0.5
  )
  row0 = images[:, 0, :, :, 0]  # [n, 16, 16]; row 0 is 0, its partner 1
  blended = ((row0 > 0) & (row0 < 1)).all(axis=(1, 2))
  pasted = ((row0 == 0) | (row0 == 1)).all(axis=(1, 2)) & (row0 == 1).any(axis=(1, 2))
  unchanged = (row0 == 0).all(axis=(1, 2))
  assert (blended | pasted | unchanged).all()
  # Standard errors ~0.015; an empty box (lam > 63/64) has probability ~1.6% under Beta(1, 1).
  assert abs(blended.mean() - 0.3) < 0.05, blended.mean()
  assert abs(pasted.mean() - 0.3 * 0.984) < 0.05, pasted.mean()
  assert abs(unchanged.mean() - 0.4) < 0.05, unchanged.mean()
  # lam of the blended draws ~ Beta(0.8, 0.8): mean 1/2, variance 1/(4(2·0.8 + 1)) = 0.0962
  # (Beta(1, 1) would give 0.0833); standard error of the variance ~0.004 on ~300 draws.
  lam = targets[blended, 0, 0]
  assert abs(lam.mean() - 0.5) < 0.05, lam.mean()
  assert abs(lam.var() - 1 / 10.4) < 0.011, lam.var()
  # Cutmix lam (pixels kept) matches the targets, row by row.
  np.testing.assert_allclose(targets[pasted, 0, 0], (row0[pasted] == 0).mean(axis=(1, 2)))


def test_deterministic_for_a_key():
  x = np.random.default_rng(1).standard_normal((B, H, W, C)).astype(np.float32)
  mix = _mixer(mixup_alpha=0.8, cutmix_alpha=1.0)
  first, again = mix(jax.random.key(3), x, LABELS), mix(jax.random.key(3), x, LABELS)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  outputs = [np.asarray(mix(jax.random.key(s), x, LABELS)[0]) for s in range(4, 8)]
  assert any(not np.array_equal(o, outputs[0]) for o in outputs[1:])


def test_keeps_bfloat16_images():
  x = jnp.asarray(_planes(), jnp.bfloat16)
  for hparams in (dict(mixup_alpha=0.8, cutmix_alpha=0.0), dict(mixup_alpha=0.0, cutmix_alpha=1.0)):
    images, targets = _mixer(**hparams)(jax.random.key(0), x, LABELS)
    assert images.dtype == jnp.bfloat16 and targets.dtype == jnp.float32


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(mixup_alpha=-1.0), "mixup_alpha"),
    (dict(cutmix_alpha=-0.5), "cutmix_alpha"),
    (dict(prob=1.5), "prob"),
    (dict(switch_prob=-0.1), "switch_prob"),
    (dict(label_smoothing=2.0), "label_smoothing"),
    (dict(num_classes=0), "num_classes"),
    (dict(labels=np.zeros(3, np.int32)), "labels"),
    (dict(images=np.zeros((B, H, W), np.float32)), "images"),
  ],
)
def test_bad_arguments_raise(overrides, message):
  args = dict(
    images=_planes(),
    labels=LABELS,
    num_classes=K,
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    label_smoothing=SMOOTH,
  )
  args.update(overrides)
  with pytest.raises(ValueError, match=message):
    mixup.mix_batch(jax.random.key(0), **args)
