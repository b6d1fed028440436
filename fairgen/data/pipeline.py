"""A deterministic, index-based input pipeline with per-process sharding and prefetch.

The examples of step ``s`` are a pure function of ``(seed, s)``: the stream is the
concatenation of per-epoch permutations, and step ``s`` takes positions
``[s * B, (s + 1) * B)`` of it. The pipeline's position is therefore the training step, which
the checkpoint already holds, and a resumed run sees exactly the batches an uninterrupted run
would have seen, with no iterator state to save. Each process reads only its own slice of the
global batch, and the slices are assembled into one global ``jax.Array`` sharded on the mesh's
data axis.

We use this sampler rather than grain: any random-access source (in-memory arrays, a
``tfds.data_source``) plugs in, and resumption needs no checkpointed iterator.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator

import jax
import numpy as np

from fairgen import parallel
from fairgen.data import base


class IndexSampler:
  """Maps a step to the global example indices of its batch."""

  def __init__(self, num_examples: int, global_batch: int, seed: int):
    if num_examples <= 0:
      raise base.DataError("Cannot sample batches from an empty split.")
    self.num_examples = num_examples
    self.global_batch = global_batch
    self.seed = seed
    self._cached_epoch = -1
    self._cached_perm = np.empty(0, np.int64)

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._cached_epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._cached_perm = rng.permutation(self.num_examples)
      self._cached_epoch = epoch
    return self._cached_perm

  def indices(self, step: int) -> np.ndarray:
    """The ``global_batch`` example indices of ``step`` (epochs wrap around)."""
    position = step * self.global_batch
    out = []
    while len(out) < self.global_batch:
      epoch, offset = divmod(position + len(out), self.num_examples)
      take = min(self.global_batch - len(out), self.num_examples - offset)
      out.extend(self._permutation(epoch)[offset:offset + take])
    return np.asarray(out, np.int64)


class WeightedSampler:
  """Draws each step's batch with replacement, example ``i`` with probability ``probs[i]``.

  The batch of step ``s`` is a pure function of ``(seed, s)`` (one generator per step), so
  resumption stays exact without any sampler state. Used for resampling by inverse group
  frequency (``fairgen.fairness``).
  """

  def __init__(self, probs: np.ndarray, global_batch: int, seed: int):
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 1 or len(probs) == 0:
      raise base.DataError("Cannot sample batches from an empty split.")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0) or probs.sum() <= 0:
      raise base.DataError("Sampling probabilities must be finite, >= 0 and not all 0.")
    self.probs = probs / probs.sum()
    self.cdf = np.cumsum(self.probs)
    self.num_examples = len(probs)
    self.global_batch = global_batch
    self.seed = seed

  def indices(self, step: int) -> np.ndarray:
    """The ``global_batch`` example indices of ``step``."""
    u = np.random.default_rng([self.seed, step, 1]).random(self.global_batch)
    idx = np.searchsorted(self.cdf, u * self.cdf[-1], side="right")
    return np.minimum(idx, self.num_examples - 1).astype(np.int64)


class PoissonSampler:
  """Poisson sampling for DP-SGD, padded to fixed shapes.

  Each of ``draws`` batches per step takes every example independently with probability
  ``rate``; the sampled indices fill the first rows of a ``batch_size`` block, padding rows
  repeat index 0 with mask 0, and a draw of more than ``batch_size`` examples keeps a
  uniformly random subset of them (truncation, which ``fairgen.privacy.accounting``
  accounts for). The step's batches are a pure function of ``(seed, step)``, so
  resumption stays exact. ``mask(step)`` is the batch's ``mask`` column.
  """

  def __init__(self, num_examples: int, batch_size: int, rate: float, seed: int,
               draws: int = 1):
    if num_examples <= 0:
      raise base.DataError("Cannot sample batches from an empty split.")
    if not 0 < rate <= 1:
      raise ValueError(f"The Poisson sampling rate must be in (0, 1], got {rate}.")
    self.num_examples, self.batch_size, self.rate = num_examples, batch_size, rate
    self.seed, self.draws = seed, draws
    self.global_batch = batch_size * draws
    self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

  def _sample(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    if self._cached is None or self._cached[0] != step:
      idx = np.zeros(self.global_batch, np.int64)
      mask = np.zeros(self.global_batch, np.float32)
      for d in range(self.draws):
        rng = np.random.default_rng([self.seed, step, 2, d])
        chosen = np.flatnonzero(rng.random(self.num_examples) < self.rate)
        if len(chosen) > self.batch_size:
          chosen = np.sort(rng.choice(chosen, self.batch_size, replace=False))
        start = d * self.batch_size
        idx[start:start + len(chosen)] = chosen
        mask[start:start + len(chosen)] = 1.0
      self._cached = (step, idx, mask)
    return self._cached[1], self._cached[2]

  def indices(self, step: int) -> np.ndarray:
    """The ``global_batch`` example indices of ``step`` (padding rows: index 0)."""
    return self._sample(step)[0]

  def mask(self, step: int) -> np.ndarray:
    """1.0 for the sampled rows of ``step``'s batch, 0.0 for its padding rows."""
    return self._sample(step)[1]


def process_slice(global_batch: int, process_index: int, process_count: int) -> slice:
  """The part of a global batch that one process loads."""
  if global_batch % process_count:
    raise ValueError(
        f"The global batch {global_batch} must be divisible by the process count "
        f"{process_count}.")
  local = global_batch // process_count
  return slice(process_index * local, (process_index + 1) * local)


class Loader:
  """Yields ``(step, batch)`` for consecutive steps, prefetched to device in a thread.

  ``sampler`` picks each step's examples (default: ``IndexSampler``, epochs of permutations).

  ``batch`` is a dict of global ``jax.Array`` sharded by ``sharding`` (the data axis).
  ``wait_seconds`` accumulates the time the consumer spent blocked on input.

  ``dispatch(step)``: how many consecutive steps, from ``step``, the consumer runs in one
  program (``train.steps_per_dispatch``). Their batches are stacked on the host and
  transferred as one array per key, ``[n, global_batch, ...]`` with the batch axis sharded,
  yielded once as ``(step, stacked)``; a dispatch of one step yields a plain batch.
  """

  def __init__(self, source: base.Source, global_batch: int, seed: int,
               sharding: jax.sharding.Sharding, start_step: int, end_step: int,
               prefetch: int = 2,
               sampler: IndexSampler | WeightedSampler | PoissonSampler | None = None,
               dispatch: Callable[[int], int] | None = None):
    self.source = source
    self.sampler = sampler or IndexSampler(len(source), global_batch, seed)
    if self.sampler.global_batch != global_batch:
      raise ValueError(f"The sampler draws {self.sampler.global_batch} examples per step, "
                       f"the loader needs {global_batch}.")
    self.sharding = sharding
    self.start_step, self.end_step = start_step, end_step
    self.global_batch = global_batch
    self.dispatch = dispatch
    self._slice = process_slice(global_batch, jax.process_index(), jax.process_count())
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    self._stop = threading.Event()
    self.wait_seconds = 0.0
    self._thread = threading.Thread(target=self._produce, daemon=True)
    self._thread.start()

  def host_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's slice of the batch of ``step``, as NumPy arrays (with the ``mask``
    column of a Poisson sampler)."""
    batch = self.source.get(self.sampler.indices(step)[self._slice])
    if isinstance(self.sampler, PoissonSampler):
      batch["mask"] = self.sampler.mask(step)[self._slice]
    return batch

  def device_batch(self, step: int, size: int = 1) -> dict[str, jax.Array]:
    """The batch of ``step`` on the devices, or the ``size`` batches from ``step`` stacked
    (see ``dispatch``)."""
    if size == 1:
      return {k: jax.make_array_from_process_local_data(self.sharding, v)
              for k, v in self.host_batch(step).items()}
    local = [self.host_batch(s) for s in range(step, step + size)]
    stacked = parallel.stacked_sharding(self.sharding)
    out = {}
    for k in local[0]:
      x = np.stack([b[k] for b in local])
      out[k] = jax.make_array_from_process_local_data(
          stacked, x, (size, self.global_batch, *x.shape[2:]))
    return out

  def _put(self, item: object) -> bool:
    """Queues ``item`` unless the loader is stopped first; whether it did."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self) -> None:
    try:
      step = self.start_step
      while step < self.end_step:
        size = min(self.dispatch(step), self.end_step - step) if self.dispatch else 1
        if not self._put((step, self.device_batch(step, size))):
          return
        step += size
      self._put(None)  # The end.
    except BaseException as e:  # Surface loader errors in the consumer thread.
      self._put(e)

  def __iter__(self) -> Iterator[tuple[int, dict[str, jax.Array]]]:
    while True:
      start = time.perf_counter()
      item = self._queue.get()
      self.wait_seconds += time.perf_counter() - start
      if isinstance(item, BaseException):
        raise item
      if item is None:
        return
      yield item

  def close(self) -> None:
    """Stops the prefetch thread."""
    self._stop.set()
    self._thread.join(timeout=5)
