"""CLEAM's corrected group shares on a simulated generator and classifier with known errors."""

import numpy as np
import pytest

from fairgen.metrics import cleam


def _simulate(p_star, confusion, num_batches=30, batch=1000, seed=0):
  """Predicted groups of a generator with true shares ``p_star``, seen by a classifier with
  the row-stochastic ``confusion``."""
  rng = np.random.default_rng(seed)
  k = len(p_star)
  true = rng.choice(k, size=num_batches * batch, p=p_star)
  cumulative = np.cumsum(confusion, axis=1)
  u = rng.random(len(true))
  pred = (u[:, None] > cumulative[true]).sum(axis=1)
  return true, np.minimum(pred, k - 1)


def test_binary_correction_recovers_the_true_share_and_matches_the_paper_formula():
  a = np.array([[0.97, 0.03], [0.07, 0.93]])  # 95% accurate on average, asymmetric.
  p_star = np.array([0.3, 0.7])
  _, pred = _simulate(p_star, a)
  shares = cleam.batch_proportions(pred, 2, 30)
  out = cleam.estimate(shares, a)
  assert abs(out["cleam"][0] - 0.3) < 0.01
  # The naive share is off by what the confusion matrix predicts: (A^T p*)_0 - p*_0 = 0.04.
  predicted_bias = (a.T @ p_star)[0] - p_star[0]
  assert predicted_bias == pytest.approx(0.04)
  assert abs((out["naive"][0] - 0.3) - predicted_bias) < 0.005
  assert out["cleam_low"][0] <= 0.3 <= out["cleam_high"][0]
  assert not out["naive_low"][0] <= 0.3 <= out["naive_high"][0]
  # The paper's closed form (authors' reverse() and CLEAM()).
  mu, sigma, s = shares[:, 0].mean(), shares[:, 0].std(), len(shares)
  denom = a[0, 0] + a[1, 1] - 1
  assert out["cleam"][0] == pytest.approx((mu - (1 - a[1, 1])) / denom)
  assert out["cleam_low"][0] == pytest.approx(
      (mu - cleam.Z_95 * sigma / np.sqrt(s) - (1 - a[1, 1])) / denom)
  assert out["cleam_high"][0] == pytest.approx(
      (mu + cleam.Z_95 * sigma / np.sqrt(s) - (1 - a[1, 1])) / denom)
  np.testing.assert_allclose(out["cleam"].sum(), 1.0)


def test_four_groups_and_an_estimated_confusion_matrix():
  # Intersectional groups (e.g. Black_Hair x Male), a classifier that confuses neighbours.
  a_true = np.array([[0.90, 0.06, 0.03, 0.01], [0.05, 0.92, 0.01, 0.02],
                     [0.04, 0.01, 0.88, 0.07], [0.01, 0.03, 0.06, 0.90]])
  # The confusion matrix is estimated from held-out labelled data, as the evaluator does.
  true_real, pred_real = _simulate(np.full(4, 0.25), a_true, num_batches=20, seed=1)
  a_hat = cleam.confusion_matrix(true_real, pred_real, 4)
  np.testing.assert_allclose(a_hat, a_true, atol=0.015)
  p_star = np.array([0.436, 0.415, 0.064, 0.085])
  _, pred = _simulate(p_star, a_true, seed=2)
  out = cleam.estimate(cleam.batch_proportions(pred, 4, 30), a_hat)
  np.testing.assert_allclose(out["cleam"], p_star, atol=0.01)
  # The naive shares are where the confusion matrix puts them: the small groups look larger.
  np.testing.assert_allclose(out["naive"], a_true.T @ p_star, atol=0.006)
  assert np.abs(out["naive"] - p_star).max() > 2 * np.abs(out["cleam"] - p_star).max()
  fd = cleam.corrected_discrepancy(out["cleam"], np.full(4, 0.25))
  assert fd["fd_l1"] == pytest.approx(np.abs(p_star - 0.25).sum(), abs=0.03)


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match="No labelled example of group"):
    cleam.confusion_matrix([0, 0, 1], [0, 1, 1], 3)
  with pytest.raises(ValueError, match="singular"):
    cleam.estimate(np.array([[0.5, 0.5], [0.4, 0.6]]), np.array([[0.5, 0.5], [0.5, 0.5]]))
  with pytest.raises(ValueError, match="2 batches"):
    cleam.batch_proportions(np.zeros(5, int), 2, 1)
