"""What every pretraining pipeline shares: global batches, per-process rows and endless grain
datasets whose iterators resume exactly.

A pipeline is a picklable `load(index) -> this process's rows of global batch index`, a pure
function of the index; `endless_batches` maps it over 0, 1, 2, ... (epoch after epoch) so that
a grain iterator restored with `set_state` continues exactly where it stopped.
"""

import sys

import grain
import numpy as np
from absl import logging

_PLAN_STREAM = 0  # numpy seed stream of the per-epoch shuffle, apart from the pipelines' own


class EpochPlan:
  """Which records form each global batch, for any epoch: a shuffle per epoch, remainder dropped."""

  def __init__(self, num_records: int, batch_size: int, seed: int):
    self.num_records = num_records
    self.batch_size = batch_size
    self.seed = seed
    self.batches_per_epoch = num_records // batch_size
    self._cache = (-1, None)  # (epoch, plan); a grain worker walks one epoch at a time

  def epoch(self, epoch: int) -> np.ndarray:
    """int[batches_per_epoch, batch_size]: the records of every global batch of `epoch`."""
    cached_epoch, plan = self._cache
    if cached_epoch == epoch:
      return plan
    order = np.random.default_rng([self.seed, _PLAN_STREAM, epoch]).permutation(self.num_records)
    plan = order[: self.batches_per_epoch * self.batch_size].reshape(-1, self.batch_size)
    self._cache = (epoch, plan)
    return plan

  def batch(self, index: int) -> tuple[int, np.ndarray]:
    """(epoch, int[batch_size] records) of global batch `index`, counted from the first epoch."""
    epoch, within = divmod(index, self.batches_per_epoch)
    return epoch, self.epoch(epoch)[within]


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """Rows [p·b, (p+1)·b) of every global batch for process p of P (b = batch_size / P).

  The processes together see each global batch exactly once; all must use the same data seed.
  """
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
      f"config.input.batch_size={batch_size} (the global batch) must be positive and divisible "
      f"by process_count={process_count}"
    )
  rows = batch_size // process_count
  return slice(process_index * rows, (process_index + 1) * rows)


def endless_batches(
  load: grain.transforms.Map, *, num_workers: int, read_threads: int, prefetch: int
) -> tuple[grain.MapDataset, grain.IterDataset]:
  """(random-access batches, the same as an iterable dataset) over global batches 0, 1, 2, ...

  `read_threads` and `prefetch` bound the batches in flight: an element here is a whole batch,
  so grain's defaults (16 threads, 500 elements) would hold gigabytes. `num_workers` > 0 moves
  the loading into that many worker processes.
  """
  batches = grain.MapDataset.range(sys.maxsize).map(load)  # infinite: epoch after epoch
  iter_dataset = batches.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
  )
  if num_workers > 0:
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return batches, iter_dataset


class DecodeFailures:
  """Counts records that fail to decode (`source.stats.decode_failures`), warning once each.

  Picklable, so it travels with a pipeline's load transform into grain workers; the counts are
  then those of the process that ran it.
  """

  def __init__(self, source, substitute: str):
    self.source = source
    self.substitute = substitute  # what replaces a failed record, for the warning
    self._failed: set[int] = set()

  def __call__(self, record: int, error) -> None:
    self.source.stats.decode_failures += 1
    if record not in self._failed:
      self._failed.add(record)
      logging.warning(
        "Could not decode %s (%s); substituting %s",
        self.source.describe(record),
        error,
        self.substitute,
      )


def stratified_subset(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
  """Sorted indices of about `size` examples, the same share of every class, fixed by `seed`."""
  if size <= 0 or size >= len(labels):
    return np.arange(len(labels))
  rng = np.random.default_rng(seed)
  keep = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    count = max(1, round(size * len(members) / len(labels)))
    keep.append(rng.choice(members, count, replace=False))
  return np.sort(np.concatenate(keep))
