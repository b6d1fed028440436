"""Tabular data: the encoded-row layout, encoding and decoding, and the in-memory source.

Every tabular split is a :class:`TabularSource`: random access to ``features`` (float32
``[n, D]``), ``label`` (int32, 1 = favourable outcome) and ``attr`` (int32, 1 = privileged
group, 0 = unprivileged), the convention of AIF360 and of :mod:`fairgen.metrics.fairness`.

Encoding. Categorical columns are one-hot encoded with a vocabulary fixed from the training
rows (sorted, or given); continuous columns are standardised with the training mean and
(population) standard deviation. Test rows whose category is absent from the training
vocabulary get an all-zero block (they are not an error: a model sees "none of the known
values"). :class:`Column` records where each original column lives in the encoded vector,
so :func:`decode_rows` turns model outputs (e.g. a tabular GAN's samples) back into a table.
The datasets themselves are read by ``uci.py`` (Adult, German) and ``adult_aif360.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from fairgen.data import base

CATEGORICAL = "categorical"
CONTINUOUS = "continuous"


@dataclasses.dataclass(frozen=True)
class Column:
  """Where one original column lives in the encoded feature vector.

  A ``'categorical'`` column is the one-hot block ``features[:, start:start + width]``
  over ``categories``; a ``'continuous'`` one is ``(value - mean) / std`` at ``start``
  (``width`` 1), with the training mean and population standard deviation.
  """

  name: str
  kind: str
  start: int
  width: int
  categories: tuple[str, ...] = ()
  mean: float = 0.0
  std: float = 1.0

  @property
  def stop(self) -> int:
    return self.start + self.width


@dataclasses.dataclass(frozen=True)
class TabularSpec:
  """What a model needs to know about a tabular dataset.

  Attributes:
    name: dataset name.
    feature_dim: length ``D`` of the encoded feature vector.
    num_classes: label cardinality (2: 1 is the favourable outcome).
    num_groups: sensitive-attribute cardinality (2).
    sensitive: name of the sensitive attribute (e.g. ``'sex'``).
    privileged: which rows have ``attr == 1``, e.g. ``"sex == 'Male'"``.
    label_name: which rows have ``label == 1``, e.g. ``"income == '>50K'"``.
    columns: the layout of ``features``, in order, covering ``[0, feature_dim)``.
    audit_groups: for splits with a ``groups`` array (k-way or intersectional groups that
      evaluation reports on, beside the binary ``attr``): the attribute values of each
      group id, e.g. ``(('Female', 'Black'), ...)``; empty otherwise.
    audit_privileged: the privileged group's id among ``audit_groups``, or -1 for none.
    audit_columns: the names of the attributes whose values ``audit_groups`` lists, in
      order (e.g. ``('sex', 'race')``); empty without audit groups.
  """

  name: str
  feature_dim: int
  num_classes: int
  num_groups: int
  sensitive: str
  privileged: str
  label_name: str
  columns: tuple[Column, ...]
  audit_groups: tuple[tuple[str, ...], ...] = ()
  audit_privileged: int = -1
  audit_columns: tuple[str, ...] = ()

  @property
  def feature_shape(self) -> tuple[int]:
    return (self.feature_dim,)

  def column(self, name: str) -> Column:
    """Returns the layout of the column called ``name``."""
    for col in self.columns:
      if col.name == name:
        return col
    raise KeyError(f"Dataset {self.name!r} has no feature column {name!r}; columns: "
                   f"{', '.join(c.name for c in self.columns)}.")


def build_layout(table: Mapping[str, np.ndarray], categorical: Sequence[str],
                 continuous: Sequence[str], order: Sequence[str],
                 vocabularies: Mapping[str, Sequence[str]] | None = None
                 ) -> tuple[Column, ...]:
  """Fixes the encoding from (training) rows: vocabularies and standardisation statistics.

  Args:
    table: column name -> 1-D array (strings for categoricals, floats for continuous).
    categorical: names of the one-hot encoded columns.
    continuous: names of the standardised columns.
    order: the order of the columns in the feature vector (a subset of the two above).
    vocabularies: fixed vocabularies by column; other categoricals use the sorted values
      present in ``table``.

  Returns:
    The layout, one :class:`Column` per name in ``order``.
  """
  vocabularies = vocabularies or {}
  columns, start = [], 0
  for name in order:
    if name in categorical:
      cats = tuple(vocabularies.get(name) or sorted(set(table[name].tolist())))
      columns.append(Column(name, CATEGORICAL, start, len(cats), categories=cats))
    elif name in continuous:
      values = np.asarray(table[name], np.float64)
      std = float(values.std())
      columns.append(Column(name, CONTINUOUS, start, 1, mean=float(values.mean()),
                            std=std if std > 0 else 1.0))
    else:
      raise ValueError(f"Column {name!r} is neither categorical nor continuous.")
    start += columns[-1].width
  return tuple(columns)


def encode_rows(columns: Sequence[Column], table: Mapping[str, np.ndarray]) -> np.ndarray:
  """Encodes a table with a fixed layout: float32 ``[n, D]``.

  Categories outside a column's vocabulary get an all-zero one-hot block.
  """
  n = len(next(iter(table.values())))
  features = np.zeros((n, columns[-1].stop if columns else 0), np.float32)
  for col in columns:
    values = table[col.name]
    if col.kind == CATEGORICAL:
      index = {c: i for i, c in enumerate(col.categories)}
      codes = np.array([index.get(v, -1) for v in values.tolist()], np.int64)
      known = codes >= 0
      features[np.flatnonzero(known), col.start + codes[known]] = 1.0
    else:
      features[:, col.start] = (np.asarray(values, np.float64) - col.mean) / col.std
  return features


def decode_rows(spec: TabularSpec, features: np.ndarray) -> dict[str, np.ndarray]:
  """Maps encoded (real or generated) feature vectors back to a table.

  Categoricals take the argmax of their block (so logits, probabilities or one-hot
  vectors all decode; an all-zero block decodes to the first category); continuous
  columns are de-standardised.

  Args:
    spec: the dataset's spec, whose ``columns`` give the layout.
    features: array ``[n, spec.feature_dim]``.

  Returns:
    Column name -> array ``[n]``: strings for categoricals, float64 for continuous.
  """
  features = np.asarray(features)
  if features.ndim != 2 or features.shape[1] != spec.feature_dim:
    raise ValueError(f"Dataset {spec.name!r}: expected features of shape [n, "
                     f"{spec.feature_dim}], got {features.shape}.")
  table = {}
  for col in spec.columns:
    block = features[:, col.start:col.stop]
    if col.kind == CATEGORICAL:
      table[col.name] = np.asarray(col.categories)[np.argmax(block, axis=1)]
    else:
      table[col.name] = block[:, 0].astype(np.float64) * col.std + col.mean
  return table


def validate_tabular(spec: TabularSpec, arrays: Mapping[str, np.ndarray]) -> None:
  """Checks an in-memory split against its spec; raises DataError naming the problem."""
  name = spec.name
  for key in ("features", "label", "attr"):
    if key not in arrays:
      raise base.DataError(f"Dataset {name!r}: the split has no {key!r} array.")
  features, labels, attrs = arrays["features"], arrays["label"], arrays["attr"]
  if features.ndim != 2 or len(features) == 0:
    raise base.DataError(f"Dataset {name!r}: features must be a non-empty [n, D] array, "
                         f"got shape {features.shape}.")
  if features.shape[1] != spec.feature_dim:
    raise base.DataError(f"Dataset {name!r}: features have {features.shape[1]} columns, "
                         f"expected {spec.feature_dim}.")
  if spec.columns and spec.columns[-1].stop != spec.feature_dim:
    raise base.DataError(f"Dataset {name!r}: the column layout covers "
                         f"{spec.columns[-1].stop} features, not {spec.feature_dim}.")
  if features.dtype != np.float32:
    raise base.DataError(f"Dataset {name!r}: features have dtype {features.dtype}, "
                         f"expected float32.")
  if not np.all(np.isfinite(features)):
    raise base.DataError(f"Dataset {name!r}: features contain NaN or infinite values.")
  for key, values, count in (("label", labels, spec.num_classes),
                             ("attr", attrs, spec.num_groups)):
    if values.shape != (len(features),):
      raise base.DataError(f"Dataset {name!r}: {key} has shape {values.shape}, expected "
                           f"({len(features)},).")
    if values.dtype != np.int32:
      raise base.DataError(f"Dataset {name!r}: {key} has dtype {values.dtype}, expected int32.")
    if values.min() < 0 or values.max() >= count:
      raise base.DataError(f"Dataset {name!r}: {key} values must be in [0, {count}), got "
                           f"[{values.min()}, {values.max()}].")
  if ("groups" in arrays) != bool(spec.audit_groups):
    raise base.DataError(f"Dataset {name!r}: a 'groups' array and spec.audit_groups go "
                         "together.")
  if spec.audit_groups and any(len(g) != len(spec.audit_columns) for g in spec.audit_groups):
    raise base.DataError(f"Dataset {name!r}: each audit group needs one value per audit "
                         f"column {spec.audit_columns}.")
  if "groups" in arrays:
    groups = arrays["groups"]
    if (groups.shape != (len(features),) or groups.dtype != np.int32 or groups.min() < 0
        or groups.max() >= len(spec.audit_groups)):
      raise base.DataError(f"Dataset {name!r}: groups must be int32 ids in "
                           f"[0, {len(spec.audit_groups)}), one per row.")


class TabularSource(base.ArraySource):
  """A tabular split held in host memory: ``features``, ``label`` and ``attr`` arrays.

  An :class:`fairgen.data.base.ArraySource` whose arrays are checked against a
  :class:`TabularSpec` (``validate_tabular``). It is its own type because the tabular
  evaluators refuse a source that is not one (``isinstance``).
  """

  spec: TabularSpec
  check_arrays = staticmethod(validate_tabular)


def intersectional_groups(*attributes: np.ndarray) -> tuple[np.ndarray, list[tuple[Any, ...]]]:
  """One group id per row for the combination of several sensitive attributes.

  Args:
    *attributes: ``[n]`` arrays of any hashable values (e.g. sex and race strings).

  Returns:
    ``(groups [n] int32, values)``: ``values[g]`` is the tuple of attribute values of group
    ``g``, in sorted order of the combinations that occur.
  """
  if not attributes:
    raise ValueError("intersectional_groups needs at least one attribute.")
  columns = [np.asarray(a).ravel() for a in attributes]
  if any(len(c) != len(columns[0]) for c in columns):
    raise ValueError(f"Attributes differ in length: {[len(c) for c in columns]}.")
  rows = list(zip(*[c.tolist() for c in columns]))
  values = sorted(set(rows))
  index = {v: i for i, v in enumerate(values)}
  return np.array([index[r] for r in rows], np.int32), values
