"""Group-fairness metrics of binary classifiers (AIF360 and fairlearn definitions).

Conventions: ``y_true`` and ``y_pred`` are binary (1 = favourable outcome), ``attr`` is the
binary group (1 = privileged, 0 = unprivileged), as in :mod:`fairgen.data.tabular`.

Signed differences follow AIF360: **unprivileged minus privileged**, so 0 is parity and a
negative value means the unprivileged group is worse off (fewer favourable predictions, a
lower true-positive rate). Where fairlearn defines a metric differently it gets its own
function and the docstring says how the two relate:

==================================  =========================  ============================
metric                              definition                 reference
==================================  =========================  ============================
statistical_parity_difference       SR_u - SR_p                AIF360
demographic_parity_difference       max - min of SR (>= 0)     fairlearn; = |SPD|
disparate_impact                    SR_u / SR_p                AIF360
equal_opportunity_difference        TPR_u - TPR_p              AIF360
average_odds_difference             mean of FPR, TPR diffs     AIF360
equalized_odds_difference           max(|dTPR|, |dFPR|)        fairlearn ('worst_case')
==================================  =========================  ============================

(SR: selection rate P(y_pred = 1 | group); TPR, FPR: true/false-positive rates.)

Undefined values are NaN, never an exception or a warning: a rate of an empty group, a TPR
of a group without positives (``y_true == 1``), an FPR of a group without negatives, a ratio
whose denominator is 0, and every difference involving one of those. fairlearn differs
here: with only one group present its differences are 0, and a TPR/FPR without positives/
negatives is 0 (scikit-learn's ``zero_division``), where these functions say NaN.

Every function works on NumPy arrays (returning Python floats) and, unchanged, on JAX arrays
(returning JAX scalars; jittable, no value-dependent Python control flow). Only the NumPy
path checks that the inputs are binary.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

Array = Any  # np.ndarray or jax.Array.

UNPRIVILEGED, PRIVILEGED = 0, 1


def _namespace(*arrays: Array) -> Any:
  """jax.numpy if any input is a JAX array (or tracer), else NumPy."""
  jax = sys.modules.get("jax")
  if jax is not None and any(isinstance(a, jax.Array) for a in arrays):
    return jax.numpy
  return np


def _prepare(*arrays: Array) -> tuple[Any, list[Array]]:
  """Casts binary inputs to float; on the NumPy path checks shapes and values."""
  xp = _namespace(*arrays)
  arrays = [xp.asarray(a) for a in arrays]
  if xp is np:
    for a in arrays:
      if a.ndim != 1 or a.shape != arrays[0].shape:
        raise ValueError(f"Expected 1-D arrays of one length, got shapes "
                         f"{[x.shape for x in arrays]}.")
      if a.size and not np.all((a == 0) | (a == 1)):
        raise ValueError(f"Expected binary values (0/1 or bool), got {np.unique(a)[:5]}.")
  return xp, [a.astype(float) for a in arrays]


def _out(xp: Any, value: Array) -> Array:
  return float(value) if xp is np else value


def _div(xp: Any, num: Array, den: Array) -> Array:
  """num / den, NaN where den is 0 (or NaN), without a division warning."""
  ok = den > 0
  return xp.where(ok, num / xp.where(ok, den, 1.0), xp.nan)


def _rates(xp: Any, y_pred: Array, attr: Array, y_true: Array | None = None
           ) -> dict[str, Array]:
  """Per-group counts and rates, keyed '<rate>_unpriv' / '<rate>_priv'."""
  out = {}
  for suffix, value in (("unpriv", UNPRIVILEGED), ("priv", PRIVILEGED)):
    m = (attr == value).astype(y_pred.dtype)
    n = m.sum()
    out[f"n_{suffix}"] = n
    out[f"selection_rate_{suffix}"] = _div(xp, (m * y_pred).sum(), n)
    if y_true is not None:
      pos, neg = (m * y_true).sum(), (m * (1 - y_true)).sum()
      out[f"tpr_{suffix}"] = _div(xp, (m * y_true * y_pred).sum(), pos)
      out[f"fpr_{suffix}"] = _div(xp, (m * (1 - y_true) * y_pred).sum(), neg)
      out[f"accuracy_{suffix}"] = _div(xp, (m * (y_true == y_pred)).sum(), n)
  return out


def group_rates(y_true: Array, y_pred: Array, attr: Array) -> dict[str, Array]:
  """Per-group sizes, selection rates, TPR, FPR and accuracy.

  Args:
    y_true: binary labels ``[n]``.
    y_pred: binary predictions ``[n]``.
    attr: binary groups ``[n]`` (1 = privileged).

  Returns:
    ``{'n_unpriv', 'n_priv', 'selection_rate_unpriv', ..., 'tpr_*', 'fpr_*',
    'accuracy_*'}``; a rate is NaN when its denominator is empty.
  """
  xp, (y_true, y_pred, attr) = _prepare(y_true, y_pred, attr)
  return {k: _out(xp, v) for k, v in _rates(xp, y_pred, attr, y_true).items()}


def statistical_parity_difference(y_pred: Array, attr: Array) -> Array:
  """AIF360's P(y_pred=1 | unprivileged) - P(y_pred=1 | privileged); 0 is parity.

  Needs no labels (so it also applies to a classifier's verdicts on generated data).
  NaN if either group is empty.
  """
  xp, (y_pred, attr) = _prepare(y_pred, attr)
  r = _rates(xp, y_pred, attr)
  return _out(xp, r["selection_rate_unpriv"] - r["selection_rate_priv"])


def demographic_parity_difference(y_pred: Array, attr: Array) -> Array:
  """fairlearn's max - min of the groups' selection rates: ``|SPD|`` for two groups.

  Non-negative, so it loses the direction that SPD keeps. NaN if either group is empty
  (fairlearn returns 0 when only one group is present).
  """
  xp, (y_pred, attr) = _prepare(y_pred, attr)
  r = _rates(xp, y_pred, attr)
  return _out(xp, xp.abs(r["selection_rate_unpriv"] - r["selection_rate_priv"]))


def disparate_impact(y_pred: Array, attr: Array) -> Array:
  """AIF360's P(y_pred=1 | unprivileged) / P(y_pred=1 | privileged); 1 is parity.

  The "80% rule" flags values below 0.8. NaN if a group is empty or the privileged group
  has no positive prediction (AIF360 would give inf or NaN). fairlearn's
  ``demographic_parity_ratio`` is ``min(DI, 1 / DI)``.
  """
  xp, (y_pred, attr) = _prepare(y_pred, attr)
  r = _rates(xp, y_pred, attr)
  return _out(xp, _div(xp, r["selection_rate_unpriv"], r["selection_rate_priv"]))


def equal_opportunity_difference(y_true: Array, y_pred: Array, attr: Array) -> Array:
  """AIF360's TPR_unprivileged - TPR_privileged; 0 is parity.

  NaN if a group has no positives (``y_true == 1``).
  """
  xp, (y_true, y_pred, attr) = _prepare(y_true, y_pred, attr)
  r = _rates(xp, y_pred, attr, y_true)
  return _out(xp, r["tpr_unpriv"] - r["tpr_priv"])


def average_odds_difference(y_true: Array, y_pred: Array, attr: Array) -> Array:
  """AIF360's 0.5 * [(FPR_u - FPR_p) + (TPR_u - TPR_p)]; 0 is parity.

  Signed, so opposite FPR and TPR gaps can cancel (fairlearn's equalized-odds difference
  cannot). NaN if a group lacks positives or negatives.
  """
  xp, (y_true, y_pred, attr) = _prepare(y_true, y_pred, attr)
  r = _rates(xp, y_pred, attr, y_true)
  return _out(xp, 0.5 * ((r["fpr_unpriv"] - r["fpr_priv"]) + (r["tpr_unpriv"] - r["tpr_priv"])))


def equalized_odds_difference(y_true: Array, y_pred: Array, attr: Array) -> Array:
  """fairlearn's max(|TPR_u - TPR_p|, |FPR_u - FPR_p|) (its default ``agg='worst_case'``).

  Non-negative; 0 means equalized odds. NaN if a group lacks positives or negatives
  (fairlearn counts such a rate as 0 instead).
  """
  xp, (y_true, y_pred, attr) = _prepare(y_true, y_pred, attr)
  r = _rates(xp, y_pred, attr, y_true)
  return _out(xp, xp.maximum(xp.abs(r["tpr_unpriv"] - r["tpr_priv"]),
                             xp.abs(r["fpr_unpriv"] - r["fpr_priv"])))


def accuracy(y_true: Array, y_pred: Array) -> Array:
  """The fraction of correct predictions; NaN for empty inputs."""
  xp, (y_true, y_pred) = _prepare(y_true, y_pred)
  return _out(xp, _div(xp, (y_true == y_pred).sum(), xp.asarray(y_true.size, float)))


def balanced_accuracy(y_true: Array, y_pred: Array) -> Array:
  """The mean recall over the classes present in ``y_true`` (scikit-learn's definition).

  0.5 * (TPR + TNR) when both classes are present; the one recall when only one is (as
  scikit-learn, which warns); NaN for empty inputs.
  """
  xp, (y_true, y_pred) = _prepare(y_true, y_pred)
  pos, neg = y_true.sum(), (1 - y_true).sum()
  tpr = _div(xp, (y_true * y_pred).sum(), pos)
  tnr = _div(xp, ((1 - y_true) * (1 - y_pred)).sum(), neg)
  present = (pos > 0).astype(float) + (neg > 0).astype(float)
  total = xp.where(pos > 0, tpr, 0.0) + xp.where(neg > 0, tnr, 0.0)
  return _out(xp, _div(xp, total, present))


def classification_report(y_true: Array, y_pred: Array, attr: Array) -> dict[str, float]:
  """Every metric of this module, plus the per-group rates, as a flat dict of floats.

  Args:
    y_true: binary labels ``[n]``.
    y_pred: binary predictions ``[n]``.
    attr: binary groups ``[n]`` (1 = privileged).

  Returns:
    ``accuracy``, ``balanced_accuracy``, the six fairness metrics under their function
    names, and :func:`group_rates`. Undefined entries are NaN, as the module docstring
    lists (an empty group, a group without positives or negatives).
  """
  y_true, y_pred, attr = (np.asarray(a) for a in (y_true, y_pred, attr))
  report = {
      "accuracy": accuracy(y_true, y_pred),
      "balanced_accuracy": balanced_accuracy(y_true, y_pred),
      "statistical_parity_difference": statistical_parity_difference(y_pred, attr),
      "demographic_parity_difference": demographic_parity_difference(y_pred, attr),
      "disparate_impact": disparate_impact(y_pred, attr),
      "equal_opportunity_difference": equal_opportunity_difference(y_true, y_pred, attr),
      "average_odds_difference": average_odds_difference(y_true, y_pred, attr),
      "equalized_odds_difference": equalized_odds_difference(y_true, y_pred, attr),
  }
  report.update(group_rates(y_true, y_pred, attr))
  return {k: float(v) for k, v in report.items()}


# --- k groups: several values of one attribute, or intersections of several. -------------


def multigroup_report(y_true: Array, y_pred: Array, groups: Array, num_groups: int,
                      privileged: int | None = None) -> dict[str, float]:
  """Fairness of binary decisions across ``num_groups`` groups (k values of one attribute, or
  intersections from ``fairgen.data.tabular.intersectional_groups``).

  fairlearn's between-group aggregates over the groups that occur: ``demographic_parity_
  difference`` (max - min selection rate), ``demographic_parity_ratio`` (min / max),
  ``equal_opportunity_difference`` (max - min TPR) and ``equalized_odds_difference``
  (the larger of the TPR and FPR ranges); with two groups they equal the binary functions'
  absolute values. With ``privileged`` (a group id), also AIF360's signed differences of
  every other group ``g`` against it, ``statistical_parity_difference_<g>``,
  ``disparate_impact_<g>``, ``equal_opportunity_difference_<g>`` and
  ``average_odds_difference_<g>`` (group ``g`` minus privileged, as the binary functions),
  and the worst of each (the most negative difference, the smallest impact ratio).
  Per-group ``n_<g>``, ``selection_rate_<g>``, ``tpr_<g>``, ``fpr_<g>`` are included. A
  rate of an empty group (or a TPR/FPR without positives/negatives) is NaN and is left out
  of the aggregates.
  """
  y_true = np.asarray(y_true, np.float64).ravel()
  y_pred = np.asarray(y_pred, np.float64).ravel()
  groups = np.asarray(groups).ravel()
  if not (len(y_true) == len(y_pred) == len(groups)):
    raise ValueError(f"Expected arrays of one length, got {len(y_true)}, {len(y_pred)}, "
                     f"{len(groups)}.")
  for name, a in (("y_true", y_true), ("y_pred", y_pred)):
    if a.size and not np.all((a == 0) | (a == 1)):
      raise ValueError(f"{name} must be binary (0/1), got {np.unique(a)[:5]}.")
  if groups.size and (groups.min() < 0 or groups.max() >= num_groups):
    raise ValueError(f"Group ids must be in [0, {num_groups}).")
  if privileged is not None and not 0 <= privileged < num_groups:
    raise ValueError(f"privileged={privileged} is not a group id in [0, {num_groups}).")
  rates = {}
  report: dict[str, float] = {}
  for g in range(num_groups):
    m = (groups == g).astype(np.float64)
    rates[g] = r = _rates(np, y_pred, m, y_true)
    report[f"n_{g}"] = float(m.sum())
    for key in ("selection_rate", "tpr", "fpr"):
      report[f"{key}_{g}"] = float(r[f"{key}_priv"])

  def spread(key: str) -> tuple[float, float]:
    values = [report[f"{key}_{g}"] for g in range(num_groups)]
    values = [v for v in values if not np.isnan(v)]
    return (max(values) - min(values), min(values) / max(values) if max(values) > 0
            else np.nan) if values else (np.nan, np.nan)

  report["demographic_parity_difference"], report["demographic_parity_ratio"] = spread(
      "selection_rate")
  report["equal_opportunity_difference"] = spread("tpr")[0]
  report["equalized_odds_difference"] = max(spread("tpr")[0], spread("fpr")[0])
  if privileged is not None:
    p = {k: report[f"{k}_{privileged}"] for k in ("selection_rate", "tpr", "fpr")}
    worst: dict[str, list[float]] = {}
    for g in range(num_groups):
      if g == privileged:
        continue
      s = {k: report[f"{k}_{g}"] for k in ("selection_rate", "tpr", "fpr")}
      values = {
          "statistical_parity_difference": s["selection_rate"] - p["selection_rate"],
          "disparate_impact": (s["selection_rate"] / p["selection_rate"]
                               if p["selection_rate"] > 0 else np.nan),
          "equal_opportunity_difference": s["tpr"] - p["tpr"],
          "average_odds_difference": 0.5 * ((s["fpr"] - p["fpr"]) + (s["tpr"] - p["tpr"])),
      }
      for key, value in values.items():
        report[f"{key}_{g}"] = float(value)
        worst.setdefault(key, []).append(float(value))
    for key, values in worst.items():
      values = [v for v in values if not np.isnan(v)]
      report[f"worst_{key}"] = min(values) if values else np.nan
  return report
