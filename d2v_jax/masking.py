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
