"""UCI Adult as AIF360's ``load_preproc_data_adult(['sex'])`` prepares it.

This is the data of AIF360's adversarial-debiasing demo, whose published numbers
``experiments/repro/aif360_adversarial_debiasing.py`` reproduces. It differs from
``adult`` (``tabular.py``) on purpose:
- rows: adult.data and adult.test together (48,842). AIF360 keeps only its four columns
  before dropping missing values, and those four have none, so no row is dropped;
- features (18): one-hot age decade (<20 ... 60, >=70; 7 values) and education years (<6,
  6 ... 12, >12; 9 values), race (1 = White) and sex (1 = Male), the protected attribute
  included as a feature, as in AIF360;
- split: a seeded random 70/30 train/test split (AIF360's ``split([0.7], shuffle=True)``),
  ``split_seed`` choosing the permutation.
"""

from __future__ import annotations

import functools

import numpy as np

from fairgen.data import base
from fairgen.data import registry
from fairgen.data import tabular
from fairgen.data import uci

AGE_DECADES = ("10", "20", "30", "40", "50", "60", ">=70")
EDUCATION_YEARS = ("<6", "6", "7", "8", "9", "10", "11", "12", ">12")
TRAIN_FRACTION = 0.7


def _age_decade(age: int) -> str:
  return ">=70" if age >= 70 else str(age // 10 * 10)


def _education_years(years: int) -> str:
  return "<6" if years <= 5 else (">12" if years >= 13 else str(years))


@functools.lru_cache(maxsize=4)
def _arrays(adult_dir: str | None) -> tuple[tabular.TabularSpec, dict[str, np.ndarray]]:
  raw = np.concatenate([
      uci.read_adult_file(uci.data_file(
          adult_dir, name, "adult", "adult_dir", "adult.data and adult.test"))
      for name in ("adult.data", "adult.test")])
  col = {name: raw[:, i] for i, name in enumerate(uci.ADULT_COLUMNS)}
  table = {
      "age_decade": np.array([_age_decade(int(a)) for a in col["age"]]),
      "education_years": np.array([_education_years(int(e)) for e in col["education-num"]]),
      "race": (col["race"] == "White").astype(np.float32),
      "sex": (col["sex"] == "Male").astype(np.float32),
  }
  columns = tabular.build_layout(
      table, categorical=("age_decade", "education_years"), continuous=(),
      order=("age_decade", "education_years"),
      vocabularies={"age_decade": AGE_DECADES, "education_years": EDUCATION_YEARS})
  onehot = tabular.encode_rows(columns, table)
  features = np.concatenate([onehot, table["race"][:, None], table["sex"][:, None]], axis=1)
  # race and sex are already 0/1: they are kept unstandardised, as AIF360 does.
  start = columns[-1].stop
  columns += (tabular.Column("race", tabular.CONTINUOUS, start, 1),
              tabular.Column("sex", tabular.CONTINUOUS, start + 1, 1))
  spec = tabular.TabularSpec(
      name="adult_aif360", feature_dim=features.shape[1], num_classes=2, num_groups=2,
      sensitive="sex", privileged="sex == 'Male'", label_name="income == '>50K'",
      columns=columns)
  arrays = {"features": features.astype(np.float32),
            "label": (col["income"] == ">50K").astype(np.int32),
            "attr": table["sex"].astype(np.int32)}
  return spec, arrays


@registry.register("adult_aif360")
def adult_aif360(split: str, adult_dir: str | None = None,
                 split_seed: int = 0) -> tabular.TabularSource:
  """AIF360's preprocessed Adult (sex protected): 'train' (70%), 'test' (30%) or 'all'."""
  spec, arrays = _arrays(adult_dir)
  n = len(arrays["label"])
  perm = np.random.default_rng(split_seed).permutation(n)
  cut = int(TRAIN_FRACTION * n)
  parts = {"train": np.sort(perm[:cut]), "test": np.sort(perm[cut:]), "all": np.arange(n)}
  if split not in parts:
    raise base.DataError(
        f"Dataset 'adult_aif360' has splits 'train', 'test' and 'all', not {split!r}.")
  return tabular.TabularSource(spec, {k: v[parts[split]] for k, v in arrays.items()})
