"""Random-access data sources and the errors every dataset raises.

A *source* is anything with ``len(source)`` and ``source.get(indices)`` returning a dict of
host (NumPy) arrays for those example indices: ``image`` float32 NHWC in [-1, 1] and
``label`` int32 (plus ``attr`` where a dataset carries a sensitive attribute). Because every
source is random access, the input pipeline can derive each batch from the step number alone,
which is what makes resumption exact (see ``pipeline.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol

import numpy as np


class DataError(ValueError):
  """Raised for missing, malformed or unavailable data; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What a model needs to know about a dataset: shapes, label and group cardinality.

  ``num_groups`` > 0 when examples carry a sensitive-attribute group id ``attr`` in
  [0, num_groups) (the biased datasets of ``bias.py``); 0 otherwise. ``bounded``: the
  values lie in [-1, 1] (images), so samplers clip to it; False for an autoencoder's
  latents (``fairgen.objectives.latent``), which are not clipped.
  """

  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  num_groups: int = 0
  bounded: bool = True


class Source(Protocol):
  """A random-access split of a dataset."""

  spec: DataSpec

  def __len__(self) -> int:
    ...

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the examples at ``indices`` as a dict of stacked NumPy arrays."""
    ...


def validate_arrays(name: str, arrays: Mapping[str, np.ndarray], spec: DataSpec) -> None:
  """Checks an in-memory split against its spec; raises DataError naming the problem."""
  images, labels = arrays["image"], arrays["label"]
  if len(images) == 0:
    raise DataError(f"Dataset {name!r}: the split is empty.")
  if images.shape[1:] != spec.image_shape:
    raise DataError(
        f"Dataset {name!r}: images have shape {images.shape[1:]}, expected {spec.image_shape}.")
  if images.dtype != np.float32:
    raise DataError(f"Dataset {name!r}: images have dtype {images.dtype}, expected float32.")
  if not np.all(np.isfinite(images)) or images.min() < -1.0 or images.max() > 1.0:
    raise DataError(
        f"Dataset {name!r}: pixel values must be finite and in [-1, 1], got "
        f"[{images.min()}, {images.max()}].")
  if len(labels) != len(images):
    raise DataError(f"Dataset {name!r}: {len(labels)} labels for {len(images)} images.")
  if labels.min() < 0 or labels.max() >= spec.num_classes:
    raise DataError(
        f"Dataset {name!r}: labels must be in [0, {spec.num_classes}), got "
        f"[{labels.min()}, {labels.max()}].")


class ArraySource:
  """A split held in host memory as NumPy arrays, one row per example.

  Image splits (the offline datasets) hold ``image`` and ``label``; tabular splits are the
  subclass ``fairgen.data.tabular.TabularSource``, which checks its own layout
  (``check_arrays``). Every split has a ``label`` array, whose length is the split's. The
  loaders' ``arrays`` may be read-only (cached and shared); ``get`` returns copies.
  """

  def __init__(self, spec: Any, arrays: Mapping[str, np.ndarray]):
    self.check_arrays(spec, arrays)
    self.spec = spec
    self.arrays = {k: np.asarray(v) for k, v in arrays.items()}

  @staticmethod
  def check_arrays(spec: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Raises DataError for arrays that do not fit ``spec`` (here: an image split's)."""
    validate_arrays(spec.name, arrays, spec)

  def __len__(self) -> int:
    return len(self.arrays["label"])

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the examples at ``indices`` (copies) as a dict of stacked arrays."""
    return {k: v[indices] for k, v in self.arrays.items()}


class MappedSource:
  """A lazily decoded random-access source (e.g. a TFDS ``data_source``)."""

  def __init__(self, spec: DataSpec, records: Any,
               decode: Callable[[Mapping[str, Any]], dict[str, np.ndarray]]):
    self.spec = spec
    self._records = records
    self._decode = decode

  def __len__(self) -> int:
    return len(self._records)

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    examples = [self._decode(self._records[int(i)]) for i in indices]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class SubsetSource:
  """Rows of another source, with extra per-row columns (e.g. ``attr``, ``is_ref``, ``weight``).

  Row ``i`` of this source is row ``rows[i]`` of ``source`` (all rows, in order, when
  ``rows`` is None) plus ``columns[k][i]`` for every extra column.
  """

  def __init__(self, source: Source, rows: np.ndarray | None = None,
               columns: Mapping[str, np.ndarray] | None = None, spec: DataSpec | None = None):
    self.source = source
    self.spec = spec or source.spec
    self.rows = None if rows is None else np.asarray(rows, np.int64)
    self.columns = {k: np.asarray(v) for k, v in (columns or {}).items()}
    for key, values in self.columns.items():
      if len(values) != len(self):
        raise DataError(f"Dataset {self.spec.name!r}: column {key!r} has {len(values)} rows, "
                        f"the source has {len(self)}.")

  def __len__(self) -> int:
    return len(self.source) if self.rows is None else len(self.rows)

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    out = self.source.get(indices if self.rows is None else self.rows[indices])
    out.update({k: v[indices] for k, v in self.columns.items()})
    return out


def column_in_memory(source: Source, key: str) -> np.ndarray | None:
  """One column of ``source`` where it is held in memory, else None (nothing is decoded)."""
  for holder in (getattr(source, "arrays", None), getattr(source, "columns", None)):
    if holder is not None and key in holder:
      return holder[key]
  return None


def read_column(source: Source, key: str, chunk: int = 1000) -> np.ndarray:
  """All values of one column of ``source`` (without decoding twice where it is in memory)."""
  values = column_in_memory(source, key)
  if values is not None:
    return values
  parts = []
  for start in range(0, len(source), chunk):
    batch = source.get(np.arange(start, min(start + chunk, len(source))))
    if key not in batch:
      raise DataError(f"Dataset {source.spec.name!r} has no {key!r} column; it has "
                      f"{sorted(batch)}.")
    parts.append(np.asarray(batch[key]))
  return np.concatenate(parts)


def stratified_split(labels: np.ndarray, test_fraction: float,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A deterministic per-class train/test split of example indices.

  The split belongs to the dataset's definition, so its seed is fixed, not the run's seed.
  """
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(len(idx) * test_fraction))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def to_unit_range(pixels: np.ndarray, max_value: float) -> np.ndarray:
  """Scales pixels from [0, max_value] to float32 [-1, 1]."""
  return (pixels.astype(np.float32) / (max_value / 2.0) - 1.0).astype(np.float32)
