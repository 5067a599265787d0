"""Tests for d2v_jax/masking.py: span masking against a numpy port of fairseq's masking.

The reference is fairseq's `compute_mask_indices` (`fairseq/data/data_utils.py`) with the
arguments data2vec audio uses: static lengths, overlap allowed, min_masks=1, require_same_masks,
no mask dropout (spec §1.2).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from d2v_jax import masking, sharding

PROB, LENGTH = 0.65, 10


def fairseq_compute_mask_indices(
  rng, padding_mask, mask_prob=PROB, mask_length=LENGTH, min_masks=1
):
  """fairseq `compute_mask_indices`, static type, no_overlap=False, require_same_masks=True."""
  bsz, all_sz = padding_mask.shape
  mask = np.full((bsz, all_sz), False)
  mask_idcs = []
  for i in range(bsz):
    sz = all_sz - int(padding_mask[i].sum())
    num_mask = max(min_masks, int(mask_prob * sz / float(mask_length) + rng.random()))
    min_len = mask_length
    if sz - min_len <= num_mask:
      min_len = sz - num_mask - 1
    mask_idc = rng.choice(sz - min_len, num_mask, replace=False)
    mask_idc = (mask_idc[:, None] + np.arange(mask_length)[None, :]).ravel()
    mask_idcs.append(np.unique(mask_idc[mask_idc < sz]))
  target_len = min(len(m) for m in mask_idcs)
  for i, mask_idc in enumerate(mask_idcs):
    if len(mask_idc) > target_len:
      mask_idc = rng.choice(mask_idc, target_len, replace=False)
    mask[i, mask_idc] = True
  return mask


def padding_for(valid, total):
  return np.arange(total)[None, :] >= np.asarray(valid)[:, None]


@functools.cache
def _draws(valid: tuple, total: int, num: int, seed: int = 0):
  """`num` jitted span masks (one per key) for a batch with `valid` frames per row."""
  pad = jnp.asarray(padding_for(valid, total))
  draw = jax.jit(jax.vmap(lambda k: masking.span_mask(k, pad, prob=PROB, length=LENGTH)))
  return np.asarray(draw(jax.random.split(jax.random.key(seed), num)))


def _runs(row):
  """(start, length) of every maximal run of True in a 1-D bool array."""
  padded = np.concatenate([[False], row, [False]]).astype(np.int8)
  edges = np.flatnonzero(np.diff(padded))
  return list(zip(edges[::2], edges[1::2] - edges[::2]))


def test_masked_count_matches_fairseq_with_same_count_subsampling():
  """Padded batch: every row is cut to the smallest row's count; mean and spread as fairseq's."""
  valid, total = (500, 420, 300, 460), 500
  masks = _draws(valid, total, 500)  # [draws, B, T]
  assert not (masks & padding_for(valid, total)[None]).any(), "masked frame in the padding"
  ours = masks.sum(-1)
  assert (ours == ours[:, :1]).all(), "rows of a batch must have the same masked count"
  rng = np.random.default_rng(0)
  pad = padding_for(valid, total)
  ref = np.array([fairseq_compute_mask_indices(rng, pad).sum(-1) for _ in range(1500)])
  assert (ref == ref[:, :1]).all()
  ours, ref = ours[:, 0].astype(float), ref[:, 0].astype(float)
  # Both ~148 frames with std ~11.5: standard error of the difference ~0.6 frames.
  assert abs(ours.mean() - ref.mean()) < 3.0, (ours.mean(), ref.mean())
  assert abs(ours.std() - ref.std()) < 2.5, (ours.std(), ref.std())
  # Sanity: about 1 - e^-0.65 ≈ 0.48 of the shortest row (300 frames) before subsampling.
  assert 0.4 < ours.mean() / 300 < 0.56


def test_single_row_matches_fairseq_per_position_and_count():
  """Batch of 1 (no subsampling): per-frame masking probability and count as fairseq's."""
  valid, total = (100,), 120
  ours = _draws(valid, total, 3000)[:, 0]  # [draws, T]
  rng = np.random.default_rng(1)
  pad = padding_for(valid, total)
  ref = np.concatenate([fairseq_compute_mask_indices(rng, pad) for _ in range(6000)])
  np.testing.assert_array_less(np.abs(ours.mean(0) - ref.mean(0)), 0.05)
  # fairseq quirk kept: starts lie in [0, V - length), so the last valid frame is never masked.
  assert not ours[:, valid[0] - 1].any() and not ref[:, valid[0] - 1].any()
  assert not ours[:, valid[0] :].any()
  assert abs(ours.sum(1).mean() - ref.sum(1).mean()) < 1.0
  # A row masks ~49 of 100 frames: far from all or nothing.
  assert 0.4 < ours.sum(1).mean() / valid[0] < 0.6


def test_runs_are_whole_spans_without_subsampling():
  """Batch of 1: each maximal masked run is a union of whole spans, so at least `length` long,
  and lies inside the valid frames (starts are drawn so that spans end before the padding)."""
  valid, total = (100,), 120
  for row in _draws(valid, total, 3000)[:500, 0]:
    runs = _runs(row)
    assert runs, "min_masks=1: at least one span"
    for start, length in runs:
      assert length >= LENGTH, (start, length)
      assert start + length <= valid[0] - 1


def test_keys_rows_and_short_rows():
  """Different keys differ, equal keys repeat, rows are independent, and a 12-frame row (one
  span of 10 from 2 candidate starts) bounds the batch's masked count."""
  valid = (300, 250, 12)
  pad = jnp.asarray(padding_for(valid, 300))
  draw = jax.jit(lambda k: masking.span_mask(k, pad, prob=PROB, length=LENGTH))
  a, b, a2 = (np.asarray(draw(jax.random.key(s))) for s in (10, 11, 10))
  np.testing.assert_array_equal(a, a2)
  assert (a != b).any()
  assert (a[0, :250] != a[1, :250]).any()
  for m in (a, b):
    counts = m.sum(1)
    assert (counts == counts[0]).all() and 9 <= counts[0] <= 10, counts
    assert not (m & np.asarray(pad)).any()


def test_sharded_batch_gives_the_same_mask_as_unsharded():
  """Threefry partitionable: the mask does not depend on how the batch is split over devices."""
  assert len(jax.devices()) == 4
  mesh = sharding.make_mesh()
  valid = (500, 320, 480, 410, 500, 260, 390, 470)
  pad = padding_for(valid, 500)
  fn = functools.partial(masking.span_mask, prob=PROB, length=LENGTH)
  key = jax.random.key(5)
  sharded = jax.jit(
    fn,
    in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
    out_shardings=sharding.batch_sharded(mesh),
  )(key, sharding.put_batch(pad, mesh))
  assert sharded.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
  assert len(sharded.addressable_shards) == 4
  unsharded = jax.jit(fn)(
    jax.device_put(key, jax.devices()[0]), jax.device_put(pad, jax.devices()[0])
  )
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(unsharded))


@pytest.mark.parametrize("count", [0, 3, 7])
def test_subsample_to_count_keeps_a_subset(count):
  rng = np.random.default_rng(count)
  mask = rng.random((6, 40)) < 0.4
  mask[:, :7] = True  # at least 7 per row
  out = np.asarray(masking.subsample_to_count(jax.random.key(count), jnp.asarray(mask), count))
  assert (out.sum(1) == count).all()
  assert not (out & ~mask).any()
