"""``fair.method='resample'``: batches drawn so that every group appears at its target rate.

Each example of group ``g`` is drawn with probability ``target[g] / count[g]``. Refused with
a ``privacy`` section: DP-SGD's accountant covers Poisson sampling only, not batches drawn by
group weight.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from fairgen import data
from fairgen.config import ConfigError
from fairgen.fairness import methods
from fairgen.fairness.registry import METHODS, Method


def resample_probs(groups: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Per-example sampling probabilities ``target[g] / count[g]``: group ``g`` at rate target[g].

  Raises:
    DataError: if a group with target mass has no examples.
  """
  counts = np.bincount(groups, minlength=len(target))
  missing = [g for g in range(len(target)) if target[g] > 0 and counts[g] == 0]
  if missing:
    raise data.DataError(f"Cannot resample: groups {missing} have no examples in the "
                         f"training split (group counts {counts.tolist()}).")
  per_group = np.where(counts > 0, target / np.maximum(counts, 1), 0.0)
  probs = per_group[groups]
  return probs / probs.sum()


def check(config: ml_collections.ConfigDict) -> None:
  """Refuses a DP run: its accountant does not cover batches drawn by group weight."""
  if "privacy" in config:
    raise ConfigError("fair.method='resample' draws batches by group weight, which Poisson "
                      "sampling's accountant does not cover; with privacy use "
                      "fair.method='importance' (with fair.clip) instead.")


def prepare(config: ml_collections.ConfigDict, source: data.Source, workdir: str,
            global_batch: int) -> tuple[data.Source, data.WeightedSampler]:
  """The source unchanged and a sampler drawing each group at its target rate."""
  del workdir  # Nothing is cached.
  groups = data.read_column(source, "attr").astype(np.int32)
  target = methods.target_distribution(config, source.spec.num_groups)
  return source, data.WeightedSampler(resample_probs(groups, target), global_batch,
                                      config.seed)


METHODS.register("resample")(Method(
    summary="batches drawn with probability target[g] / count[g]: every group at its rate",
    check=check, prepare=prepare))
