"""CLEAM: group proportions of generated samples, corrected for the attribute classifier's
errors (Teo, Abdollahzadeh and Cheung, "On Measuring Fairness in Generative Models",
NeurIPS 2023).

An attribute classifier also errs on generated images, so the proportions it measures are
biased towards its confusions: a generator that is exactly 50/50 looks 52/48 under a
classifier that is 98% right on one group and 94% on the other. CLEAM models that bias.

**Model.** ``A[i, j] = P(classifier says j | true group i)``, the row-normalised confusion
matrix, is estimated on held-out labelled real data. For samples whose true group shares
are ``p*``, the predicted shares ``p_hat`` of a batch satisfy ``E[p_hat] = A^T p*``.

**Estimator** (the paper's point estimate and interval estimate, Section 4; the authors' code,
``PseudoGAN/src/CLEAM.py``: ``reverse`` and ``CLEAM``). Split the samples into ``s``
batches, take the mean ``mu`` and standard deviation ``sigma`` (NumPy's ``std``, as theirs)
of ``p_hat`` over the batches. For two groups, with per-group accuracies
``alpha_g = A[g, g]``::

    p*_0   = (mu_0 - (1 - alpha_1)) / (alpha_0 + alpha_1 - 1)
    bounds = (mu_0 -/+ z * sigma_0 / sqrt(s) - (1 - alpha_1)) / (alpha_0 + alpha_1 - 1)

with ``z = 1.96`` for 95%. For ``k`` groups (the paper treats two; its multi-attribute
experiments reduce to them) fairgen solves ``A^T p* = mu`` and takes the interval of the same
linear map, ``p* = B mu`` with ``B = A^{-T}``: half-widths ``z * sqrt(diag(B S B^T) / s)``,
``S`` the covariance of ``p_hat`` over batches. For two groups this is exactly the formula
above (``B``'s row 0 is ``[alpha_1, alpha_1 - 1] / (alpha_0 + alpha_1 - 1)`` and
``S = sigma_0^2 [[1, -1], [-1, 1]]``).

The naive ("baseline") estimate is ``mu`` itself, with interval ``mu -/+ z sigma / sqrt(s)``.
Point estimates are not clipped: a value outside [0, 1] says the classifier's confusion
estimate and the samples disagree. Fairness discrepancies of the corrected shares use them
clipped to [0, 1] and renormalised.
"""

from __future__ import annotations

import numpy as np

from fairgen.metrics import fairness_discrepancy as fd_lib

Z_95 = 1.959963984540054


def confusion_matrix(true_groups: np.ndarray, pred_groups: np.ndarray,
                     num_groups: int) -> np.ndarray:
  """Row-normalised ``A[i, j] = P(pred j | true i)`` from labelled held-out data.

  Raises:
    ValueError: on mismatched lengths, ids outside [0, num_groups), or a group with no
      labelled example (its row cannot be estimated).
  """
  true_groups = np.asarray(true_groups, np.int64).ravel()
  pred_groups = np.asarray(pred_groups, np.int64).ravel()
  if true_groups.shape != pred_groups.shape:
    raise ValueError(f"true and predicted groups differ in length: {true_groups.shape} vs "
                     f"{pred_groups.shape}.")
  for name, g in (("true", true_groups), ("predicted", pred_groups)):
    if g.size and (g.min() < 0 or g.max() >= num_groups):
      raise ValueError(f"{name} group ids must be in [0, {num_groups}).")
  counts = np.zeros((num_groups, num_groups), np.float64)
  np.add.at(counts, (true_groups, pred_groups), 1.0)
  rows = counts.sum(axis=1, keepdims=True)
  if np.any(rows == 0):
    missing = np.flatnonzero(rows[:, 0] == 0).tolist()
    raise ValueError(f"No labelled example of group(s) {missing}: their classifier accuracy "
                     "cannot be estimated.")
  return counts / rows


def batch_proportions(pred_groups: np.ndarray, num_groups: int,
                      num_batches: int) -> np.ndarray:
  """``[num_batches, num_groups]`` predicted shares of consecutive equal batches (a remainder
  of fewer than ``num_batches`` samples is dropped)."""
  pred_groups = np.asarray(pred_groups, np.int64).ravel()
  size = len(pred_groups) // num_batches
  if num_batches < 2 or size < 1:
    raise ValueError(f"CLEAM needs >= 2 batches of >= 1 sample; got {len(pred_groups)} "
                     f"samples for {num_batches} batches.")
  batches = pred_groups[:size * num_batches].reshape(num_batches, size)
  return np.stack([np.bincount(b, minlength=num_groups)[:num_groups] / size for b in batches])


def estimate(proportions: np.ndarray, confusion: np.ndarray,
             z: float = Z_95) -> dict[str, np.ndarray]:
  """CLEAM's and the naive estimates of the true group shares, with intervals.

  Args:
    proportions: ``[s, k]`` predicted shares of ``s >= 2`` batches.
    confusion: ``[k, k]`` row-normalised confusion matrix (``confusion_matrix``).
    z: the normal quantile of the interval (1.96: 95%).

  Returns:
    ``{'cleam', 'cleam_low', 'cleam_high', 'naive', 'naive_low', 'naive_high'}``, each a
    float64 ``[k]`` array.

  Raises:
    ValueError: on mismatched shapes, or a confusion matrix that cannot be inverted (a
      classifier no better than chance on some group).
  """
  p = np.asarray(proportions, np.float64)
  a = np.asarray(confusion, np.float64)
  if p.ndim != 2 or p.shape[0] < 2 or a.shape != (p.shape[1], p.shape[1]):
    raise ValueError(f"Need [s >= 2, k] proportions and a [k, k] confusion matrix, got "
                     f"{p.shape} and {a.shape}.")
  if not np.allclose(a.sum(axis=1), 1.0, atol=1e-6):
    raise ValueError("The confusion matrix's rows must each sum to 1.")
  if abs(np.linalg.det(a)) < 1e-6 or np.linalg.cond(a) > 1e6:
    raise ValueError("The confusion matrix is (nearly) singular: the classifier cannot tell "
                     "the groups apart, and no correction can.")
  s = p.shape[0]
  mu = p.mean(axis=0)
  sigma = p.std(axis=0)
  cov = np.cov(p, rowvar=False, ddof=0).reshape(p.shape[1], p.shape[1])
  b = np.linalg.inv(a.T)
  corrected = b @ mu
  half = z * np.sqrt(np.maximum(np.einsum("gi,ij,gj->g", b, cov, b), 0.0) / s)
  naive_half = z * sigma / np.sqrt(s)
  return {"cleam": corrected, "cleam_low": corrected - half, "cleam_high": corrected + half,
          "naive": mu, "naive_low": mu - naive_half, "naive_high": mu + naive_half}


def corrected_discrepancy(corrected: np.ndarray, target: np.ndarray) -> dict[str, float]:
  """Fairness discrepancies (``fd_l2``, ``fd_l1``, ``fd_kl``) of CLEAM's shares, clipped to
  [0, 1] and renormalised."""
  shares = np.clip(np.asarray(corrected, np.float64), 0.0, 1.0)
  total = shares.sum()
  shares = shares / total if total > 0 else np.full_like(shares, 1.0 / len(shares))
  return fd_lib.discrepancy(shares, np.asarray(target, np.float64))
