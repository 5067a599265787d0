"""Tests for d2v_jax/masking_v2.py against numpy ports of fairseq's data2vec 2.0 masking.

References (spec §2.2): `compute_block_mask_1d` / `compute_block_mask_2d` in
`fairseq/data/data_utils.py` with the v2 arguments (overlapping blocks, require_same_masks, no
adjacent expansion, no mask dropout), and `make_maskinfo` in
`examples/data2vec/models/modalities/base.py`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from d2v_jax import masking_v2, sharding

AUDIO = dict(block=5, ratio=0.5, adjust=0.05)  # audio base
IMAGE = dict(block=3, ratio=0.8, adjust=0.07, inverse=True)  # image base
TEXT_RATIO = 0.48
LENGTH_1D, GRID, LENGTH_TEXT = 100, (14, 14), 64
ROWS = 4  # rows per key
SHAPES = {"audio": ((LENGTH_1D,), AUDIO), "image": (GRID, IMAGE)}


def fairseq_block_marks(centres, shape, block):
  """fairseq's marks from flat centres [n]: per-axis offsets k − ⌊B/2⌋, each index clamped."""
  marks = np.zeros(shape, bool)
  coords = np.unravel_index(centres, shape)
  offset = block // 2
  for deltas in np.ndindex(*(block,) * len(shape)):
    idx = tuple(
      np.clip(c + d - offset, 0, n - 1) for c, d, n in zip(coords, deltas, shape, strict=True)
    )
    marks[idx] = True
  return marks.ravel()


def fairseq_block_mask(rng, rows, shape, *, block, ratio, adjust, inverse=False):
  """fairseq `compute_block_mask_{1d,2d}` (v2 arguments) in numpy: bool[rows, L], True = masked."""
  size = int(np.prod(shape))
  p = 1 - ratio if inverse else ratio
  num_centres = int(size * ((p + adjust) / block ** len(shape)))
  target = int(size * p)
  out = []
  for _ in range(rows):
    m = fairseq_block_marks(rng.integers(0, size, num_centres), shape, block)
    n = int(m.sum())
    if n > target:  # torch.multinomial over 0/1 weights: a uniform subset
      m[rng.choice(np.flatnonzero(m), n - target, replace=False)] = False
    elif n < target:
      m[rng.choice(np.flatnonzero(~m), target - n, replace=False)] = True
    out.append(~m if inverse else m)
  return np.stack(out)


def _runs(row):
  """Number of maximal runs of True in a 1-D bool array."""
  return int(np.sum(np.diff(np.concatenate([[0], row.astype(np.int8)])) == 1))


def _keys(num, seed):
  return jax.random.split(jax.random.key(seed), num)


def _as_numpy(tree):
  return jax.tree.map(np.asarray, tree)


# One jit per kind, cached, always on the same NUM keys: ([keys, ROWS, ...] arrays).
NUM = 500


@functools.cache
def _fn(kind):
  """Jitted, vmapped over keys: (centres, marks, adjusted) of `_block_marking` (block masks
  only) and the public V2Mask, from the same key."""
  if kind == "text":
    return jax.jit(
      jax.vmap(lambda k: (None, masking_v2.random_mask(k, ROWS, LENGTH_TEXT, ratio=TEXT_RATIO)))
    )
  shape, kw = SHAPES[kind]
  public = masking_v2.block_mask_1d if len(shape) == 1 else masking_v2.block_mask_2d
  size = shape[0] if len(shape) == 1 else shape

  def draw(k):
    parts = masking_v2._block_marking(k, ROWS, shape, **(dict(inverse=False) | kw))
    return parts, public(k, ROWS, size, **kw)

  return jax.jit(jax.vmap(draw))


@functools.cache
def _draw(kind, seed=0):
  return _as_numpy(_fn(kind)(_keys(NUM, seed)))


def test_counts_follow_fairseq_formulas():
  # Image base, spec §2.2: n = int(196·(0.2 + 0.07)/9) = 5 centres, int(196·0.2) = 39 kept.
  assert masking_v2.block_mask_counts(196, dims=2, **IMAGE) == (5, 39)
  assert masking_v2.num_kept(196, 0.8, inverse=True) == 39
  # Audio base on a 20 s crop (999 frames): int(999·0.55/5) = 109 centres, 499 masked.
  assert masking_v2.block_mask_counts(999, dims=1, inverse=False, **AUDIO) == (109, 499)
  assert masking_v2.num_kept(999, 0.5, inverse=False) == 500
  # Text base: MAE's len_keep = int(512·0.52) = 266 (not 512 − int(512·0.48) = 267).
  assert masking_v2.num_kept(512, TEXT_RATIO, inverse=True) == 266
  with pytest.raises(ValueError):
    masking_v2.num_kept(10, 1.0, inverse=False)
  with pytest.raises(ValueError):
    masking_v2.block_mask_counts(10, dims=1, block=0, ratio=0.5, adjust=0.0, inverse=False)


def test_image_base_example_has_5_centres_39_kept_157_masked():
  (centres, _, adjusted), m = _draw("image")
  assert centres.shape[-1] == 5
  assert (m.mask.sum(-1) == 157).all() and m.keep_ids.shape[-1] == 39
  assert m.masked_ids.shape[-1] == 157
  # Inverse: the adjusted marks are the kept set.
  np.testing.assert_array_equal(m.mask, ~adjusted)


@pytest.mark.parametrize("kind", ["audio", "image"])
def test_marks_are_fairseq_blocks_then_exactly_adjusted(kind):
  """Before the adjustment the marks are exactly fairseq's clamped blocks around the drawn
  centres; the adjustment only removes marks (too many) or only adds them (too few)."""
  shape, kw = SHAPES[kind]
  (centres, marks, adjusted), m = _draw(kind)
  size = int(np.prod(shape))
  _, target = masking_v2.block_mask_counts(size, dims=len(shape), **(dict(inverse=False) | kw))
  centres, marks, adjusted = (x.reshape(-1, x.shape[-1]) for x in (centres, marks, adjusted))
  assert (centres >= 0).all() and (centres < size).all()
  for c, pre in zip(centres[:400], marks):
    np.testing.assert_array_equal(pre, fairseq_block_marks(c, shape, kw["block"]))
  assert (adjusted.sum(-1) == target).all()
  over = marks.sum(-1) >= target
  assert not (adjusted & ~marks)[over].any()  # only unmarked
  assert not (marks & ~adjusted)[~over].any()  # only marked
  assert over.any() and (~over).any(), "both branches occur"
  inverse = kw.get("inverse", False)
  np.testing.assert_array_equal(m.mask.reshape(-1, size), ~adjusted if inverse else adjusted)


def test_exact_counts_for_many_keys():
  (_, audio), (_, image), (_, text) = _draw("audio"), _draw("image"), _draw("text")
  assert (audio.mask.sum(-1) == int(LENGTH_1D * 0.5)).all()
  assert (image.mask.sum(-1) == 196 - 39).all()
  assert (text.mask.sum(-1) == LENGTH_TEXT - int(LENGTH_TEXT * (1 - TEXT_RATIO))).all()
  for m in (audio, image, text):
    assert m.keep_ids.shape[-1] + m.masked_ids.shape[-1] == m.mask.shape[-1]
    assert (np.diff(m.keep_ids, axis=-1) > 0).all() and (np.diff(m.masked_ids, axis=-1) > 0).all()


def _structure(masks, shape):
  """Per row: the number of masked runs (1D) or of masked horizontal neighbour pairs (2D)."""
  if len(shape) == 1:
    return np.array([_runs(r) for r in masks], float)
  grid = masks.reshape(-1, *shape)
  return (grid[:, :, 1:] & grid[:, :, :-1]).sum((1, 2)).astype(float)


@pytest.mark.parametrize("kind", ["audio", "image"])
def test_law_matches_fairseq_port(kind):
  """Per-position mask rate (borders included: blocks are cut there) and block structure, ours
  against the numpy port of fairseq."""
  shape, kw = SHAPES[kind]
  ours = _draw(kind)[1].mask.reshape(-1, int(np.prod(shape)))  # [2000, L]
  ref = fairseq_block_mask(np.random.default_rng(0), 2000, shape, **kw)
  # Standard error of a difference of two rates <= 0.016; max over <= 196 positions < 4 SE.
  np.testing.assert_array_less(np.abs(ours.mean(0) - ref.mean(0)), 0.065)
  a, b = (_structure(m, shape) for m in (ours, ref))
  assert abs(a.mean() - b.mean()) < 5 * np.hypot(a.std(), b.std()) / np.sqrt(len(a))


def _chi2_uniform(m):
  """Chi-square of the per-column counts of bool[n, P] against their common mean."""
  n, rate = len(m), m.mean()
  return np.sum((m.sum(0) - n * rate) ** 2 / (n * rate * (1 - rate)))


def test_interior_rate_is_uniform_and_blocks_are_visible():
  """Away from the borders every position is equally likely masked (chi-square, loose: about
  one per position expected), and masks are blocky: far fewer runs than independent positions.
  (Near the borders blocks are cut, so there the rates differ, as in fairseq.)"""
  for kind, margin in (("audio", 4), ("image", 2)):
    shape, _ = SHAPES[kind]
    m = _draw(kind)[1].mask.reshape(-1, *shape)
    inner = m[(slice(None),) + (slice(margin, -margin),) * len(shape)].reshape(len(m), -1)
    assert _chi2_uniform(inner) < 3 * inner.shape[1], (kind, _chi2_uniform(inner))
  runs = np.mean([_runs(r) for r in _draw("audio")[1].mask.reshape(-1, LENGTH_1D)])
  # Independent positions at 0.5: ~25 runs in 100; 11 blocks of 5, overlapping: far fewer.
  assert runs < 14, runs


def test_random_mask_is_uniform_and_can_mask_any_position():
  m = _draw("text")[1].mask.reshape(-1, LENGTH_TEXT)  # [2000, T]
  assert _chi2_uniform(m) < 3 * LENGTH_TEXT, _chi2_uniform(m)
  # fairseq's random_masking ignores specials and padding: <s> at 0 and the last position too.
  assert m[:, 0].any() and m[:, -1].any()
  # Positions are masked independently of their neighbours (no blocks): ~T/4 runs.
  assert np.mean([_runs(r) for r in m[:200]]) > 12


def test_keys_repeat_and_differ():
  for kind in ("audio", "image", "text"):
    m = _draw(kind)[1]
    assert (m.mask[0] != m.mask[1]).any()  # different keys
    assert (m.mask[0, 0] != m.mask[0, 1]).any()  # different rows
    again = _fn(kind)(_keys(NUM, 0))[1]  # the same keys
    np.testing.assert_array_equal(np.asarray(again.mask), m.mask)


def test_ids_are_fairseq_make_maskinfo_and_round_trip():
  for kind in ("audio", "image", "text"):
    m = _draw(kind)[1]
    mask = m.mask.reshape(-1, m.mask.shape[-1])
    keep, masked, restore = (
      x.reshape(-1, x.shape[-1]) for x in (m.keep_ids, m.masked_ids, m.restore_ids)
    )
    shuffle = np.argsort(mask.astype(np.uint8), axis=1, kind="stable")  # make_maskinfo
    k = keep.shape[-1]
    np.testing.assert_array_equal(keep, shuffle[:, :k])
    np.testing.assert_array_equal(masked, shuffle[:, k:])
    np.testing.assert_array_equal(restore, np.argsort(shuffle, axis=1))
    assert not np.take_along_axis(mask, keep, 1).any()
    assert np.take_along_axis(mask, masked, 1).all()

  m = jax.tree.map(lambda x: x[0], _draw("image")[1])
  x = jnp.arange(ROWS * 196 * 3, dtype=jnp.float32).reshape(ROWS, 196, 3)
  kept = masking_v2.gather(x, m.keep_ids)  # [B, K, 3]
  hidden = masking_v2.gather(x, m.masked_ids)
  assert kept.shape == (ROWS, 39, 3) and hidden.shape == (ROWS, 157, 3)
  np.testing.assert_array_equal(masking_v2.unshuffle(kept, hidden, m.restore_ids), x)
  # Decoder input: kept features then fresh values at masked slots, back in place.
  filled = masking_v2.unshuffle(kept, jnp.full_like(hidden, -1.0), m.restore_ids)
  np.testing.assert_array_equal(filled, jnp.where(m.mask[..., None], -1.0, x))


def test_from_mask_of_a_given_mask():
  mask = jnp.array([[True, False, False, True, False], [False, False, True, True, False]])
  m = masking_v2.from_mask(mask, 3)
  np.testing.assert_array_equal(m.keep_ids, [[1, 2, 4], [0, 1, 4]])
  np.testing.assert_array_equal(m.masked_ids, [[0, 3], [2, 3]])
  np.testing.assert_array_equal(m.restore_ids, [[3, 0, 1, 4, 2], [0, 1, 3, 4, 2]])
  assert m.num_kept == 3


def test_multi_mask_is_sample_major_and_distinct():
  batch, clones = 3, 4
  kw = dict(grid=GRID, **IMAGE)
  key = jax.random.key(7)
  multi = jax.jit(
    lambda k: masking_v2.multi_mask(k, masking_v2.block_mask_2d, batch, clones, **kw)
  )(key)
  assert multi.mask.shape == (batch * clones, 196) and multi.keep_ids.shape == (12, 39)
  # Row i·M + j is clone j of sample i: sample i's masks come from its own key.
  single = jax.jit(lambda k: masking_v2.block_mask_2d(k, clones, **kw))
  for i, k in enumerate(jax.random.split(key, batch)):
    own = single(k)
    np.testing.assert_array_equal(multi.mask[i * clones : (i + 1) * clones], own.mask)
    np.testing.assert_array_equal(multi.restore_ids[i * clones : (i + 1) * clones], own.restore_ids)
  assert len({bytes(np.asarray(r)) for r in multi.mask}) == batch * clones
  # Inputs paired with it: repeat_interleave.
  x = jnp.arange(batch * 2).reshape(batch, 2)
  np.testing.assert_array_equal(masking_v2.clone_batch(x, clones), np.repeat(x, clones, axis=0))


def test_jit_vmap_without_host_transfers():
  """Static shapes under jit and vmap, and no host round trip once inputs are on the device."""

  @jax.jit
  def step(k, x):  # x [2, 50, 8] -> 3 masks per sample and the student's kept frames
    m = masking_v2.multi_mask(k, masking_v2.block_mask_1d, 2, 3, length=50, **AUDIO)
    return m, masking_v2.gather(masking_v2.clone_batch(x, 3), m.keep_ids)

  key = jax.device_put(jax.random.key(1))
  x = jax.device_put(jnp.ones((2, 50, 8)))
  with jax.transfer_guard("disallow"):
    m, kept = step(key, x)
    texts = jax.jit(
      jax.vmap(lambda k: masking_v2.random_mask(k, 2, 16, ratio=TEXT_RATIO)),
    )(jax.random.split(key, 5))
    jax.block_until_ready((m, kept, texts))
  assert m.mask.shape == (6, 50) and m.keep_ids.shape == (6, 25) and kept.shape == (6, 25, 8)
  assert texts.keep_ids.shape == (5, 2, 8) and texts.restore_ids.dtype == jnp.int32


def test_sharded_batch_gives_the_same_mask_as_unsharded():
  """Batch-leading draws with threefry partitionable: the masks do not depend on sharding."""
  mesh = sharding.make_mesh()
  fn = functools.partial(masking_v2.block_mask_2d, batch=8, grid=GRID, **IMAGE)
  key = jax.random.key(3)
  sharded = jax.jit(fn, out_shardings=sharding.batch_sharded(mesh))(key)
  assert sharded.mask.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
  unsharded = jax.jit(fn)(jax.device_put(key, jax.devices()[0]))
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(unsharded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
