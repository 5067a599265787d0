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


# --- BEiT block masking (vision, spec §1.2) ---------------------------------------------------
#
# Reference: BEiT's `MaskingGenerator` (`masking_generator.py`, also data2vec_vision's), ported to
# numpy. With give_up=False it keeps calling `_mask` after a call whose 10 attempts all fail
# instead of stopping short, which is the law `block_mask` implements.


def beit_masking_generator(rng, grid, num_masking_patches, min_num_patches, give_up=True):
  """One BEiT mask bool[H, W] and its accepted blocks [(top, left, h, w)]."""
  height, width = grid
  max_num_patches = num_masking_patches
  log_aspect_ratio = (np.log(0.3), np.log(1 / 0.3))
  mask = np.zeros((height, width), dtype=int)
  mask_count, blocks = 0, []
  while mask_count < num_masking_patches:
    max_mask_patches = min(num_masking_patches - mask_count, max_num_patches)
    delta = 0
    for _ in range(10):
      # random.uniform(a, b) = a + (b - a)·random(); random.randint(a, b) includes b.
      target_area = min_num_patches + (max_mask_patches - min_num_patches) * rng.random()
      aspect_ratio = np.exp(log_aspect_ratio[0] + np.diff(log_aspect_ratio)[0] * rng.random())
      h = int(round(np.sqrt(target_area * aspect_ratio)))
      w = int(round(np.sqrt(target_area / aspect_ratio)))
      if w < width and h < height:
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        num_masked = mask[top : top + h, left : left + w].sum()
        if 0 < h * w - num_masked <= max_mask_patches:
          delta += h * w - num_masked
          mask[top : top + h, left : left + w] = 1
          blocks.append((top, left, h, w))
      if delta > 0:
        break
    if delta == 0 and give_up:
      break
    mask_count += delta
  return mask.astype(bool), blocks


@functools.cache
def _beit_reference(num, give_up, seed):
  rng = np.random.default_rng(seed)
  draws = [beit_masking_generator(rng, (14, 14), 120, 16, give_up) for _ in range(num)]
  return np.stack([m for m, _ in draws]), [b for _, b in draws]


@functools.cache
def _block_draws(grid, num_masked, min_block, batch, num_keys, seed=0, **kw):
  """`num_keys` jitted block masks of `batch` rows each, bool[num_keys, batch, H·W]."""
  fn = functools.partial(
    masking.block_mask,
    batch_size=batch,
    grid=grid,
    num_masked=num_masked,
    min_block=min_block,
    **kw,
  )
  keys = jax.random.split(jax.random.key(seed), num_keys)
  return np.asarray(jax.jit(jax.vmap(fn))(keys))


def _components(masks):
  """Number of 4-connected masked regions of each bool[N, H, W] mask."""
  from scipy import ndimage  # installed with scikit-learn

  cross = np.zeros((3, 3, 3), bool)
  cross[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]  # no links between masks
  labels, _ = ndimage.label(masks, structure=cross)
  # Labels are numbered 1, 2, ... in raster order, so mask i holds those above every earlier one.
  highest = np.maximum.accumulate(labels.reshape(len(masks), -1).max(1))
  return np.diff(highest, prepend=0)


def _block_stats(masks):
  """Shape statistics of bool[N, H, W] masks."""
  perimeter = (masks[:, 1:] != masks[:, :-1]).sum((1, 2)) + (
    masks[:, :, 1:] != masks[:, :, :-1]
  ).sum((1, 2))
  freq = masks.mean(0)  # [H, W] per-patch masking frequency
  return {
    "perimeter": perimeter,  # masked/unmasked neighbour pairs
    "components": _components(masks),
    "rows": freq.mean(1),  # [H]
    "cols": freq.mean(0),  # [W]
    "corners": freq[[0, 0, -1, -1], [0, -1, 0, -1]].mean(),
  }


def _mismatches_with_beit(masks, ref):
  """How masks bool[N, H, W] differ from BEiT masks `ref` beyond sampling noise; [] if not.

  Tolerances are ~5 standard errors for N ≈ 2000 vs 3000 draws (perimeter sd ≈ 7.5, number of
  regions sd ≈ 0.4, one row's masked fraction sd ≈ 0.35). Uniformly random patches (perimeter
  ≈ 174, 9 regions, flat 0.61 frequency) or a block mask whose top-left excludes the last row
  (`randint` read as exclusive: row 13 never masked) are far outside them.
  """
  ours, theirs = _block_stats(masks), _block_stats(ref)
  out = []
  for name, tol in (("perimeter", 1.2), ("components", 0.06)):
    diff = ours[name].mean() - theirs[name].mean()
    if abs(diff) > tol:
      out.append(f"mean {name} {ours[name].mean():.3f} vs BEiT {theirs[name].mean():.3f}")
  if abs(ours["perimeter"].std() - theirs["perimeter"].std()) > 1.0:
    out.append(f"perimeter sd {ours['perimeter'].std():.2f} vs {theirs['perimeter'].std():.2f}")
  for name in ("rows", "cols"):
    diff = np.abs(ours[name] - theirs[name]).max()
    if diff > 0.045:
      out.append(f"{name} masking frequency off by up to {diff:.3f}")
  if abs(ours["corners"] - theirs["corners"]) > 0.03:
    out.append(f"corner frequency {ours['corners']:.3f} vs {theirs['corners']:.3f}")
  return out


@pytest.mark.parametrize(
  "grid,num_masked,min_block,batch,num_keys",
  [((14, 14), 120, 16, 256, 8), ((8, 8), 39, 5, 5, 4), ((6, 10), 37, 5, 32, 4)],
)
def test_block_mask_masks_exactly_num_masked(grid, num_masked, min_block, batch, num_keys):
  """Exact count in every row; rows and keys give different masks (a few repeats are expected
  at 14×14: a single 10×12 block is a whole mask)."""
  draws = _block_draws(grid, num_masked, min_block, batch, num_keys)  # [keys, B, H·W]
  assert draws.shape == (num_keys, batch, grid[0] * grid[1]) and draws.dtype == bool
  assert (draws.sum(-1) == num_masked).all(), np.unique(draws.sum(-1))
  distinct = {row.tobytes() for row in draws.reshape(-1, draws.shape[-1])}
  assert len(distinct) >= 0.98 * num_keys * batch
  for rows in draws:
    assert len({row.tobytes() for row in rows}) > 1


def test_block_mask_jit_matches_vmap_over_keys():
  """A jitted call with one key gives that key's row of the vmapped draws; a key repeats."""
  grid, num_masked, min_block, batch = (8, 8), 39, 5, 5
  fn = jax.jit(
    functools.partial(
      masking.block_mask, batch_size=batch, grid=grid, num_masked=num_masked, min_block=min_block
    )
  )
  keys = jax.random.split(jax.random.key(0), 4)
  draws = _block_draws(grid, num_masked, min_block, batch, 4)
  np.testing.assert_array_equal(np.asarray(fn(keys[2])), draws[2])
  np.testing.assert_array_equal(np.asarray(fn(keys[2])), np.asarray(fn(keys[2])))


def test_block_mask_sizes_scale_the_224_numbers():
  assert masking.block_mask_sizes(196) == (120, 16)
  assert masking.block_mask_sizes(64) == (39, 5)  # 8×8
  assert masking.block_mask_sizes(60) == (37, 5)  # 6×10
  assert masking.block_mask_sizes(256) == (157, 21)  # 16×16
  assert masking.block_mask_sizes(4) == (2, 1)  # min_block at least 1


def test_block_mask_matches_beit_generator_statistics():
  """14×14, 120 patches, blocks ≥ 16: mask shapes as BEiT's, and as BEiT's without the give-up.

  BEiT stops when 10 proposals in a row fail (~30% of masks end short, mean 119.5); ours keeps
  proposing, as the give_up=False port does.
  """
  ours = _block_draws((14, 14), 120, 16, 256, 8).reshape(-1, 14, 14)  # 2048 masks
  beit, _ = _beit_reference(3000, True, 0)
  beit_on, _ = _beit_reference(3000, False, 1)
  assert 119.3 < beit.sum((1, 2)).mean() < 119.8 and (beit.sum((1, 2)) < 120).mean() > 0.2
  assert (beit_on.sum((1, 2)) == 120).all()
  assert _mismatches_with_beit(ours, beit_on) == []
  assert _mismatches_with_beit(ours, beit) == []
  # The comparison can fail: uniformly random patches, and BEiT masks moved one patch up-left
  # (the last row and column never masked, as if BEiT's inclusive randint were exclusive).
  rng = np.random.default_rng(2)
  uniform = np.stack([rng.permutation(196) < 120 for _ in range(2048)]).reshape(-1, 14, 14)
  assert len(_mismatches_with_beit(uniform, beit)) >= 5
  moved = np.zeros_like(beit_on)
  moved[:, :-1, :-1] = beit_on[:, 1:, 1:]
  assert _mismatches_with_beit(moved, beit_on)


@functools.cache
def _blocks(max_block, batch=1024, seed=3):
  """`_beit_blocks` at 14×14 / 120 / 16, as numpy arrays."""
  fn = functools.partial(
    masking._beit_blocks,
    batch_size=batch,
    grid=(14, 14),
    num_masked=120,
    min_block=16,
    max_block=max_block,
  )
  return [np.asarray(x) for x in jax.jit(fn)(jax.random.key(seed))]


@pytest.mark.parametrize("max_block", [None, 30])
def test_accepted_blocks_follow_beit_rule(max_block):
  """Replays every round's accepted block in numpy: in the grid, area and aspect as drawn (up to
  the rounding of h and w), adds 1..budget new patches, and the blocks make the mask."""
  grid, num_masked, min_block = (14, 14), 120, 16
  cap = num_masked if max_block is None else max_block
  mask, blocks, accepted, added, budget = (x[:256] for x in _blocks(max_block))
  assert (mask.sum((1, 2)) == num_masked).mean() > 0.97  # the top-up is rare
  for b in range(len(mask)):
    replay, count = np.zeros(grid, bool), 0
    for r in range(blocks.shape[1]):
      assert budget[b, r] == min(num_masked - count, cap)
      top, left, h, w = blocks[b, r]
      if not accepted[b, r]:
        assert added[b, r] == 0 and (blocks[b, r] == 0).all()
        continue
      assert 1 <= h < grid[0] and 1 <= w < grid[1]
      assert top + h <= grid[0] and left + w <= grid[1]
      # h = round(√(area·aspect)), w = round(√(area/aspect)), area ∈ [lo, hi], aspect ∈ [0.3, 1/0.3]
      lo, hi = sorted((min_block, budget[b, r]))
      assert (h - 0.5) * (w - 0.5) <= hi and (h + 0.5) * (w + 0.5) >= lo, (h, w, lo, hi)
      assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5) >= 0.3, (h, w)
      new = h * w - replay[top : top + h, left : left + w].sum()
      assert new == added[b, r] and 0 < new <= budget[b, r]
      replay[top : top + h, left : left + w] = True
      count += new
    np.testing.assert_array_equal(replay, mask[b])


def test_blocks_match_beit_blocks():
  """First block (empty mask, area ~ U(16, 120)): h, w, area and log aspect as BEiT's (a linear
  instead of log-uniform aspect moves the mean log(h/w) by ~0.5); blocks per mask as the
  give_up=False port (BEiT's own stops earlier: 6.5 vs 6.8)."""
  _, blocks, accepted, _, _ = _blocks(None)
  assert accepted[:, 0].all()
  h, w = blocks[:, 0, 2].astype(float), blocks[:, 0, 3].astype(float)
  _, ref_blocks = _beit_reference(3000, True, 0)
  ref = np.array([b[0] for b in ref_blocks], float)
  ref_h, ref_w = ref[:, 2], ref[:, 3]
  # sd: h, w ≈ 2.3, h·w ≈ 28, log(h/w) ≈ 0.7, blocks per mask ≈ 2.3. Tolerances ~5 standard
  # errors of the difference (1024 vs 3000 draws).
  assert abs(h.mean() - ref_h.mean()) < 0.4, (h.mean(), ref_h.mean())
  assert abs(w.mean() - ref_w.mean()) < 0.4, (w.mean(), ref_w.mean())
  assert abs((h * w).mean() - (ref_h * ref_w).mean()) < 5.0
  assert abs(np.log(h / w).mean() - np.log(ref_h / ref_w).mean()) < 0.12
  assert abs(np.log(h / w).std() - np.log(ref_h / ref_w).std()) < 0.08
  _, ref_on_blocks = _beit_reference(3000, False, 1)
  ref_count = np.array([len(b) for b in ref_on_blocks])
  assert abs(accepted.sum(1).mean() - ref_count.mean()) < 0.4, accepted.sum(1).mean()


def test_block_mask_top_up_grows_the_blocks():
  """With 1 round most masks fall short: the top-up keeps the blocks and adds neighbours of the
  mask first, then patches two steps away, then any."""
  grid = (14, 14)
  kw = dict(batch_size=64, grid=grid, num_masked=120, min_block=16, rounds=1)

  @jax.jit
  def both(key):
    blocks_key, _ = jax.random.split(key)  # the key block_mask gives _beit_blocks
    return masking.block_mask(key, **kw), masking._beit_blocks(blocks_key, **kw)[0]

  out, blocks = (np.asarray(x).reshape(-1, *grid) for x in both(jax.random.key(1)))
  assert (out.sum((1, 2)) == 120).all()
  assert (blocks.sum((1, 2)) < 120).mean() > 0.5
  assert not (blocks & ~out).any(), "top-up dropped a block patch"
  near = np.asarray(masking._grow(jnp.asarray(blocks)))
  nearish = np.asarray(masking._grow(jnp.asarray(near)))
  for outer, inner in ((nearish, near), (np.ones_like(near), nearish)):
    # A row that took any patch of the outer ring took all of the inner one.
    took_outer = (out & outer & ~inner).any((1, 2))
    assert took_outer.any(), "the test should reach the outer rings"
    assert (out | ~inner)[took_outer].all()


def test_block_mask_edge_counts():
  """No mask; the whole 8×8 grid (blocks are narrower than the grid: the top-up completes it)."""

  @jax.jit
  def draw(key):
    kw = dict(batch_size=6, grid=(8, 8), min_block=5)
    return masking.block_mask(key, num_masked=0, **kw), masking.block_mask(key, num_masked=64, **kw)

  none, full = (np.asarray(x) for x in draw(jax.random.key(0)))
  assert not none.any() and full.all()
  with pytest.raises(ValueError):
    masking.block_mask(jax.random.key(0), 2, (8, 8), num_masked=65, min_block=5)


def test_block_mask_sharded_output_matches_unsharded():
  """Batch-sharded output (as in the train step): the same masks as on one device."""
  mesh = sharding.make_mesh()
  fn = functools.partial(
    masking.block_mask, batch_size=8, grid=(14, 14), num_masked=120, min_block=16
  )
  key = jax.random.key(6)
  sharded = jax.jit(
    fn, in_shardings=sharding.replicated(mesh), out_shardings=sharding.batch_sharded(mesh)
  )(key)
  assert len(sharded.addressable_shards) == 4
  unsharded = jax.jit(fn)(jax.device_put(key, jax.devices()[0]))
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(unsharded))


# --- Text masking (data2vec 1.0 text, spec §1.2) ----------------------------------------------
#
# Reference: fairseq `MaskTokensDataset.__getitem_cached__` (mask_stdev 0, no whole-word masking)
# ported to numpy and run on a row's maskable tokens only (fairseq's item also holds `<s>` and
# `</s>`, which ours never masks; see masking.py). Two batches per scheme, drawn once (jitted,
# vmapped over keys): EQUAL, 8 rows of 210 tokens with specials mid-row (204 maskable), and
# UNEQUAL, 4 rows of 210, 150, 210, 190 tokens (the second is the shortest, 144 maskable).

SPECIALS = masking.ROBERTA_SPECIAL_IDS  # <s> 0, <pad> 1, </s> 2, <unk> 3
VOCAB, MASK_ID = 1000, 999
INTERIOR = ((20, 2), (21, 0), (33, 3), (47, 2))  # </s> <s> mid-row, <unk>, another </s>
EQUAL, UNEQUAL = (210,) * 8, (210, 150, 210, 190)


def fairseq_mask_tokens(
  rng, sz, mask_prob, mask_multiple_length=1, leave_unmasked_prob=0.1, random_token_prob=0.1
):
  """fairseq MaskTokensDataset over `sz` tokens: (chosen, unmask, rand_mask) bool[sz]."""
  mask = np.full(sz, False)
  num_mask = int(mask_prob * sz / float(mask_multiple_length) + rng.random())
  mask_idc = rng.choice(sz, num_mask, replace=False)
  mask_idc = np.concatenate([mask_idc + i for i in range(mask_multiple_length)])
  mask_idc = mask_idc[mask_idc < len(mask)]
  mask[mask_idc] = True
  rand_or_unmask_prob = random_token_prob + leave_unmasked_prob
  unmask = rand_mask = np.zeros(sz, bool)
  if rand_or_unmask_prob > 0.0:
    rand_or_unmask = mask & (rng.random(sz) < rand_or_unmask_prob)
    decision = rng.random(sz) < leave_unmasked_prob / rand_or_unmask_prob
    unmask, rand_mask = rand_or_unmask & decision, rand_or_unmask & ~decision
  return mask, unmask, rand_mask


@functools.cache
def _fairseq_spans(sz, num, seed=2, prob=0.35, length=4):
  """`num` fairseq span masks (mask_prob 0.35, mask_multiple_length 4) bool[num, sz]."""
  rng = np.random.default_rng(seed)
  return np.stack([fairseq_mask_tokens(rng, sz, prob, length, 0.0, 0.0)[0] for _ in range(num)])


def text_batch(valid, total, interior=INTERIOR, seed=0):
  """int32 tokens [B, total] and padding: `<s>`, random words in [4, MASK_ID), `</s>` at
  valid − 1, `<pad>` after; `interior` = (column, id) specials put in every row."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, MASK_ID, (len(valid), total)).astype(np.int32)
  pad = padding_for(valid, total)
  tokens[:, 0] = 0
  tokens[np.arange(len(valid)), np.asarray(valid) - 1] = 2
  for col, i in interior:
    tokens[:, col] = i
  tokens[pad] = 1
  return tokens, pad


def maskable_of(tokens, pad):
  return ~pad & ~np.isin(tokens, SPECIALS + (MASK_ID,))


def _text_fn(scheme, **kw):
  if scheme == "bert":
    fn, kw = masking.bert_mask, dict(vocab_size=VOCAB) | kw
  else:
    fn = masking.text_span_mask
  return functools.partial(fn, special_ids=SPECIALS, mask_id=MASK_ID, **kw)


@functools.cache
def _text_draws(scheme, valid, num, interior=INTERIOR, seed=0, **kw):
  """`num` jitted draws of a `valid` batch of 210 tokens, one per key of split(key(seed), num):
  corrupted, mask, replaced_by_mask [num, B, L], then the batch's tokens and padding."""
  tokens, pad = text_batch(valid, 210, interior)
  fn = _text_fn(scheme, **dict(kw))
  # lax.map: one draw per key, as vmap, but compiles in about half the time.
  draw = jax.jit(lambda ks: jax.lax.map(lambda k: fn(k, jnp.asarray(tokens), jnp.asarray(pad)), ks))
  out = draw(jax.random.split(jax.random.key(seed), num))
  return tuple(np.asarray(x) for x in out) + (tokens, pad)


@pytest.mark.parametrize("scheme", ["bert", "span"])
@pytest.mark.parametrize("valid", [EQUAL, UNEQUAL])
def test_text_masks_skip_specials_and_padding(scheme, valid):
  """Never a special, `<mask>` or pad position; the same count in every row; corrupted tokens
  differ from the input only at masked positions, `<mask>` exactly at replaced_by_mask."""
  corrupted, mask, replaced, tokens, pad = _text_draws(scheme, valid, 1500)
  maskable = maskable_of(tokens, pad)
  assert mask.any() and not (mask & ~maskable[None]).any(), "masked a special or pad token"
  counts = mask.sum(-1)
  assert (counts == counts[:, :1]).all(), "rows must have the same masked count"
  assert not (replaced & ~mask).any()
  assert ((corrupted == MASK_ID) == replaced).all()
  assert (corrupted[~mask] == np.broadcast_to(tokens, mask.shape)[~mask]).all()
  assert not np.isin(corrupted[mask], SPECIALS).any(), "a random token was special"
  if scheme == "span":
    assert (replaced == mask).all()
  else:
    assert 0.7 < replaced.sum() / mask.sum() < 0.9
  assert corrupted.dtype == np.int32 and mask.dtype == bool and replaced.dtype == bool


def test_bert_count_is_fairseqs_count_of_the_shortest_row():
  """K = ⌊0.15·V + u⌋ for V = the shortest row's maskable tokens: for 204 tokens K ∈ {30, 31},
  mean 30.6 as fairseq's int(0.15·sz + rand). (The smallest of the 8 rows' own draws, span_mask's
  rule, would give mean 30.02.) The UNEQUAL batch gets its 144-token row's K ∈ {21, 22}."""
  _, mask, _, _, _ = _text_draws("bert", EQUAL, 1500)
  ours = mask.sum(-1)[:, 0]
  rng = np.random.default_rng(0)
  ref = np.array([fairseq_mask_tokens(rng, 204, 0.15)[0].sum() for _ in range(3000)])
  assert set(np.unique(ours)) == set(np.unique(ref)) == {30, 31}
  # sd of K is 0.49: standard errors 0.013 (ours), 0.009 (reference).
  assert abs(ours.mean() - ref.mean()) < 0.06, (ours.mean(), ref.mean())
  assert abs(ours.mean() - 30.6) < 0.05
  _, mask, _, _, _ = _text_draws("bert", UNEQUAL, 1500)
  assert set(np.unique(mask.sum(-1))) == {21, 22}
  assert abs(mask.sum(-1).mean() - 21.6) < 0.05


def test_bert_positions_uniform_over_maskable_tokens():
  """Each maskable token is chosen with probability K/V ≈ 0.15: flat along the row (also next to
  the specials mid-row), first and second half alike, in every row."""
  _, mask, _, tokens, pad = _text_draws("bert", EQUAL, 1500)
  maskable = maskable_of(tokens, pad)[0]
  freq = mask.mean(0)  # [B, L]
  expected = mask.sum(-1).mean() / maskable.sum()  # ≈ 0.15
  # sd of one position's frequency over 1500 draws ≈ 0.009.
  np.testing.assert_array_less(np.abs(freq[:, maskable] - expected), 0.045)
  assert not freq[:, ~maskable].any()
  cols = np.flatnonzero(maskable)
  first, second = cols[: len(cols) // 2], cols[len(cols) // 2 :]
  assert abs(freq[:, first].mean() - freq[:, second].mean()) < 0.005


def test_bert_80_10_10_is_per_token_bernoulli():
  """Of the chosen tokens ≈80% become `<mask>`, 10% a random token, 10% stay, as in fairseq's
  reference; each row's split varies (independent per token, not exact proportions)."""
  corrupted, mask, replaced, tokens, _ = _text_draws("bert", EQUAL, 1500)
  tokens = np.broadcast_to(tokens, mask.shape)
  changed = mask & ~replaced & (corrupted != tokens)  # random (a 1-in-995 draw of itself stays)
  kept = mask & (corrupted == tokens)
  total = mask.sum()  # ~367k
  fractions = np.array([replaced.sum(), changed.sum(), kept.sum()]) / total
  rng = np.random.default_rng(1)
  ref = np.zeros(3)
  for _ in range(3000):
    chosen, unmask, rand = fairseq_mask_tokens(rng, 204, 0.15)
    ref += [(chosen & ~unmask & ~rand).sum(), rand.sum(), unmask.sum()]
  ref /= ref.sum()
  # Standard errors: ≤ 0.0007 (ours), ≤ 0.0013 (reference, ~92k tokens).
  np.testing.assert_allclose(fractions, [0.8, 0.1, 0.1], atol=0.006)
  np.testing.assert_allclose(fractions, ref, atol=0.006)
  per_row = replaced.sum(-1).ravel()  # Binomial(K ≈ 30.6, 0.8): sd ≈ 2.2
  assert 1.9 < per_row.std() < 2.6, per_row.std()


def test_bert_random_tokens_uniform_over_non_special_vocabulary():
  """random_prob 1: every chosen token becomes a random one, uniform over the 34 ids of a
  40-token vocabulary without specials 0-3, 17 and `<mask>` 39 (a χ² test on ~50k draws)."""
  vocab, special, mask_id = 40, SPECIALS + (17,), 39
  tokens = jnp.full((8, 64), 20, jnp.int32)
  pad = jnp.zeros((8, 64), bool)
  fn = functools.partial(
    masking.bert_mask,
    special_ids=special,
    mask_id=mask_id,
    vocab_size=vocab,
    prob=0.5,
    random_prob=1.0,
    leave_prob=0.0,
  )
  draw = jax.jit(lambda ks: jax.lax.map(lambda k: fn(k, tokens, pad), ks))
  keys = jax.random.split(jax.random.key(3), 200)
  corrupted, mask, replaced = (np.asarray(x) for x in draw(keys))
  assert not replaced.any()
  drawn = corrupted[mask]
  counts = np.bincount(drawn, minlength=vocab)
  allowed = np.setdiff1d(np.arange(vocab), special + (mask_id,))
  assert counts.sum() == counts[allowed].sum(), "drew a special id"
  expected = len(drawn) / len(allowed)
  chi2 = ((counts[allowed] - expected) ** 2 / expected).sum()
  assert chi2 < 75, chi2  # 33 degrees of freedom: P(χ² > 75) ≈ 4e-5


def test_text_span_shortest_row_is_fairseqs():
  """EQUAL batch without mid-row specials, row 0 (the first shortest, exactly its own spans):
  200 maskable tokens, count mean and spread and per-position frequency as fairseq's (≈31%
  masked; the first tokens less, only spans starting at or before them; spans cut at the end)."""
  _, mask, _, _, _ = _text_draws("span", (202,) * 8, 2000, ())
  ours = mask[:, 0, 1:201]  # the maskable tokens
  assert not mask[:, :, 201:].any() and not mask[:, :, 0].any()
  ref = _fairseq_spans(200, 4000)
  mean, sd = ours.sum(1).mean(), ours.sum(1).std()  # ≈ 61.3, 3.9
  assert abs(mean - ref.sum(1).mean()) < 0.6, (mean, ref.sum(1).mean())
  assert abs(sd - ref.sum(1).std()) < 0.4, (sd, ref.sum(1).std())
  assert 0.29 < ours.mean() < 0.33
  # sd of one position's frequency ≈ 0.01 (ours), 0.007 (reference).
  np.testing.assert_array_less(np.abs(ours.mean(0) - ref.mean(0)), 0.05)
  assert ours[:, 0].mean() < 0.13 and ref[:, 0].mean() < 0.13  # ≈ 0.35 / 4
  assert ours[:, -1].mean() > 0.25


def test_text_span_batch_count_is_unbiased():
  """8 equal rows share one count K, distributed as fairseq's union for one row (mean ≈ 61.3, sd
  ≈ 3.9): cutting to the smallest of the 8 rows' unions would lower the mean to 55.6. The other
  rows (spans until K) mask each position as often as row 0."""
  _, mask, _, _, _ = _text_draws("span", (202,) * 8, 2000, ())
  counts = mask.sum(-1)
  assert (counts == counts[:, :1]).all()
  ref = _fairseq_spans(200, 4000).sum(1)
  assert abs(counts[:, 0].mean() - ref.mean()) < 0.6, (counts[:, 0].mean(), ref.mean())
  assert abs(counts[:, 0].std() - ref.std()) < 0.4, (counts[:, 0].std(), ref.std())
  freq = mask[:, :, 1:201].mean(0)  # [B, 200]
  np.testing.assert_array_less(np.abs(freq[1:].mean(0) - freq[0]), 0.05)


def _short_inner_runs(row, maskable, length):
  """Runs of `row` shorter than `length` that touch no special, pad or row end (not cut)."""
  edge = np.concatenate([[False], maskable, [False]])  # edge[i + 1] = maskable[i]
  return [
    (start, size)
    for start, size in _runs(row)
    if size < length and edge[start] and edge[start + size + 1]
  ]


def test_text_span_runs_are_whole_spans():
  """Spans have length 4 unless cut by a special, the padding or the end: a row's masked runs
  are unions of whole spans, except at most one shortened last span per row, and none in the
  batch's shortest row (its count is its own union). Sparse spans (prob 0.05) are mostly runs
  of exactly 4."""
  _, mask, _, tokens, pad = _text_draws("span", UNEQUAL, 1500)
  maskable = maskable_of(tokens, pad)
  shortened = np.zeros(4, int)
  for draw in mask[:500]:
    for b in range(4):
      short = _short_inner_runs(draw[b], maskable[b], 4)
      assert len(short) <= 1, short
      shortened[b] += len(short)
  assert shortened[1] == 0, "the shortest row is cut to its own count: whole spans"
  assert shortened[[0, 2, 3]].sum() > 300, shortened  # about half the other rows
  _, mask, _, tokens, pad = _text_draws("span", (202,), 500, (), prob=0.05)
  maskable = maskable_of(tokens, pad)[0]
  assert not any(_short_inner_runs(row, maskable, 4) for row in mask[:, 0])
  runs = np.array([size for row in mask[:, 0] for _, size in _runs(row)])
  assert np.mean(runs == 4) > 0.8, np.bincount(runs)


@functools.cache
def _text_single(scheme):
  return jax.jit(_text_fn(scheme))


@pytest.mark.parametrize("scheme", ["bert", "span"])
def test_text_masks_keys_rows_and_jit(scheme):
  """A jitted call with one key gives that key's draw of `_text_draws`, and repeats; keys and
  rows differ."""
  draws = _text_draws(scheme, UNEQUAL, 1500)
  tokens, pad = (jnp.asarray(x) for x in draws[3:])
  key = jax.random.split(jax.random.key(0), 1500)[4]
  for _ in range(2):
    for x, y in zip(_text_single(scheme)(key, tokens, pad), draws[:3]):
      np.testing.assert_array_equal(np.asarray(x), y[4])
  mask = draws[1]
  assert len({m.tobytes() for m in mask[:50, 0]}) == 50, "keys repeat a mask"
  assert (mask[:, 0, :150] != mask[:, 2, :150]).any(1).all(), "rows repeat a mask"


@pytest.mark.parametrize("scheme", ["bert", "span"])
def test_text_masks_sharded_match_unsharded(scheme):
  """Batch-sharded tokens and outputs (threefry partitionable): the same draw as on one device."""
  mesh = sharding.make_mesh()
  draws = _text_draws(scheme, UNEQUAL, 1500)
  batch = sharding.put_batch({"tokens": draws[3], "pad": draws[4]}, mesh)
  key = jax.random.split(jax.random.key(0), 1500)[4]
  sharded = jax.jit(
    _text_fn(scheme),
    in_shardings=(sharding.replicated(mesh),) + (sharding.batch_sharded(mesh),) * 2,
    out_shardings=sharding.batch_sharded(mesh),
  )(key, batch["tokens"], batch["pad"])
  assert len(sharded[0].addressable_shards) == 4
  for x, y in zip(sharded, draws[:3]):
    np.testing.assert_array_equal(np.asarray(x), y[4])
