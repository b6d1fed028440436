"""Fairness metrics against fairlearn / scikit-learn and hand-computed cases."""

import warnings

import numpy as np
import pytest
from fairlearn import metrics as flm
from sklearn import metrics as skm

from fairgen.data import tabular
from fairgen.metrics import fairness


def _random_case(seed: int, n: int = 400):
  """Correlated labels/predictions with unbalanced, group-dependent base rates."""
  rng = np.random.default_rng(seed)
  attr = (rng.random(n) < 0.65).astype(np.int32)
  y_true = (rng.random(n) < np.where(attr == 1, 0.35, 0.2)).astype(np.int32)
  flip = rng.random(n) < np.where(attr == 1, 0.2, 0.35)
  y_pred = np.where(flip, 1 - y_true, y_true).astype(np.int32)
  return y_true, y_pred, attr


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_fairlearn(seed):
  y_true, y_pred, attr = _random_case(seed)
  frame = flm.MetricFrame(
      metrics={"sr": flm.selection_rate, "tpr": flm.true_positive_rate,
               "fpr": flm.false_positive_rate},
      y_true=y_true, y_pred=y_pred, sensitive_features=attr).by_group
  u, p = frame.loc[0], frame.loc[1]  # Unprivileged, privileged.
  report = fairness.classification_report(y_true, y_pred, attr)
  expected = {
      "statistical_parity_difference": u.sr - p.sr,
      "disparate_impact": u.sr / p.sr,
      "equal_opportunity_difference": u.tpr - p.tpr,
      "average_odds_difference": 0.5 * ((u.fpr - p.fpr) + (u.tpr - p.tpr)),
      "demographic_parity_difference": flm.demographic_parity_difference(
          y_true, y_pred, sensitive_features=attr),
      "equalized_odds_difference": flm.equalized_odds_difference(
          y_true, y_pred, sensitive_features=attr),
      "accuracy": skm.accuracy_score(y_true, y_pred),
      "balanced_accuracy": skm.balanced_accuracy_score(y_true, y_pred),
      "selection_rate_unpriv": u.sr, "selection_rate_priv": p.sr,
      "tpr_unpriv": u.tpr, "tpr_priv": p.tpr, "fpr_unpriv": u.fpr, "fpr_priv": p.fpr,
  }
  for name, value in expected.items():
    assert report[name] == pytest.approx(value, abs=1e-12), name
  # fairlearn's ratio is symmetric: min(DI, 1/DI).
  di = report["disparate_impact"]
  assert flm.demographic_parity_ratio(y_true, y_pred, sensitive_features=attr) == (
      pytest.approx(min(di, 1 / di)))
  assert report["demographic_parity_difference"] == pytest.approx(
      abs(report["statistical_parity_difference"]))


def test_hand_computed_case():
  attr = np.array([1, 1, 1, 1, 0, 0, 0, 0])
  y_true = np.array([1, 1, 0, 0, 1, 1, 0, 0])
  y_pred = np.array([1, 1, 0, 0, 1, 0, 1, 1])
  # priv: SR 1/2, TPR 1, FPR 0. unpriv: SR 3/4, TPR 1/2, FPR 1.
  assert fairness.statistical_parity_difference(y_pred, attr) == pytest.approx(0.25)
  assert fairness.demographic_parity_difference(y_pred, attr) == pytest.approx(0.25)
  assert fairness.disparate_impact(y_pred, attr) == pytest.approx(1.5)
  assert fairness.equal_opportunity_difference(y_true, y_pred, attr) == pytest.approx(-0.5)
  assert fairness.average_odds_difference(y_true, y_pred, attr) == pytest.approx(0.25)
  assert fairness.equalized_odds_difference(y_true, y_pred, attr) == pytest.approx(1.0)
  assert fairness.accuracy(y_true, y_pred) == pytest.approx(5 / 8)
  assert fairness.balanced_accuracy(y_true, y_pred) == pytest.approx(0.5 * (3 / 4 + 2 / 4))


def test_hand_computed_unequal_groups():
  attr = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0])
  y_true = np.array([1, 1, 1, 0, 0, 0, 1, 1, 0])
  y_pred = np.array([1, 1, 0, 1, 0, 0, 0, 1, 0])
  # priv: SR 3/6, TPR 2/3, FPR 1/3. unpriv: SR 1/3, TPR 1/2, FPR 0.
  assert fairness.statistical_parity_difference(y_pred, attr) == pytest.approx(1 / 3 - 1 / 2)
  assert fairness.disparate_impact(y_pred, attr) == pytest.approx((1 / 3) / (1 / 2))
  assert fairness.equal_opportunity_difference(y_true, y_pred, attr) == pytest.approx(
      1 / 2 - 2 / 3)
  assert fairness.average_odds_difference(y_true, y_pred, attr) == pytest.approx(
      0.5 * ((0 - 1 / 3) + (1 / 2 - 2 / 3)))
  assert fairness.equalized_odds_difference(y_true, y_pred, attr) == pytest.approx(1 / 3)


def test_undefined_values_are_nan_without_warnings():
  y_true = np.array([1, 0, 1, 0])
  y_pred = np.array([1, 0, 0, 1])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    # No unprivileged rows at all.
    report = fairness.classification_report(y_true, y_pred, np.ones(4, int))
    for name in ("statistical_parity_difference", "demographic_parity_difference",
                 "disparate_impact", "equal_opportunity_difference",
                 "average_odds_difference", "equalized_odds_difference"):
      assert np.isnan(report[name]), name
    assert report["accuracy"] == 0.5 and report["n_unpriv"] == 0
    # The unprivileged group has no positives: TPR-based metrics are undefined, SPD is not.
    attr = np.array([1, 0, 1, 0])
    report = fairness.classification_report(y_true, y_pred, attr)
    assert np.isnan(report["tpr_unpriv"])
    assert np.isnan(report["equal_opportunity_difference"])
    assert np.isnan(report["average_odds_difference"])
    assert report["statistical_parity_difference"] == pytest.approx(0.0)
    # No privileged positive prediction: DI is undefined.
    assert np.isnan(fairness.disparate_impact(np.array([0, 1, 0, 0]), attr))
    # Empty input.
    assert np.isnan(fairness.accuracy(np.zeros(0), np.zeros(0)))
    assert np.isnan(fairness.balanced_accuracy(np.zeros(0), np.zeros(0)))


def test_balanced_accuracy_single_class_matches_sklearn():
  y_true, y_pred = np.ones(6, int), np.array([1, 1, 0, 1, 0, 1])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # scikit-learn warns about the absent class.
    expected = skm.balanced_accuracy_score(y_true, y_pred)
  assert fairness.balanced_accuracy(y_true, y_pred) == pytest.approx(expected)


def test_rejects_non_binary_inputs():
  with pytest.raises(ValueError, match="binary"):
    fairness.statistical_parity_difference(np.array([0.2, 0.9]), np.array([0, 1]))
  with pytest.raises(ValueError, match="1-D"):
    fairness.accuracy(np.zeros(3), np.zeros(4))


def test_jax_arrays_under_jit_match_numpy():
  import jax
  import jax.numpy as jnp

  y_true, y_pred, attr = _random_case(7, n=200)
  names = ("equal_opportunity_difference", "average_odds_difference",
           "equalized_odds_difference")

  @jax.jit
  def metrics(t, p, a):
    out = {n: getattr(fairness, n)(t, p, a) for n in names}
    out["statistical_parity_difference"] = fairness.statistical_parity_difference(p, a)
    out["disparate_impact"] = fairness.disparate_impact(p, a)
    out["balanced_accuracy"] = fairness.balanced_accuracy(t, p)
    return out

  got = metrics(jnp.asarray(y_true), jnp.asarray(y_pred), jnp.asarray(attr))
  report = fairness.classification_report(y_true, y_pred, attr)
  for name, value in got.items():
    assert float(value) == pytest.approx(report[name], abs=1e-6), name
  # An empty group gives NaN under jit too.
  nan = jax.jit(fairness.equal_opportunity_difference)(
      jnp.asarray(y_true), jnp.asarray(y_pred), jnp.ones_like(jnp.asarray(attr)))
  assert jnp.isnan(nan)


@pytest.mark.parametrize("seed", range(3))
def test_intersectional_groups_agree_with_fairlearn_on_two_sensitive_features(seed):
  import pandas as pd  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  n = 3000
  sex = rng.choice(["Female", "Male"], n, p=[0.35, 0.65])
  race = rng.choice(["Black", "Other", "White"], n, p=[0.1, 0.1, 0.8])
  base = 0.15 + 0.15 * (sex == "Male") + 0.1 * (race == "White")
  y_true = (rng.random(n) < base).astype(int)
  y_pred = np.where(rng.random(n) < 0.25 - 0.1 * (sex == "Male"), 1 - y_true, y_true)
  groups, values = tabular.intersectional_groups(sex, race)
  assert len(values) == 6 and values[0] == ("Female", "Black")
  priv = values.index(("Male", "White"))
  report = fairness.multigroup_report(y_true, y_pred, groups, len(values), privileged=priv)
  features = pd.DataFrame({"sex": sex, "race": race})
  for name, fn in (("demographic_parity_difference", flm.demographic_parity_difference),
                   ("equalized_odds_difference", flm.equalized_odds_difference)):
    assert report[name] == pytest.approx(fn(y_true, y_pred, sensitive_features=features))
  assert report["demographic_parity_ratio"] == pytest.approx(
      flm.demographic_parity_ratio(y_true, y_pred, sensitive_features=features))
  frame = flm.MetricFrame(metrics={"sr": flm.selection_rate, "tpr": flm.true_positive_rate},
                          y_true=y_true, y_pred=y_pred, sensitive_features=features).by_group
  for g, key in enumerate(values):
    assert report[f"selection_rate_{g}"] == pytest.approx(frame.loc[key, "sr"])
    if g != priv:
      assert report[f"statistical_parity_difference_{g}"] == pytest.approx(
          frame.loc[key, "sr"] - frame.loc[("Male", "White"), "sr"])
  assert report["worst_statistical_parity_difference"] == min(
      report[f"statistical_parity_difference_{g}"] for g in range(6) if g != priv)


def test_two_groups_reduce_to_the_binary_metrics():
  y_true, y_pred, attr = _random_case(7)
  report = fairness.multigroup_report(y_true, y_pred, attr, 2, privileged=1)
  for name in ("statistical_parity_difference", "disparate_impact",
               "equal_opportunity_difference", "average_odds_difference"):
    assert report[f"{name}_0"] == pytest.approx(getattr(fairness, name)(*(
        (y_pred, attr) if name in ("statistical_parity_difference", "disparate_impact")
        else (y_true, y_pred, attr))))
  assert report["equalized_odds_difference"] == pytest.approx(
      fairness.equalized_odds_difference(y_true, y_pred, attr))
  assert report["demographic_parity_difference"] == pytest.approx(
      fairness.demographic_parity_difference(y_pred, attr))
  with pytest.raises(ValueError, match="Group ids"):
    fairness.multigroup_report(y_true, y_pred, attr + 1, 2)
