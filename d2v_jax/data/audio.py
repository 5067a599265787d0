"""Speech pretraining input pipeline (data2vec v1 audio): bucketed, static-shape grain batches.

Batches are `{"audio": float32[b, T], "padding_mask": bool[b, T]}` (mask True at PADDED samples,
the fairseq convention) with T one of `config.input.crop_lengths`, so the train step compiles
once per crop length and never per batch.

Bucketing. An utterance of length L belongs to the largest crop length <= L and is randomly
cropped to it (no padding); one shorter than every crop length is zero-padded to the smallest.
Utterances shorter than `min_length` are skipped. Each epoch shuffles the utterances (seed from
`(seed, epoch)`), groups them by bucket, cuts each bucket into full global batches (its remainder
is dropped), and shuffles the order of the batches. This plan needs only the lengths, so it is
random access: a `grain.MapDataset` over global batch indices 0, 1, 2, ... (epoch after epoch,
without end) whose elements load, crop and normalise their members. Crop offsets are seeded
from `(seed, epoch, utterance)`, so a batch is a pure function of its index, and a grain
iterator restored with `set_state` continues exactly.

Multi-process: process p of P takes rows [p*b, (p+1)*b) of every global batch (b = batch/P), so
the processes together see each global batch exactly once. Every process must use the same seed.
"""

import dataclasses

import grain
import numpy as np
from absl import logging

from d2v_jax.data import batching, sources

_NORM_EPS = 1e-5  # inside the sqrt of the variance, as fairseq's F.layer_norm(wav, wav.shape)
# Each crop length is one compiled train step; its buffers are small next to the model's, but
# a deep prefetch of long crops is not: keep a few batches in flight per process.
_READ_THREADS = 4
_PREFETCH_BATCHES = 4
# Independent numpy seed streams; the stream id keeps (seed, epoch) and (seed, epoch, utt) apart.
_PLAN_STREAM, _CROP_STREAM = 0, 1


def assign_buckets(lengths: np.ndarray, crop_lengths: tuple[int, ...]) -> np.ndarray:
  """The bucket of each utterance: the largest crop length <= its length, else the smallest.

  Args:
    lengths: int[N] utterance lengths in samples.
    crop_lengths: sorted, increasing crop lengths.

  Returns:
    int[N] indices into `crop_lengths`.
  """
  return np.maximum(np.searchsorted(crop_lengths, lengths, side="right") - 1, 0)


class BatchPlan:
  """Which utterances form each global batch, for any epoch, from the lengths alone."""

  def __init__(
    self,
    lengths: np.ndarray,
    crop_lengths: tuple[int, ...],
    utterances: np.ndarray,
    batch_size: int,
    seed: int,
  ):
    """Assigns every record to its bucket.

    Args:
      lengths: int[N] length of every source record, in samples.
      crop_lengths: sorted, increasing crop lengths (one bucket each).
      utterances: int[U] the records to batch (those long enough).
      batch_size: the global batch size.
      seed: the data seed, identical on every process.
    """
    self.crop_lengths = crop_lengths
    self.buckets = assign_buckets(lengths, crop_lengths)  # [N]
    self.batch_size = batch_size
    self.seed = seed
    # Sorted records of each bucket: also the order that decode-failure substitution walks.
    in_use = self.buckets[utterances]
    self.members = [utterances[in_use == b] for b in range(len(crop_lengths))]
    self.batches_per_epoch = sum(len(m) // batch_size for m in self.members)
    self._cache = (-1, None)  # (epoch, plan); a grain worker walks one epoch at a time

  def epoch(self, epoch: int) -> np.ndarray:
    """int[batches_per_epoch, batch_size]: the source records of every global batch of `epoch`."""
    cached_epoch, plan = self._cache
    if cached_epoch == epoch:
      return plan
    rng = np.random.default_rng([self.seed, _PLAN_STREAM, epoch])
    order = rng.permutation(np.concatenate(self.members))  # [U] shuffled records
    groups = []
    for b in range(len(self.members)):
      in_bucket = order[self.buckets[order] == b]
      num_full = len(in_bucket) // self.batch_size * self.batch_size  # drop the remainder
      groups.append(in_bucket[:num_full].reshape(-1, self.batch_size))
    plan = np.concatenate(groups)  # [batches_per_epoch, batch_size], grouped by bucket
    plan = plan[rng.permutation(len(plan))]
    self._cache = (epoch, plan)
    return plan

  def batch(self, index: int) -> tuple[int, np.ndarray]:
    """(epoch, int[batch_size] records) of global batch `index`, counted from the first epoch."""
    epoch, within = divmod(index, self.batches_per_epoch)
    return epoch, self.epoch(epoch)[within]

  def crop_length(self, record: int) -> int:
    return self.crop_lengths[self.buckets[record]]


def crop_or_pad(wave: np.ndarray, length: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
  """A random `length`-sample window of `wave`, or `wave` zero-padded to `length`.

  Returns:
    (float32[length], number of valid samples).
  """
  if len(wave) >= length:
    start = rng.integers(0, len(wave) - length + 1)
    return wave[start : start + length], length
  return np.pad(wave, (0, length - len(wave))), len(wave)


def normalize_utterance(wave: np.ndarray, num_valid: int) -> np.ndarray:
  """Zero mean, unit variance over the first `num_valid` samples; the padding stays 0."""
  valid = wave[:num_valid]
  out = np.zeros_like(wave)
  out[:num_valid] = (valid - valid.mean()) / np.sqrt(valid.var() + _NORM_EPS)
  return out


class LoadBatch(grain.transforms.Map):
  """Global batch index -> this process's rows of that batch, loaded, cropped and normalised.

  Module level and picklable (grain may run it in worker processes). Counters it updates
  (`stats.decode_failures`) are only visible in the process that ran it.
  """

  def __init__(
    self,
    source: sources.AudioSource,
    plan: BatchPlan,
    rows: slice,
    normalize: bool,
  ):
    self.source = source
    self.plan = plan
    self.rows = rows
    self.normalize = normalize
    self._failures = batching.DecodeFailures(source, "the next record of its length bucket")

  def map(self, element: int) -> dict[str, np.ndarray]:
    epoch, records = self.plan.batch(element)
    records = records[self.rows]  # [b]
    length = self.plan.crop_length(records[0])  # one bucket per batch
    audio = np.zeros((len(records), length), np.float32)  # [b, T]
    num_valid = np.zeros(len(records), np.int64)  # [b]
    for row, record in enumerate(records):
      used, wave = self._read(int(record))
      rng = np.random.default_rng([self.plan.seed, _CROP_STREAM, epoch, used])
      wave, num_valid[row] = crop_or_pad(wave, length, rng)
      audio[row] = normalize_utterance(wave, num_valid[row]) if self.normalize else wave
    padding_mask = np.arange(length)[None, :] >= num_valid[:, None]  # [b, T]
    return {"audio": audio, "padding_mask": padding_mask}

  def _read(self, record: int) -> tuple[int, np.ndarray]:
    """Decodes `record`; if that fails, the next record of its bucket that decodes.

    The header check at index time makes this rare (a file changed or truncated since); a
    deterministic substitute keeps the batch shape and the resumed iterator exact.
    """
    members = self.plan.members[self.plan.buckets[record]]
    start = int(np.searchsorted(members, record))
    for candidate in np.roll(members, -start):
      candidate = int(candidate)
      try:
        wave = self.source[candidate]
      except (RuntimeError, OSError) as e:  # soundfile.LibsndfileError is a RuntimeError
        self._failures(candidate, e)
        continue
      if len(wave):
        return candidate, wave
      self._failures(candidate, "decoded to 0 samples")
    raise RuntimeError(
      f"{self.source.name}: no record of the length bucket of {self.source.describe(record)} "
      "decodes any more"
    )


@dataclasses.dataclass(frozen=True)
class AudioPretrainDataset:
  """The training input: iterate it for batches; checkpoint the iterator with orbax.

  Attributes:
    batches: random access, global batch index (across epochs) -> this process's batch.
    iter_dataset: `batches` as an (infinite) grain IterDataset; `iter()` of it is a
      `grain.DatasetIterator` whose `get_state()`/`set_state()` resume exactly.
    stats: what indexing skipped or changed (and decode failures seen in this process).
    batches_per_epoch: global batches per pass over the source.
    crop_lengths: the possible T of a batch, increasing.
  """

  batches: grain.MapDataset
  iter_dataset: grain.IterDataset
  stats: sources.AudioStats
  batches_per_epoch: int
  crop_lengths: tuple[int, ...]

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.iter_dataset)


def make_audio_pretrain_dataset(
  input_cfg, *, seed: int, process_index: int = 0, process_count: int = 1
) -> AudioPretrainDataset:
  """The pretraining pipeline that `config.input` describes.

  Args:
    input_cfg: `config.input`: source, path, split, tfds_data_dir, sample_rate, batch_size
      (global), crop_lengths, min_length, normalize, num_workers.
    seed: data seed (non-negative), the same on every process.
    process_index: this process (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).

  Returns:
    The dataset; `iter()` of it yields this process's `batch_size // process_count` rows of
    every global batch.

  Raises:
    ValueError: bad config values, an unusable source, or too few utterances for one batch.
    FileNotFoundError: the source's path does not exist.
  """
  batch_size = input_cfg.batch_size
  rows = batching.process_rows(batch_size, process_index, process_count)
  crop_lengths = tuple(sorted(set(int(c) for c in input_cfg.crop_lengths)))
  if not crop_lengths or crop_lengths[0] <= 0:
    raise ValueError(f"config.input.crop_lengths must be positive, got {input_cfg.crop_lengths}")

  source = sources.make_source(input_cfg)
  utterances = _long_enough(source, input_cfg.min_length)
  plan = BatchPlan(source.lengths, crop_lengths, utterances, batch_size, seed)
  _log_summary(source, plan)
  if plan.batches_per_epoch == 0:
    raise ValueError(
      f"{source.name}: no length bucket holds a full global batch of {batch_size} "
      f"({_bucket_counts(plan)}); lower batch_size or use fewer crop_lengths"
    )

  batches, iter_dataset = batching.endless_batches(
    LoadBatch(source, plan, rows, input_cfg.normalize),
    num_workers=input_cfg.num_workers,
    read_threads=_READ_THREADS,
    prefetch=_PREFETCH_BATCHES,
  )
  return AudioPretrainDataset(
    batches, iter_dataset, source.stats, plan.batches_per_epoch, crop_lengths
  )


def _long_enough(source: sources.AudioSource, min_length: int) -> np.ndarray:
  """int[U] records of at least `min_length` samples; logs and counts the others."""
  short = np.flatnonzero(source.lengths < min_length)
  for record in short:
    logging.info(
      "Skipping short utterance (%d < %d samples): %s",
      source.lengths[record],
      min_length,
      source.describe(record),
    )
  source.stats.skipped_short += len(short)
  return np.flatnonzero(source.lengths >= min_length)


def _bucket_counts(plan: BatchPlan) -> str:
  return ", ".join(f"{c}: {len(m)}" for c, m in zip(plan.crop_lengths, plan.members))


def _log_summary(source: sources.AudioSource, plan: BatchPlan) -> None:
  stats = source.stats
  logging.info(
    "%s: %d of %d records used; skipped %d short, %d unreadable, %d empty; %d downmixed. "
    "Buckets (crop length: count) %s -> %d global batches of %d per epoch.",
    source.name,
    sum(len(m) for m in plan.members),
    stats.listed,
    stats.skipped_short,
    stats.skipped_unreadable,
    stats.skipped_empty,
    stats.downmixed,
    _bucket_counts(plan),
    plan.batches_per_epoch,
    plan.batch_size,
  )
