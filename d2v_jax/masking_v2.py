"""data2vec 2.0 student masks (spec §2.2), drawn with `jax.random` inside the compiled step.

What is here, and the fairseq code each follows:
- `block_mask_1d` (audio: block 5, R 0.5, A 0.05) and `block_mask_2d` (images: block 3, R 0.8,
  A 0.07, inverse): `compute_block_mask_1d` / `compute_block_mask_2d` in
  `fairseq/data/data_utils.py` with `require_same_masks=True`, `non_overlapping=False`,
  `expand_adjcent=False`, `mask_dropout=0` (the v2 configs), as called by the datasets that
  precompute v2 masks (`RawAudioDataset.__getitem__` in `fairseq/data/audio/raw_audio_dataset.py`,
  `MaeImageDataset` in `examples/data2vec/data/mae_image_dataset.py`).
- `random_mask` (text, `mask_length` 1, R 0.48): MAE's `random_masking` in
  `examples/data2vec/models/modalities/base.py`.
- `V2Mask` and `from_mask`: that file's `make_maskinfo` (`ids_keep`, `ids_restore`).
- `multi_mask` and `clone_batch`: `clone_batch` in `data2vec2.py` / `modalities/base.py`.

Block masks, with p = R (or 1 − R if inverse) on L = H·W positions (fairseq's float formulas,
evaluated in the same order so the counts agree to the last rounding):
1. n = int(L·((p + A) / B^dims)) centres drawn uniformly *with* replacement (`torch.randint`).
2. Each centre c marks [c − ⌊B/2⌋, c − ⌊B/2⌋ + B − 1] per axis. fairseq clamps each index into
   the grid, which only re-marks the border cell: a block at the border is cut, not shifted.
3. Exactly int(L·p) marks: if there are more, random marked positions are unmarked; if fewer,
   random unmarked ones are marked (fairseq's `torch.multinomial` over 0/1 weights: a uniform
   subset). Here one sort does both: the int(L·p) smallest of the keys marked-first | random.
4. Inverse: the marks are the *kept* set and the mask is their complement (image base: 5
   centres, 39 kept, 157 masked).
fairseq's 2D needs a square grid (d = int(√L)); here (H, W) is free, each axis clamped on its own.

What is fixed per row, so static (`num_kept`): block masks fix the marked count int(L·p), so
K = L − int(L·R) kept, or K = int(L·(1 − R)) if inverse; `random_mask` keeps int(L·(1 − R)),
MAE's `len_keep` (512 tokens at R 0.48: 266 kept, 246 masked).

Padding: every mask is drawn over all L positions and knows nothing of padding, as fairseq's
precomputed v2 masks (its v2 audio pretraining crops each batch to its shortest utterance rather
than pad). So K stays static, and a padded position is kept or masked like any other: gather the
padding mask with `keep_ids` for the student's attention (fairseq `gather_unmasked_mask`) and
leave padding out of the loss. In the valid part the masked fraction is still p on average,
but its count varies by row, and a row with very few valid positions can keep none of them:
crop lengths must keep rows mostly valid. (One difference in law: fairseq draws an audio mask
on the whole utterance and crops it at random, independently of the audio crop, at collation,
so its rows' counts differ and `make_maskinfo` takes row 0's; here a mask is drawn on the crop
and every count is exact.)

Special tokens (text): fairseq's `random_masking` draws noise over every position, so `<s>`,
`</s>` and padding can all be masked; followed here (its v2 text data is 511-token blocks
behind `<s>`, so the only special is the leading `<s>` and only the last block is padded).

Shapes and order conventions (N rows, L positions, K kept):
- `mask` bool[N, L], True = masked: the student does not see it; 2D grids in row-major order.
- `keep_ids` int32[N, K], the kept positions in increasing order; `masked_ids` int32[N, L − K],
  the masked positions in increasing order: a stable ascending argsort of the 0/1 mask, as
  fairseq's `make_maskinfo` (whose torch argsort is not promised stable). MAE's `random_masking`
  keeps in noise order instead: the same set, and the encoder sees positions added before the
  gather (ALiBi biases are gathered with the same ids) with no other order-dependent part, so
  only the set matters.
- `restore_ids` int32[N, L]: where each original position sits in concat(kept, masked) order,
  MAE's `ids_restore`, so `unshuffle(gather(x, keep_ids), gather(x, masked_ids), restore_ids)`
  is x.
- `multi_mask`: M masks per sample, sample-major: row i·M + j is clone j of sample i, which is
  `torch.repeat_interleave` (fairseq's clone order for inputs, precomputed masks and targets).

All functions are pure jnp with static shapes; draws are batch-leading, so with
`jax_threefry_partitionable` a batch-sharded draw gives the same masks.
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class V2Mask:
  """A mask and its gather indices; a pytree (jit, vmap, shard as arrays)."""

  mask: jax.Array  # bool [N, L], True = masked
  keep_ids: jax.Array  # int32 [N, K], kept positions, increasing
  masked_ids: jax.Array  # int32 [N, L - K], masked positions, increasing
  restore_ids: jax.Array  # int32 [N, L], position of each token in concat(kept, masked)

  @property
  def num_kept(self) -> int:
    return self.keep_ids.shape[-1]


def _check_ratio(ratio: float):
  if not 0.0 < ratio < 1.0:
    raise ValueError(f"ratio={ratio} not in (0, 1)")


def num_kept(length: int, ratio: float, *, inverse: bool) -> int:
  """The static kept count K of `length` positions at mask ratio `ratio`.

  inverse=False (block masks): fairseq fixes the masked count int(L·R), so K = L − int(L·R).
  inverse=True (inverse block masks, and `random_mask`): fairseq fixes the kept count
  int(L·(1 − R)).
  """
  _check_ratio(ratio)
  if inverse:
    return int(length * (1 - ratio))
  return length - int(length * ratio)


def block_mask_counts(
  num_positions: int, *, dims: int, block: int, ratio: float, adjust: float, inverse: bool
) -> tuple[int, int]:
  """(centres n, marked count) of fairseq's block mask: n = int(L·((p + A) / B^dims)) and
  int(L·p), p = 1 − R if inverse else R (kept if inverse, else masked). Image base: (5, 39)."""
  _check_ratio(ratio)
  if block < 1 or adjust < 0:
    raise ValueError(f"need block >= 1 and adjust >= 0, got block={block}, adjust={adjust}")
  p = 1 - ratio if inverse else ratio
  num_centres = int(num_positions * ((p + adjust) / block**dims))
  return num_centres, int(num_positions * p)


# --- Index bookkeeping -----------------------------------------------------------------------


def from_mask(mask, num_kept: int) -> V2Mask:
  """V2Mask of a bool[N, L] mask with exactly `num_kept` False per row (not checked: traced).

  fairseq `make_maskinfo`: ids_shuffle = ascending argsort of the 0/1 mask (kept, then masked,
  each in increasing order); ids_restore = its inverse. Both come from running counts here, so
  no sort is needed: a kept position's slot is its rank among the kept, a masked one's is K plus
  its rank among the masked.
  """
  batch, length = mask.shape
  kept = ~mask
  kept_rank = jnp.cumsum(kept, axis=1, dtype=jnp.int32) - 1  # [N, L]
  masked_rank = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
  restore_ids = jnp.where(kept, kept_rank, num_kept + masked_rank)  # [N, L]
  # ids_shuffle is the inverse permutation of restore_ids: one scatter.
  rows = jnp.arange(batch)[:, None]
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  shuffle = jnp.zeros((batch, length), jnp.int32).at[rows, restore_ids].set(positions)
  return V2Mask(
    mask=mask,
    keep_ids=shuffle[:, :num_kept],
    masked_ids=shuffle[:, num_kept:],
    restore_ids=restore_ids,
  )


def gather(x, ids):
  """Rows of x [N, L, ...] at `keep_ids` or `masked_ids` [N, J] -> [N, J, ...] (MAE's
  `torch.gather(x, 1, ids_keep)`; also for padding masks: fairseq `gather_unmasked_mask`)."""
  ids = ids.reshape(ids.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, ids, axis=1)


def unshuffle(kept, masked, restore_ids):
  """concat(kept [N, K, ...], masked [N, L − K, ...]) back in original order [N, L, ...]
  (the v2 decoder input: encoder outputs at kept positions, noise at masked ones)."""
  return gather(jnp.concatenate([kept, masked], axis=1), restore_ids)


# --- Random order keys -----------------------------------------------------------------------


def _order_keys(rng, first):
  """int32[N, L] keys, unique per row: `first` positions before the others, a uniformly random
  order within each group (ties of the random bits, rare, broken by position)."""
  length = first.shape[1]
  pos_bits = max(1, (length - 1).bit_length())
  rand_bits = 30 - pos_bits  # bit 30: the group; sign bit clear
  if rand_bits < 8:
    raise ValueError(f"{length} positions too many for int32 random keys")
  noise = jax.random.bits(rng, first.shape, jnp.uint32) >> (32 - rand_bits)  # batch-leading
  keys = (noise.astype(jnp.int32) << pos_bits) | jnp.arange(length, dtype=jnp.int32)
  return jnp.where(first, keys, keys | (1 << 30))


def _smallest(keys, count: int):
  """bool[N, L]: the `count` (static) smallest keys of each row (keys unique per row)."""
  if count == 0:
    return jnp.zeros(keys.shape, bool)
  kth = jnp.sort(keys, axis=-1)[:, count - 1 : count]  # [N, 1]
  return keys <= kth


# --- Block masks (audio, images) -------------------------------------------------------------


def _dilate(x, axis: int, block: int):
  """OR along `axis` over each True cell's window [c − ⌊B/2⌋, c − ⌊B/2⌋ + B − 1], cut at the
  ends (fairseq's clamp): out[t] = any x[c] with t − B + 1 + ⌊B/2⌋ <= c <= t + ⌊B/2⌋."""
  offset = block // 2
  size = x.shape[axis]
  pad = [(0, 0)] * x.ndim
  pad[axis] = (block - 1 - offset, offset)
  padded = jnp.pad(x, pad)
  windows = (jax.lax.slice_in_dim(padded, s, s + size, axis=axis) for s in range(block))
  return functools.reduce(jnp.logical_or, windows)


def _block_marks(rng, batch: int, shape: tuple[int, ...], *, block: int, num_centres: int):
  """Steps 1-2: `num_centres` centres per row, uniform with replacement over the flat positions
  (row-major), and the union of their clamped blocks.

  Returns:
    centres: int32[N, n], flat positions.
    marks: bool[N, L].
  """
  size = math.prod(shape)
  centres = jax.random.randint(rng, (batch, num_centres), 0, size, dtype=jnp.int32)
  rows = jnp.arange(batch)[:, None]
  marks = jnp.zeros((batch, size), bool).at[rows, centres].set(True)
  marks = marks.reshape(batch, *shape)
  # A block is a product of per-axis windows, so the union of blocks is a separable dilation.
  for axis in range(1, len(shape) + 1):
    marks = _dilate(marks, axis, block)
  return centres, marks.reshape(batch, size)


def _block_marking(rng, batch, shape, *, block, ratio, adjust, inverse):
  """Steps 1-3 (see the module docstring): (centres [N, n], marks before and after the count
  adjustment, bool[N, L]). The adjusted marks are masked, or kept if `inverse`."""
  size = math.prod(shape)
  num_centres, num_marked = block_mask_counts(
    size, dims=len(shape), block=block, ratio=ratio, adjust=adjust, inverse=inverse
  )
  centre_rng, fill_rng = jax.random.split(rng)
  centres, marks = _block_marks(centre_rng, batch, shape, block=block, num_centres=num_centres)
  # Marked first: too many marks -> a uniform subset of them survives; too few -> all of them
  # plus a uniform subset of the rest.
  adjusted = _smallest(_order_keys(fill_rng, marks), num_marked)
  return centres, marks, adjusted


def _block_mask(rng, batch, shape, *, block, ratio, adjust, inverse) -> V2Mask:
  if batch < 1 or min(shape) < 1:
    raise ValueError(f"need batch >= 1 and a non-empty grid, got {batch}, {shape}")
  _, _, marked = _block_marking(
    rng, batch, shape, block=block, ratio=ratio, adjust=adjust, inverse=inverse
  )
  mask = ~marked if inverse else marked
  return from_mask(mask, num_kept(math.prod(shape), ratio, inverse=inverse))


def block_mask_1d(
  rng, batch: int, length: int, *, block: int, ratio: float, adjust: float, inverse: bool = False
) -> V2Mask:
  """data2vec 2.0 audio block mask (fairseq `compute_block_mask_1d`), `batch` rows of `length`.

  Args:
    rng: PRNG key.
    batch: rows N.
    length: positions L (audio: CNN frames of the crop, padding included).
    block: block width B (`mask_length`; audio 5).
    ratio: mask ratio R (`mask_prob`; audio base 0.5).
    adjust: A (`mask_prob_adjust`; audio base 0.05), extra centres to offset block overlap.
    inverse: the marked set is kept and the mask is its complement.

  Returns:
    V2Mask with K = `num_kept(length, ratio, inverse=inverse)`.
  """
  return _block_mask(
    rng, batch, (length,), block=block, ratio=ratio, adjust=adjust, inverse=inverse
  )


def block_mask_2d(
  rng,
  batch: int,
  grid: tuple[int, int],
  *,
  block: int,
  ratio: float,
  adjust: float,
  inverse: bool = False,
) -> V2Mask:
  """data2vec 2.0 image block mask (fairseq `compute_block_mask_2d`) on an (H, W) patch grid.

  As `block_mask_1d` with B×B blocks; positions are row-major (`mask` [N, H·W]). Image base:
  block 3, ratio 0.8, adjust 0.07, inverse (14×14: 39 kept, 157 masked).
  """
  return _block_mask(
    rng, batch, tuple(grid), block=block, ratio=ratio, adjust=adjust, inverse=inverse
  )


# --- Random masking (text) -------------------------------------------------------------------


def random_mask(rng, batch: int, length: int, *, ratio: float) -> V2Mask:
  """MAE / data2vec 2.0 text masking (fairseq `random_masking`): keep the int(L·(1 − R)) positions
  of smallest uniform noise, i.e. a uniform subset; every position, `<s>` and padding included,
  can be masked (see the module docstring). Text base: ratio 0.48."""
  if batch < 1 or length < 1:
    raise ValueError(f"need batch >= 1 and length >= 1, got {batch}, {length}")
  keep = num_kept(length, ratio, inverse=True)
  kept = _smallest(_order_keys(rng, jnp.zeros((batch, length), bool)), keep)
  return from_mask(~kept, keep)


# --- Multi-mask (clone batch) ----------------------------------------------------------------


def clone_batch(x, num_clones: int):
  """x [N, ...] -> [N·M, ...], each sample repeated M times in a row (`repeat_interleave`):
  the student's inputs and the teacher's targets for `multi_mask`'s masks."""
  return jnp.repeat(x, num_clones, axis=0)


def multi_mask(
  rng, mask_fn: Callable[..., V2Mask], batch: int, num_clones: int, **kwargs
) -> V2Mask:
  """M independent masks per sample, sample-major: row i·M + j is clone j of sample i.

  Sample i's masks are `mask_fn(jax.random.split(rng, batch)[i], num_clones, **kwargs)`, so they
  do not depend on the batch size or how the batch is sharded. Pair them with
  `clone_batch(x, num_clones)`. E.g. image base:
  `multi_mask(rng, block_mask_2d, batch, 16, grid=(14, 14), block=3, ratio=0.8, adjust=0.07,
  inverse=True)`.
  """
  sample_rngs = jax.random.split(rng, batch)
  masks = jax.vmap(lambda r: mask_fn(r, num_clones, **kwargs))(sample_rngs)  # [N, M, ...]
  return jax.tree.map(lambda x: x.reshape(batch * num_clones, *x.shape[2:]), masks)
