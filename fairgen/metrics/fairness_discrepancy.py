"""Fairness discrepancy of a generative model (Choi et al. 2020), with bootstrap spreads.

A generator is fair with respect to a sensitive attribute when the groups of its samples
(predicted by an attribute classifier) follow a target distribution, uniform by default.
The *fairness discrepancy* (FD) is a distance between the empirical group distribution of
the samples and that target:

==========  ===============================================  ==============================
key         definition                                       range
==========  ===============================================  ==============================
fd_l2       ||p - t||_2                                      [0, sqrt(2)]
fd_l1       ||p - t||_1  (twice the total-variation dist.)   [0, 2]
fd_kl       KL(p || t) = sum_g p_g log(p_g / t_g)  (nats)     [0, inf]
==========  ===============================================  ==============================

(``p``: generated group distribution, ``t``: target.) The L2 and L1 values are not divided
by the number of groups, as in Choi et al.'s ``fairness_discrepancy`` (some later forks
divide by it). A generator that copies a 90/10 training split has ``fd_l2 =
sqrt(0.4**2 + 0.4**2) = 0.566`` against a uniform 2-group target.

Two deliberate differences from Choi et al.'s reference code:

- **Missing groups count.** Their code takes ``np.unique(preds, return_counts=True)``, which
  silently drops a group the generator never produces and then compares the remaining
  proportions with ``1 / n_classes`` position by position. A generator that collapses onto
  one of two groups then scores ``|1 - 0.5| = 0.5`` instead of ``sqrt(0.5) = 0.707`` in L2,
  looking fairer than one that merely under-represents it (0.566 for 90/10); with a
  non-uniform target the remaining proportions would also be compared with the wrong
  groups. Their KL is unaffected (a missing group contributes ``0 log 0 = 0`` anyway). Here
  every group gets its probability, 0 when it is missing.
- **KL direction.** We report ``KL(p_generated || target)``, the direction Choi et al.'s
  formula computes. It stays finite when the generator misses a group (``0 log 0 = 0``),
  which is exactly the failure a fairness metric must score; the reverse,
  ``KL(target || p_generated)``, is infinite whenever a group is missing and so cannot rank
  such generators. ``KL(p || t)`` is infinite only if the generator produces a group whose
  target probability is 0; then ``fd_kl`` is ``inf``, as the definition says.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Sequence

import numpy as np

from fairgen import storage


def group_distribution(pred_groups: np.ndarray, num_groups: int) -> np.ndarray:
  """The empirical distribution of predicted groups over all ``num_groups`` groups.

  A group that never appears gets probability 0; it is not dropped (Choi et al.'s reference
  implementation drops it, see the module docstring).

  Args:
    pred_groups: int array of predicted group ids in [0, num_groups), shape [N], N > 0.
    num_groups: the number of groups.

  Returns:
    float64 array [num_groups] of proportions summing to 1.

  Raises:
    ValueError: for an empty input, non-integer ids or ids outside [0, num_groups).
  """
  groups = np.asarray(pred_groups)
  if num_groups < 1:
    raise ValueError(f"num_groups must be >= 1, got {num_groups}.")
  if groups.ndim != 1 or groups.size == 0:
    raise ValueError(f"pred_groups must be a non-empty 1-D array, got shape {groups.shape}.")
  if not np.issubdtype(groups.dtype, np.integer):
    raise ValueError(f"pred_groups must hold integer group ids, got dtype {groups.dtype}.")
  if groups.min() < 0 or groups.max() >= num_groups:
    raise ValueError(f"pred_groups must lie in [0, {num_groups}), got values in "
                     f"[{groups.min()}, {groups.max()}].")
  return np.bincount(groups, minlength=num_groups) / groups.size


def _target(target: Sequence[float] | np.ndarray | None, num_groups: int) -> np.ndarray:
  if target is None:
    return np.full(num_groups, 1.0 / num_groups)
  t = np.asarray(target, np.float64)
  if t.shape != (num_groups,):
    raise ValueError(f"target must have shape ({num_groups},), got {t.shape}.")
  if np.any(t < 0) or not np.isclose(t.sum(), 1.0):
    raise ValueError(f"target must be a probability distribution, got {t.tolist()}.")
  return t


def discrepancy(distribution: np.ndarray, target: np.ndarray) -> dict[str, float]:
  """L2, L1 and KL(distribution || target) between two distributions over the same groups.

  Args:
    distribution: generated group distribution [G].
    target: target group distribution [G].

  Returns:
    ``{'fd_l2', 'fd_l1', 'fd_kl'}`` as Python floats; ``fd_kl`` is ``inf`` where
    ``distribution`` has mass on a group with target probability 0.
  """
  p, t = np.asarray(distribution, np.float64), np.asarray(target, np.float64)
  diff = p - t
  present = p > 0  # 0 log(0 / t) = 0.
  with np.errstate(divide="ignore"):
    kl = float(np.sum(p[present] * (np.log(p[present]) - np.log(t[present]))))
  return {"fd_l2": float(np.sqrt(np.sum(diff**2))), "fd_l1": float(np.sum(np.abs(diff))),
          "fd_kl": kl}


def fairness_discrepancy(pred_groups: np.ndarray, num_groups: int,
                         target: Sequence[float] | np.ndarray | None = None
                         ) -> dict[str, float]:
  """Fairness discrepancy of generated samples' predicted groups from a target distribution.

  Args:
    pred_groups: int array [N] of predicted group ids of generated samples.
    num_groups: the number of groups G.
    target: target distribution [G]; None for uniform.

  Returns:
    ``{'fd_l2', 'fd_l1', 'fd_kl'}`` (see the module docstring), Python floats; 0 is fair.

  Raises:
    ValueError: for invalid group ids or an invalid target.
  """
  return discrepancy(group_distribution(pred_groups, num_groups), _target(target, num_groups))


def bootstrap(fn: Callable[..., Any], *arrays: np.ndarray, num_resamples: int = 1000,
              seed: int = 0, confidence: float = 0.95
              ) -> tuple[float, float, tuple[float, float]]:
  """Bootstrap spread of a scalar statistic of paired examples.

  Each resample draws N row indices with replacement (N: the common leading dimension)
  and applies ``fn`` to every array indexed by them, so paired arrays (e.g. predictions
  and labels) stay paired.

  Args:
    fn: statistic, ``fn(*resampled_arrays) -> scalar``.
    *arrays: one or more arrays with the same leading dimension N > 0.
    num_resamples: number of bootstrap resamples.
    seed: seed of the resampling.
    confidence: coverage of the percentile interval.

  Returns:
    ``(mean, std, (lo, hi))`` of the statistic over the resamples: their mean, standard
    deviation and the central ``confidence`` percentile interval.

  Raises:
    ValueError: with no arrays, arrays of different or zero length, or num_resamples < 2.
  """
  if not arrays:
    raise ValueError("bootstrap needs at least one array.")
  arrays = tuple(np.asarray(a) for a in arrays)
  n = len(arrays[0])
  if n == 0 or any(len(a) != n for a in arrays):
    raise ValueError(
        f"bootstrap needs non-empty arrays of equal length, got {[len(a) for a in arrays]}.")
  if num_resamples < 2:
    raise ValueError(f"num_resamples must be >= 2, got {num_resamples}.")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
  rng = np.random.default_rng(seed)
  stats = np.empty(num_resamples, np.float64)
  for i in range(num_resamples):
    idx = rng.integers(0, n, size=n)
    stats[i] = float(fn(*(a[idx] for a in arrays)))
  alpha = (1.0 - confidence) / 2.0
  lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
  return float(np.mean(stats)), float(np.std(stats, ddof=1)), (float(lo), float(hi))


def group_proportions_chart(distribution: Sequence[float] | np.ndarray,
                            target: Sequence[float] | np.ndarray, path: str,
                            labels: Sequence[str] | None = None) -> str:
  """Writes a PNG bar chart of generated vs target group proportions.

  Uses matplotlib's Agg canvas directly rather than pyplot, so it neither needs a display
  nor changes the process-wide backend.

  Args:
    distribution: generated group proportions [G].
    target: target proportions [G].
    path: output PNG path; parent folders are created.
    labels: names of the G groups; default 'group 0', 'group 1', ...

  Returns:
    ``path``.

  Raises:
    ValueError: if the inputs do not have G entries each.
  """
  from matplotlib.backends import backend_agg  # Heavy import, only when charting.
  from matplotlib import figure

  p, t = np.asarray(distribution, np.float64), np.asarray(target, np.float64)
  labels = [f"group {g}" for g in range(len(p))] if labels is None else list(labels)
  if p.ndim != 1 or t.shape != p.shape or len(labels) != len(p):
    raise ValueError(f"distribution, target and labels must have one entry per group, got "
                     f"{p.shape}, {t.shape} and {len(labels)}.")
  fig = figure.Figure(figsize=(max(4.0, 0.9 * len(p) + 2.0), 3.2), dpi=100)
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  x, width = np.arange(len(p)), 0.38
  ax.bar(x - width / 2, p, width, label="generated", color="tab:blue")
  ax.bar(x + width / 2, t, width, label="target", color="tab:gray")
  ax.set_xticks(x)
  ax.set_xticklabels(labels)
  ax.set_ylim(0.0, max(1.0, float(p.max()), float(t.max())) * 1.05)
  ax.set_ylabel("proportion")
  l2 = float(np.sqrt(np.sum((p - t)**2)))
  ax.set_title(f"Group proportions (FD-L2 = {l2:.3f})")
  ax.legend()
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  storage.write_atomic(path, buf.getvalue())
  return path
