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


# --- Text (data2vec 1.0, spec §1.2 "Text") ---------------------------------------------------
#
# Token ids in, token ids out. A token is maskable unless it is padding, one of `special_ids` or
# `mask_id`; fairseq's `MaskTokensDataset` draws over the whole item, `<s>` and `</s>` included,
# so here the per-row size `sz` of fairseq's formulas is the row's number of maskable tokens V
# (510 instead of 512 for a full RoBERTa block).
#
# Same count in every row: the batch's count K is fairseq's count for the row with the fewest
# maskable tokens (the first such row), drawn with fairseq's law for that row. For rows of equal
# length K therefore has exactly fairseq's distribution (mean prob·V for BERT, the mean union of
# the spans for span masking), instead of the downward-biased minimum over rows of span_mask's
# `require_same_masks` (for 256 rows of 510 tokens that minimum is 139 tokens, 11% below the
# mean union of 157).
# Longer rows get the same K, so a lower fraction: batch rows of similar length.

# <s>, <pad>, </s>, <unk>: fairseq Dictionary's nspecial = 4. RoBERTa's <mask> is 50264 (last).
ROBERTA_SPECIAL_IDS = (0, 1, 2, 3)
_NO_KEY = jnp.iinfo(jnp.int32).max  # sorts after every key of a maskable position


def _maskable(tokens, padding_mask, special_ids, mask_id):
  """bool[B, L]: True where a token may be masked (not padding, special or `<mask>`)."""
  special = jnp.zeros(tokens.shape, bool)
  for i in sorted(set(special_ids) | {mask_id}):
    special = special | (tokens == i)
  return ~padding_mask & ~special


def _key_bits(length: int, extra_bits: int = 0):
  """(position bits, random bits) of an int32 key random | position | extra, sign bit clear."""
  pos_bits = max(1, (length - 1).bit_length())
  rand_bits = 31 - pos_bits - extra_bits
  if rand_bits < 8:
    raise ValueError(f"sequence length {length} too long for int32 random keys")
  return pos_bits, rand_bits


def _random_keys(bits, maskable, extra_bits: int = 0):
  """int32[B, L] keys from uint32 random `bits` [B, L]: random high bits, then the position,
  then `extra_bits` zeros; unique per row, `_NO_KEY` where not maskable. Sorting a row by key is
  a uniformly random order of its maskable positions (up to ties of the random bits, broken by
  position: with 20 random bits and 510 tokens, some pair of a row shares its random bits in
  ~12% of rows)."""
  length = maskable.shape[1]
  pos_bits, rand_bits = _key_bits(length, extra_bits)
  noise = (bits >> (32 - rand_bits)).astype(jnp.int32)
  keys = ((noise << pos_bits) | jnp.arange(length, dtype=jnp.int32)) << extra_bits
  return jnp.where(maskable, keys, _NO_KEY)


def _smallest_keys(keys, count):
  """bool[B, L]: the `count` smallest keys of each row (keys unique per row; `count` a traced
  scalar or int32[B], at most the row's number of keys below `_NO_KEY`)."""
  count = jnp.broadcast_to(jnp.asarray(count, jnp.int32), keys.shape[:1])[:, None]  # [B, 1]
  kth = jnp.take_along_axis(jnp.sort(keys, axis=-1), jnp.maximum(count - 1, 0), axis=1)
  return (keys <= kth) & (count > 0) & (keys < _NO_KEY)


def _count_of_shortest_row(counts, num_maskable):
  """The count of the row with the fewest maskable tokens (the first such row): a scalar."""
  return counts[jnp.argmin(num_maskable)]


def _random_tokens(bits, vocab_size: int, excluded):
  """int32 tokens from uint32 random `bits`, uniform over [0, vocab_size) minus `excluded`
  (static ids), up to the modulo bias of `bits % n` (< n / 2^32 relative: 1e-5 at 50k ids)."""
  excluded = sorted({int(i) for i in excluded if 0 <= i < vocab_size})
  num_allowed = vocab_size - len(excluded)
  if num_allowed < 1:
    raise ValueError(f"no token left to draw in a vocabulary of {vocab_size}")
  r = (bits % jnp.uint32(num_allowed)).astype(jnp.int32)
  # The r-th allowed id: step over each excluded id at or below it, in increasing order.
  for e in excluded:
    r = r + (r >= e).astype(jnp.int32)
  return r


def bert_mask(
  rng,
  tokens,
  padding_mask,
  *,
  special_ids: tuple[int, ...],
  mask_id: int,
  vocab_size: int,
  prob: float = 0.15,
  random_prob: float = 0.1,
  leave_prob: float = 0.1,
):
  """BERT masking, the data2vec paper's text default (spec §1.2 "Text"; fairseq
  `MaskTokensDataset` with `mask_multiple_length` 1).

  K = ⌊prob·V + u⌋ positions, u ~ U(0, 1), V = maskable tokens of the batch's shortest row (see
  the section comment: every row gets this K), chosen uniformly without replacement among each
  row's maskable tokens. Of the chosen positions each independently (Bernoulli, as fairseq)
  becomes `<mask>` with probability 1 − random_prob − leave_prob, a random token with
  probability random_prob, or stays unchanged with probability leave_prob; so the 80/10/10
  split holds in expectation, not exactly per row. Random tokens are uniform over
  [0, vocab_size) without `special_ids` and `mask_id` (fairseq zeroes the weights of its 4
  specials but can draw `<mask>`, added to the dictionary after them; here a random token is
  never special).

  Args:
    rng: PRNG key.
    tokens: int[B, L] token ids.
    padding_mask: bool[B, L], True at padding.
    special_ids: ids never masked nor drawn, e.g. `ROBERTA_SPECIAL_IDS` (must list `<s>`,
      `</s>`, `<pad>`; `<unk>` too for fairseq's random-token vocabulary).
    mask_id: id of `<mask>` (never masked nor drawn as a random token).
    vocab_size: random tokens are drawn from [0, vocab_size).
    prob: expected fraction of maskable tokens chosen for prediction.
    random_prob: probability that a chosen token becomes a random token.
    leave_prob: probability that a chosen token is left unchanged.

  Returns:
    corrupted: int32[B, L], the student's input.
    mask: bool[B, L], the chosen positions (the same number K in every row).
    replaced_by_mask: bool[B, L], the chosen positions that became `<mask>` (where the released
      data2vec code takes its loss: `src_tokens == mask_idx`).
  """
  if not 0.0 < prob < 1.0:
    raise ValueError(f"prob={prob} not in (0, 1)")
  if random_prob < 0 or leave_prob < 0 or random_prob + leave_prob > 1:
    raise ValueError(f"bad random_prob={random_prob}, leave_prob={leave_prob}")
  tokens = tokens.astype(jnp.int32)
  batch, length = tokens.shape
  count_rng, token_rng = jax.random.split(rng)
  maskable = _maskable(tokens, padding_mask, special_ids, mask_id)
  num_maskable = jnp.sum(maskable, axis=1)  # [B]
  u = jax.random.uniform(count_rng, (batch,))
  counts = jnp.minimum(jnp.floor(prob * num_maskable + u).astype(jnp.int32), num_maskable)
  count = _count_of_shortest_row(counts, num_maskable)
  # One batch-leading draw for each token (few threefry calls: each one is slow to compile):
  # its order key, two 24-bit uniforms for the 80/10/10 split and its random token.
  bits = jax.random.bits(token_rng, (batch, length, 4), jnp.uint32)
  mask = _smallest_keys(_random_keys(bits[..., 0], maskable), count)

  # fairseq: rand_or_unmask = mask & (U < random + leave); unmask = that & (U' < leave / both).
  both = random_prob + leave_prob
  split = (bits[..., 1:3] >> 8).astype(jnp.float32) * 2.0**-24  # U(0, 1), [B, L, 2]
  rand_or_unmask = mask & (split[..., 0] < both)
  unmask = rand_or_unmask & (split[..., 1] * both < leave_prob)
  to_random = rand_or_unmask & ~unmask
  replaced_by_mask = mask & ~rand_or_unmask
  random_tokens = _random_tokens(bits[..., 3], vocab_size, tuple(special_ids) + (mask_id,))
  corrupted = jnp.where(replaced_by_mask, mask_id, jnp.where(to_random, random_tokens, tokens))
  return corrupted.astype(jnp.int32), mask, replaced_by_mask


def text_span_mask(
  rng,
  tokens,
  padding_mask,
  *,
  special_ids: tuple[int, ...],
  mask_id: int,
  prob: float = 0.35,
  length: int = 4,
):
  """data2vec 1.0 text span masking, the released config (spec §1.2 "Text": fairseq
  `MaskTokensDataset` with `mask_prob` 0.35, `mask_multiple_length` 4, no random or kept tokens).

  fairseq, per row of size V: n = ⌊prob·V/length + u⌋ starts drawn without replacement from all
  V positions, each masking positions s .. s + length − 1; spans may overlap (the union is
  ≈ 1 − (1 − prob/length)^length ≈ 31% of tokens at 0.35/4) and are cut at the end of the row.
  Here starts are drawn among maskable tokens and a span masks the maskable tokens among
  s .. s + length − 1 (so it is also cut where it meets `</s>`, another special or padding).

  Same count in every row: K = fairseq's union for the batch's shortest row (its n spans, see
  the section comment). Every row adds its spans in a random order until the union reaches K,
  the last span cut after the K-th masked token: each row is fairseq's random overlapping spans
  stopped at K masked tokens instead of at n spans, with at most one shortened span; the
  shortest row (the first one) is exactly its n spans. Unlike span_mask's subsampling no span
  is thinned out, and K is not biased low. Implementation: a start's random key covers the
  `length` positions from it; a position's key is the smallest key covering it, plus its offset
  in that span; the K smallest position keys are the mask. Two sorts per row.

  Args:
    rng: PRNG key.
    tokens: int[B, L] token ids.
    padding_mask: bool[B, L], True at padding.
    special_ids: ids never masked, e.g. `ROBERTA_SPECIAL_IDS` (must list `<s>`, `</s>`, `<pad>`).
    mask_id: id of `<mask>`.
    prob: fairseq's `mask_prob`: span starts are prob / length of the tokens.
    length: fairseq's `mask_multiple_length`.

  Returns:
    corrupted: int32[B, L], `<mask>` at masked positions.
    mask: bool[B, L], True at masked positions, the same number K in every row.
    replaced_by_mask: the same as `mask` (every masked token is `<mask>`).
  """
  if not 0.0 < prob < 1.0:
    raise ValueError(f"prob={prob} not in (0, 1)")
  if length < 1:
    raise ValueError(f"length={length} < 1")
  tokens = tokens.astype(jnp.int32)
  batch, num_tokens = tokens.shape
  count_rng, start_rng = jax.random.split(rng)
  maskable = _maskable(tokens, padding_mask, special_ids, mask_id)
  num_maskable = jnp.sum(maskable, axis=1)  # [B]

  offset_bits = (length - 1).bit_length()
  pos_bits, _ = _key_bits(num_tokens, offset_bits)
  start_bits = jax.random.bits(start_rng, (batch, num_tokens), jnp.uint32)
  start_keys = _random_keys(start_bits, maskable, offset_bits)  # [B, L], _NO_KEY at non-starts
  # cover[t] = min(start_keys[t - length + 1 .. t]): the first span (in key order) covering t.
  padded = jnp.pad(start_keys, ((0, 0), (length - 1, 0)), constant_values=_NO_KEY)
  cover = start_keys
  for k in range(1, length):
    cover = jnp.minimum(cover, padded[:, length - 1 - k : length - 1 - k + num_tokens])
  span_start = (cover >> offset_bits) & ((1 << pos_bits) - 1)
  offset = jnp.arange(num_tokens, dtype=jnp.int32) - span_start  # in [0, length) where covered
  position_keys = jnp.where(maskable, cover | offset, _NO_KEY)

  # fairseq's count for each row: the union of the spans of its n smallest start keys.
  u = jax.random.uniform(count_rng, (batch,))
  num_spans = jnp.floor(prob * num_maskable / length + u).astype(jnp.int32)
  num_spans = jnp.minimum(num_spans, num_maskable)[:, None]  # [B, 1]
  nth_start = jnp.take_along_axis(
    jnp.sort(start_keys, axis=-1), jnp.maximum(num_spans - 1, 0), axis=1
  )
  unions = jnp.sum(maskable & (cover <= nth_start) & (num_spans > 0), axis=1)  # [B]
  count = _count_of_shortest_row(unions, num_maskable)
  mask = _smallest_keys(position_keys, count)
  corrupted = jnp.where(mask, mask_id, tokens).astype(jnp.int32)
  return corrupted, mask, mask
