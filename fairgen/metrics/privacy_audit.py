"""Privacy audits as pure functions: membership-inference AUC and memorisation.

- ``roc_auc(members, nonmembers)``: the probability that a random training member scores
  above a random held-out non-member (ties count one half), i.e. the ROC AUC of a
  threshold attack on the score (Mann-Whitney U / (n_m n_n)). 0.5 is chance.
- ``attack_advantage``: ``max_t TPR(t) - FPR(t)`` of the same attack (Yeom et al. 2018's
  membership advantage); it bounds ``e^eps - 1 + 2 delta``-style guarantees from below.
- ``nearest_distances(queries, reference)``: each query's Euclidean distance to its nearest
  reference row.
- ``near_copy_fraction(sample_d, heldout_d, quantile)``: the share of samples closer to
  their nearest training image than the ``quantile`` of held-out real images' distances to
  theirs. Fresh data gives about ``quantile``; a model that copies training images gives
  more.
- ``one_run_p_value`` and ``one_run_epsilon``: the one-run audit of Steinke, Nasr &
  Jagielski ("Privacy Auditing with One (1) Training Run", NeurIPS 2023). ``m`` canaries
  are each included in the training data with probability 1/2; an auditor guesses
  included/excluded for ``r`` of them (abstaining on the rest) and is right ``v`` times.
  If training is (eps, delta)-DP, ``P[v' >= v] <= P[Binomial(r, q) >= v] + 2 m delta
  max_{i=1..v} P[v - i <= Binomial(r, q) < v] / i`` with ``q = e^eps / (1 + e^eps)``
  (their Theorem 5.2; the first term alone for delta = 0). ``one_run_epsilon`` is the
  largest eps this rejects at the given significance: a lower bound on the run's epsilon.
- ``one_run_audit(scores, included, delta)``: the auditor of canary scores (higher: more
  likely included). It guesses "in" for the ``k`` highest scores (and "out" for the ``k``
  lowest, in a second family of guesses), for several ``k``, and reports the largest bound
  among them at a Bonferroni-corrected significance, so the choice of ``k`` after seeing
  the scores costs confidence, not validity.
"""

from __future__ import annotations

import math

import numpy as np


def roc_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
  """P(member score > non-member score) + 0.5 P(equal), by ranks."""
  members = np.asarray(members, np.float64).ravel()
  nonmembers = np.asarray(nonmembers, np.float64).ravel()
  if not len(members) or not len(nonmembers):
    raise ValueError("roc_auc needs at least one member and one non-member score.")
  from scipy import stats  # pylint: disable=g-import-not-at-top  (~0.6 s; most runs never audit)
  ranks = stats.rankdata(np.concatenate([members, nonmembers]))  # Ties: mean ranks.
  u = ranks[:len(members)].sum() - len(members) * (len(members) + 1) / 2
  return float(u / (len(members) * len(nonmembers)))


def attack_advantage(members: np.ndarray, nonmembers: np.ndarray) -> float:
  """``max_t P(member score >= t) - P(non-member score >= t)`` over all thresholds."""
  members = np.sort(np.asarray(members, np.float64).ravel())
  nonmembers = np.sort(np.asarray(nonmembers, np.float64).ravel())
  thresholds = np.concatenate([members, nonmembers])
  tpr = 1.0 - np.searchsorted(members, thresholds, side="left") / len(members)
  fpr = 1.0 - np.searchsorted(nonmembers, thresholds, side="left") / len(nonmembers)
  return float(max(0.0, np.max(tpr - fpr)))


def nearest_distances(queries: np.ndarray, reference: np.ndarray,
                      chunk: int = 1024) -> np.ndarray:
  """Each query row's Euclidean distance to its nearest ``reference`` row (float64)."""
  q = np.asarray(queries, np.float64).reshape(len(queries), -1)
  r = np.asarray(reference, np.float64).reshape(len(reference), -1)
  r_sq = np.sum(r ** 2, axis=1)
  out = np.empty(len(q))
  for start in range(0, len(q), chunk):
    part = q[start:start + chunk]
    d2 = np.sum(part ** 2, axis=1)[:, None] - 2 * part @ r.T + r_sq[None]
    out[start:start + chunk] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
  return out


def near_copy_fraction(sample_d: np.ndarray, heldout_d: np.ndarray,
                       quantile: float = 0.01) -> float:
  """The share of ``sample_d`` below the ``quantile`` of ``heldout_d`` (see the module
  docstring)."""
  threshold = np.quantile(np.asarray(heldout_d, np.float64), quantile)
  return float(np.mean(np.asarray(sample_d) < threshold))


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
  """The probability that an (eps, delta)-DP run lets ``r`` guesses about ``m`` canaries be
  right at least ``v`` times (see the module docstring), at most 1."""
  if not 0 <= v <= r <= m:
    raise ValueError(f"Need 0 <= v <= r <= m, got v={v}, r={r}, m={m}.")
  from scipy import stats  # pylint: disable=g-import-not-at-top
  q = 1.0 / (1.0 + np.exp(-eps))
  beta = float(stats.binom.sf(v - 1, r, q))
  if delta == 0 or v == 0:
    return min(beta, 1.0)
  i = np.arange(1, v + 1)
  below = stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - i - 1, r, q)
  return min(beta + 2 * m * delta * float(np.max(below / i)), 1.0)


def one_run_epsilon(m: int, r: int, v: int, delta: float, significance: float = 0.05
                    ) -> float:
  """The largest eps at which ``one_run_p_value`` is below ``significance`` (0 if none):
  with confidence ``1 - significance``, the run is not (eps', delta)-DP for eps' below it."""
  if one_run_p_value(m, r, v, 0.0, delta) >= significance:
    return 0.0
  low, high = 0.0, 1.0
  while one_run_p_value(m, r, v, high, delta) < significance:
    low, high = high, 2 * high
    if high > 1e3:
      return math.inf
  for _ in range(60):  # Bisection to ~1e-15 relative: the p-value is monotone in eps.
    mid = 0.5 * (low + high)
    if one_run_p_value(m, r, v, mid, delta) < significance:
      low = mid
    else:
      high = mid
  return low


# The auditor's guess counts, as fractions of the canaries (k highest "in"; and, in a second
# family, also the k lowest "out").
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def one_run_audit(scores: np.ndarray, included: np.ndarray, delta: float,
                  significance: float = 0.05) -> dict[str, float]:
  """The one-run lower bound on epsilon from canary ``scores`` and their inclusion.

  Args:
    scores: ``[m]`` audit scores, higher for canaries more likely included.
    included: ``[m]`` bools, which canaries were in the training data.
    delta: the delta of the claim being audited.
    significance: one minus the confidence (0.05: 95%), split evenly over the guesses tried.

  Returns:
    ``epsilon_lb`` (the largest bound), and its ``guesses`` (r), ``correct`` (v) and the
    number of guess rules tried (``rules``).
  """
  scores = np.asarray(scores, np.float64).ravel()
  included = np.asarray(included, bool).ravel()
  m = len(scores)
  order = np.argsort(-scores, kind="stable")
  ranked = included[order]
  counts = sorted({max(1, int(round(f * m))) for f in GUESS_FRACTIONS if f * m >= 1})
  rules = [(k, 0) for k in counts] + [(k, k) for k in counts if 2 * k <= m]
  best = {"epsilon_lb": 0.0, "guesses": 0, "correct": 0}
  for positive, negative in rules:
    correct = int(ranked[:positive].sum()) + int((~ranked[m - negative:]).sum() if negative else 0)
    eps = one_run_epsilon(m, positive + negative, correct, delta, significance / len(rules))
    if eps > best["epsilon_lb"]:
      best = {"epsilon_lb": eps, "guesses": positive + negative, "correct": correct}
  return {**best, "rules": len(rules)}
