"""Fairness discrepancy against NumPy/SciPy references, bootstrap spreads and the chart."""

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from fairgen.metrics import fairness_discrepancy as fd


def _reference(preds, num_groups, target=None):
  """An independent reference: per-group counting, np.linalg.norm and scipy's KL."""
  preds = np.asarray(preds)
  p = np.array([np.sum(preds == g) for g in range(num_groups)]) / len(preds)
  t = np.full(num_groups, 1 / num_groups) if target is None else np.asarray(target)
  return {"fd_l2": np.linalg.norm(p - t), "fd_l1": np.linalg.norm(p - t, ord=1),
          "fd_kl": stats.entropy(p, t)}


def _choi_et_al(preds, num_groups):
  """Choi et al.'s reference code, which drops groups that never appear (the bug)."""
  _, freq = np.unique(preds, return_counts=True)
  props, truth = freq / len(preds), 1.0 / num_groups
  return {"fd_l2": np.sqrt(((props - truth)**2).sum()), "fd_l1": abs(props - truth).sum(),
          "fd_kl": (props * (np.log(props) - np.log(truth))).sum()}


@pytest.mark.parametrize("seed, num_groups", [(0, 2), (1, 3), (2, 4), (3, 10)])
def test_matches_reference_on_random_generators(seed, num_groups):
  rng = np.random.default_rng(seed)
  probs = rng.dirichlet(np.ones(num_groups))
  preds = rng.choice(num_groups, size=500, p=probs)
  got, want = fd.fairness_discrepancy(preds, num_groups), _reference(preds, num_groups)
  assert got.keys() == want.keys()
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-12)
  target = rng.dirichlet(np.ones(num_groups))
  got, want = fd.fairness_discrepancy(preds, num_groups, target), _reference(
      preds, num_groups, target)
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-12)


def test_missing_group_counts_as_zero_unlike_choi_et_al():
  preds = np.array([0] * 60 + [2] * 40)  # Group 1 of 3 never generated.
  np.testing.assert_allclose(fd.group_distribution(preds, 3), [0.6, 0.0, 0.4])
  got, want = fd.fairness_discrepancy(preds, 3), _reference(preds, 3)
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-12)
  assert np.isfinite(got["fd_kl"])
  buggy = _choi_et_al(preds, 3)
  assert got["fd_l2"] > buggy["fd_l2"] + 0.1 and got["fd_l1"] > buggy["fd_l1"] + 0.1
  # Full collapse onto one of two groups: sqrt(0.5), which the buggy version scores 0.5,
  # i.e. fairer than a 90/10 generator (0.566).
  collapse = np.zeros(1000, np.int64)
  assert fd.fairness_discrepancy(collapse, 2)["fd_l2"] == pytest.approx(np.sqrt(0.5))
  assert _choi_et_al(collapse, 2)["fd_l2"] == pytest.approx(0.5)
  assert fd.fairness_discrepancy(collapse, 2)["fd_kl"] == pytest.approx(np.log(2))


def test_anchor_copying_a_90_10_split():
  preds = np.array([0] * 900 + [1] * 100)
  got = fd.fairness_discrepancy(preds, 2)
  assert got["fd_l2"] == pytest.approx(0.5657, abs=1e-4)
  assert got["fd_l1"] == pytest.approx(0.8)
  assert got["fd_kl"] == pytest.approx(0.9 * np.log(1.8) + 0.1 * np.log(0.2))
  fair = fd.fairness_discrepancy(np.array([0, 1] * 50), 2)
  assert fair == pytest.approx({"fd_l2": 0.0, "fd_l1": 0.0, "fd_kl": 0.0})


def test_kl_is_infinite_only_for_mass_outside_the_target():
  got = fd.fairness_discrepancy(np.array([0, 1, 1]), 2, target=[1.0, 0.0])
  assert got["fd_kl"] == np.inf and np.isfinite(got["fd_l2"])
  got = fd.fairness_discrepancy(np.array([0, 0, 0]), 2, target=[1.0, 0.0])
  assert got == pytest.approx({"fd_l2": 0.0, "fd_l1": 0.0, "fd_kl": 0.0})


@pytest.mark.parametrize("preds, num_groups, target, message", [
    (np.array([], np.int64), 2, None, "non-empty"),
    (np.array([0, 2]), 2, None, r"\[0, 2\)"),
    (np.array([0.0, 1.0]), 2, None, "integer"),
    (np.array([0, 1]), 2, [0.5, 0.25, 0.25], "shape"),
    (np.array([0, 1]), 2, [0.7, 0.7], "probability distribution"),
])
def test_invalid_inputs_raise(preds, num_groups, target, message):
  with pytest.raises(ValueError, match=message):
    fd.fairness_discrepancy(preds, num_groups, target)


def test_bootstrap_spread_matches_binomial_and_shrinks_with_samples():
  rng = np.random.default_rng(0)
  l2 = lambda g: fd.fairness_discrepancy(g, 2)["fd_l2"]
  results = {}
  for n in (200, 5000):
    preds = (rng.random(n) < 0.3).astype(np.int64)  # A 70/30 generator.
    mean, std, (lo, hi) = fd.bootstrap(l2, preds, num_resamples=400, seed=1)
    point = l2(preds)
    assert lo <= point <= hi and lo < mean < hi
    # fd_l2 = sqrt(2) |p_0 - 0.5|, so its spread is sqrt(2) * sqrt(p (1 - p) / n).
    assert std == pytest.approx(np.sqrt(2 * 0.21 / n), rel=0.2)
    results[n] = (std, hi - lo)
  assert results[5000][0] < results[200][0] / 3 and results[5000][1] < results[200][1] / 3


def test_bootstrap_is_seeded_and_keeps_arrays_paired():
  x = np.arange(100)
  same = lambda a, b: float(np.mean(a == b))
  assert fd.bootstrap(same, x, x.copy(), num_resamples=50) == (1.0, 0.0, (1.0, 1.0))
  a = fd.bootstrap(np.mean, x, num_resamples=50, seed=3)
  assert a == fd.bootstrap(np.mean, x, num_resamples=50, seed=3)
  assert a != fd.bootstrap(np.mean, x, num_resamples=50, seed=4)
  with pytest.raises(ValueError, match="equal length"):
    fd.bootstrap(same, x, x[:10])


def test_group_proportions_chart_writes_png(tmp_path):
  path = str(tmp_path / "charts" / "groups.png")
  out = fd.group_proportions_chart([0.9, 0.1], [0.5, 0.5], path, labels=["0-4", "5-9"])
  assert out == path
  with Image.open(path) as image:
    assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
  fd.group_proportions_chart(np.array([0.5, 0.3, 0.2]), np.full(3, 1 / 3),
                             str(tmp_path / "three.png"))
  assert (tmp_path / "three.png").stat().st_size > 1000
  with pytest.raises(ValueError, match="one entry per group"):
    fd.group_proportions_chart([0.9, 0.1], [0.5, 0.5], path, labels=["a"])
