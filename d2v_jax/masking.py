"""Student masks, drawn with `jax.random` inside the compiled step (spec §1.2).

Every function is pure jnp with static output shapes: `bool[B, T]`, True = masked. Masks never
touch padding, and every example of a batch gets the same number of masked positions (fairseq's
`require_same_masks`), so per-example losses weigh the same and shapes never depend on data.
"""

import jax
import jax.numpy as jnp


def _rank_within_rows(scores):
  """Rank of each entry in its row (0 = smallest); ties broken by position."""
  return jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)


def subsample_to_count(rng, mask, count):
  """Keeps a uniformly random `count` of the True entries of each row of `mask` [B, T].

  Rows must have at least `count` True entries. `count` may be a traced scalar.
  """
  scores = jnp.where(mask, jax.random.uniform(rng, mask.shape), 2.0)  # unmasked rank last
  return _rank_within_rows(scores) < count


def span_mask(rng, padding_mask, *, prob: float, length: int, min_masks: int = 1):
  """wav2vec 2.0 / data2vec span masking (fairseq `compute_mask_indices`, static type).

  Per example with V valid frames: n = max(min_masks, ⌊prob·V/length + u⌋), u ~ U(0, 1), span
  starts are drawn without replacement from [0, V − length) and each covers `length` frames
  (spans may overlap, so about 1 − e^{−prob} ≈ 49% of frames are masked at prob 0.65). Each row is
  then randomly subsampled to the batch's smallest masked count.

  Args:
    rng: PRNG key.
    padding_mask: bool[B, T], True at padded frames.
    prob: expected fraction of frames that start a span, times `length`.
    length: span length in frames.
    min_masks: minimum number of spans per example.

  Returns:
    bool[B, T], True where the student sees the mask embedding.
  """
  batch, num_frames = padding_mask.shape
  count_rng, start_rng, same_rng = jax.random.split(rng, 3)
  valid = jnp.sum(~padding_mask, axis=1)  # [B]
  # Candidate starts [0, V - length); at least one candidate so short clips still get a span.
  num_candidates = jnp.maximum(valid - length, 1)  # [B]
  u = jax.random.uniform(count_rng, (batch,))
  num_spans = jnp.floor(prob * valid / length + u).astype(jnp.int32)
  num_spans = jnp.clip(num_spans, min_masks, num_candidates)  # [B]

  positions = jnp.arange(num_frames)[None, :]  # [1, T]
  scores = jax.random.uniform(start_rng, (batch, num_frames))
  scores = jnp.where(positions < num_candidates[:, None], scores, 2.0)
  is_start = _rank_within_rows(scores) < num_spans[:, None]  # [B, T]

  # Frame t is masked iff a span starts in (t - length, t]: a windowed count of starts.
  starts_so_far = jnp.cumsum(is_start, axis=1)
  shifted = jnp.pad(starts_so_far, ((0, 0), (length, 0)))[:, :num_frames]
  mask = (starts_so_far - shifted > 0) & ~padding_mask
  same_count = jnp.min(jnp.sum(mask, axis=1))
  return subsample_to_count(same_rng, mask, same_count)


def block_mask_sizes(
  num_patches: int,
  *,
  num_masked_ref: int = 120,
  min_block_ref: int = 16,
  num_patches_ref: int = 196,
):
  """BEiT block-mask sizes for a grid of `num_patches`, scaled from data2vec's 224² numbers.

  data2vec 1.0 vision masks 120 of 196 patches (14×14) with blocks of at least 16 patches (spec
  §1.2). Both are areas, so both scale with the number of patches: the same masked fraction
  (≈61%) and the same smallest block relative to the image. Rounded to the nearest integer,
  `min_block` at least 1. E.g. 8×8 → (39, 5), 6×10 → (37, 5), 16×16 → (157, 21).

  Returns:
    (num_masked, min_block) for `block_mask`.
  """
  scale = num_patches / num_patches_ref
  num_masked = min(num_patches, int(round(num_masked_ref * scale)))
  min_block = max(1, int(round(min_block_ref * scale)))
  return num_masked, min_block


def _beit_blocks(
  rng,
  batch_size: int,
  grid: tuple[int, int],
  *,
  num_masked: int,
  min_block: int,
  max_block: int | None = None,
  min_aspect: float = 0.3,
  max_aspect: float | None = None,
  rounds: int = 16,
  attempts: int = 10,
):
  """BEiT's block proposals (`MaskingGenerator`), `rounds` calls of its `_mask` per example.

  One round is one call of BEiT's `_mask`: up to `attempts` block proposals against the current
  mask, the first acceptable one is added. BEiT's proposals are independent given the mask and a
  rejected one changes nothing, so the `attempts` proposals of a round are drawn and tested in
  parallel and the first acceptable one (in draw order) wins: the same law as BEiT's sequential
  loop. Unlike BEiT, a round without an accepted block does not end the mask; later rounds keep
  proposing (see `block_mask`).

  Returns:
    mask: bool[B, H, W], at most `num_masked` True per example.
    blocks: int32[B, rounds, 4], (top, left, h, w) of each round's accepted block.
    accepted: bool[B, rounds], whether the round added a block (else its `blocks` row is 0).
    added: int32[B, rounds], newly masked patches of the round's block (0 if none).
    budget: int32[B, rounds], the round's `max_mask_patches` = min(num_masked − count, max_block).
  """
  height, width = grid
  max_block = num_masked if max_block is None else max_block
  max_aspect = max_aspect or 1 / min_aspect  # BEiT: `max_aspect or 1 / min_aspect`
  log_aspect_lo, log_aspect_hi = jnp.log(min_aspect), jnp.log(max_aspect)
  # Four uniforms per proposal (area, log aspect, top, left), 16 bits each: two per 32 random
  # bits halves the threefry work, a large share of the time on CPU. On a 2^-16 grid the top/left
  # cells' probabilities are off by < 3e-4 (relative) and areas by < 0.002 patch. Batch-leading,
  # so a batch-sharded draw gives the same numbers (threefry partitionable).
  bits = jax.random.bits(rng, (batch_size, rounds, attempts, 2), jnp.uint32)
  u = jnp.concatenate([bits & 0xFFFF, bits >> 16], axis=-1).astype(jnp.float32) / 65536.0
  rows = jnp.arange(height)  # [H]
  cols = jnp.arange(width)  # [W]

  def one_round(carry, u):  # u [B, K, 4]
    mask, count = carry  # [B, H, W] bool, [B] int32
    budget = jnp.minimum(num_masked - count, max_block)  # [B]
    # random.uniform(a, b) is a + (b - a)·U, also when b < a (budget below min_block).
    lo = jnp.minimum(min_block, budget)[:, None].astype(jnp.float32)  # [B, 1]
    hi = jnp.maximum(min_block, budget)[:, None].astype(jnp.float32)
    area = lo + (hi - lo) * u[..., 0]  # [B, K]
    aspect = jnp.exp(log_aspect_lo + (log_aspect_hi - log_aspect_lo) * u[..., 1])
    # jnp.round rounds half to even, as Python's round.
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)  # [B, K]
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (h < height) & (w < width)
    # random.randint(0, H - h) includes H - h: H - h + 1 equally likely rows. (Clipped to the
    # grid also for blocks that do not fit, so that their table lookups stay in range.)
    top = jnp.floor(u[..., 2] * (height - h + 1)).astype(jnp.int32)
    top = jnp.clip(top, 0, jnp.maximum(height - h, 0))
    left = jnp.floor(u[..., 3] * (width - w + 1)).astype(jnp.int32)
    left = jnp.clip(left, 0, jnp.maximum(width - w, 0))
    # Already-masked patches under each proposal, from the mask's summed-area table
    # table[b, i, j] = mask[b, :i, :j].sum(): four lookups per proposal.
    table = jnp.cumsum(jnp.cumsum(mask.astype(jnp.int32), axis=1), axis=2)  # [B, H, W]
    table = jnp.pad(table, ((0, 0), (1, 0), (1, 0)))  # [B, H+1, W+1]
    table = table.reshape(batch_size, (height + 1) * (width + 1))
    bottom, right = jnp.minimum(top + h, height), jnp.minimum(left + w, width)

    def at(r, c):  # table[b, r, c] for [B, K] corners
      return jnp.take_along_axis(table, r * (width + 1) + c, axis=1)

    covered = at(bottom, right) - at(top, right) - at(bottom, left) + at(top, left)  # [B, K]
    added = h * w - covered
    ok = fits & (added > 0) & (added <= budget[:, None])
    first = jnp.argmax(ok, axis=1)  # [B], the first acceptable proposal (0 if none)
    pick = ((jnp.arange(attempts) == first[:, None]) & ok).astype(jnp.int32)  # [B, K] one-hot
    top, left, h, w, added = (jnp.sum(pick * v, axis=1) for v in (top, left, h, w, added))  # [B]
    # A round without an acceptable proposal picks nothing: h = w = added = 0, an empty block.
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # [B, H]
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # [B, W]
    mask = mask | (in_rows[:, :, None] & in_cols[:, None, :])
    chosen = jnp.stack([top, left, h, w], axis=-1)  # [B, 4]
    return (mask, count + added), (chosen, pick.any(axis=1), added, budget)

  init = (jnp.zeros((batch_size, height, width), bool), jnp.zeros(batch_size, jnp.int32))
  (mask, _), per_round = jax.lax.scan(one_round, init, jnp.moveaxis(u, 1, 0))
  blocks, accepted, added, budget = (jnp.moveaxis(x, 0, 1) for x in per_round)  # [B, R, ...]
  return mask, blocks, accepted, added, budget


def _grow(x):
  """x [B, H, W] bool, plus its 4-neighbours."""
  p = jnp.pad(x, ((0, 0), (1, 1), (1, 1)))
  return x | p[:, :-2, 1:-1] | p[:, 2:, 1:-1] | p[:, 1:-1, :-2] | p[:, 1:-1, 2:]


def block_mask(
  rng,
  batch_size: int,
  grid: tuple[int, int],
  *,
  num_masked: int,
  min_block: int,
  max_block: int | None = None,
  min_aspect: float = 0.3,
  max_aspect: float | None = None,
  rounds: int = 16,
  attempts: int = 10,
):
  """data2vec 1.0 vision / BEiT block-wise masking (spec §1.2 "Vision"), exactly `num_masked`.

  BEiT (`masking_generator.py`) adds rectangular blocks until `num_masked` patches are masked. Per
  block: area ~ U(min_block, min(remaining, max_block)), aspect h/w log-uniform in [min_aspect,
  max_aspect], h = round(√(area·aspect)), w = round(√(area/aspect)), h < H and w < W, uniform
  top-left; the block is accepted if it adds between 1 and min(remaining, max_block) new patches.
  Each call of BEiT's `_mask` makes up to 10 such attempts; when all 10 fail BEiT gives up, so
  30% of its 14×14 masks end short of 120 (21% by one patch, 5% by two; mean 119.5).

  Here (`_beit_blocks`) every example runs `rounds` calls of `_mask`, each testing its `attempts`
  proposals in parallel (the first acceptable wins, as in BEiT's loop), and a call that fails does
  not stop the mask: later calls keep proposing under the same rule. So an accepted block has
  BEiT's law given the mask so far; our masks are BEiT's, except that where BEiT would give up we
  keep adding BEiT blocks until the count is exact. (`attempts` only trades loop steps for width:
  without BEiT's give-up rule the mask's law does not depend on it.)

  Rounds are static. At 14×14/120/16 a mask needs 7.4 rounds on average and 16 rounds finish
  99.8% of masks (24 rounds: 99.99%); at 8×8/39/5 and 6×10/37/5 12 rounds finish 99.97%. Bigger
  grids need more: 16×16 has 1.1% unfinished after 16 rounds, 24×24 0.3% after 32. An unfinished
  mask is nearly always one patch short; it is topped up with random unmasked patches next to
  the mask (then two steps away, then anywhere), so the extra patch extends a block, as BEiT's
  own last blocks mostly do (they must add ≤ the few patches left, so they overlap the mask).
  The top-up changes ~0.2% of 14×14 masks by one patch, well below what the statistics tests
  can see; the cost is one sort per row. B=256 at 14×14 takes ~8–10 ms on 2 CPU cores.

  Args:
    rng: PRNG key.
    batch_size: number of masks B.
    grid: (H, W) patch grid.
    num_masked: masked patches per example (data2vec 224²: 120; see `block_mask_sizes`).
    min_block: BEiT's `min_num_patches`, the smallest block area (data2vec: 16).
    max_block: BEiT's `max_num_patches`, the largest area of one block (default `num_masked`).
    min_aspect: smallest h/w of a block (BEiT: 0.3).
    max_aspect: largest h/w (default 1 / min_aspect).
    rounds: block-adding rounds per mask (static; more = rarer top-up, longer loop).
    attempts: proposals per round (BEiT: 10).

  Returns:
    bool[B, H·W], row-major patch order, True = masked, exactly `num_masked` True per row.
  """
  height, width = grid
  if not 0 <= num_masked <= height * width:
    raise ValueError(f"num_masked={num_masked} not in [0, {height * width}]")
  if num_masked == 0:
    return jnp.zeros((batch_size, height * width), bool)
  blocks_rng, fill_rng = jax.random.split(rng)
  mask, *_ = _beit_blocks(
    blocks_rng,
    batch_size,
    grid,
    num_masked=num_masked,
    min_block=min_block,
    max_block=max_block,
    min_aspect=min_aspect,
    max_aspect=max_aspect,
    rounds=rounds,
    attempts=attempts,
  )  # [B, H, W], at most num_masked per row
  # Top-up order: masked patches first (all kept: there are at most num_masked), then neighbours
  # of the mask, then patches two steps away, then the rest; random within each. The order is an
  # int32 key tier | random | position, unique per row, so the num_masked smallest keys are the
  # keys up to the row's num_masked-th smallest: one sort instead of an argsort pair.
  near = _grow(mask)
  tier = jnp.where(mask, 0, jnp.where(near, 1, jnp.where(_grow(near), 2, 3)))  # [B, H, W]
  tier = tier.reshape(batch_size, height * width)  # [B, H·W]
  pos_bits = max(1, (height * width - 1).bit_length())
  rand_bits = 29 - pos_bits  # tier in bits 29-30, sign bit clear
  noise = jax.random.bits(fill_rng, tier.shape, jnp.uint32) >> (32 - rand_bits)
  key = (tier << 29) | (noise.astype(jnp.int32) << pos_bits) | jnp.arange(height * width)
  threshold = jnp.sort(key, axis=-1)[:, num_masked - 1 : num_masked]  # [B, 1]
  return key <= threshold
