"""MMD^2 with Gaussian kernels against a NumPy/SciPy reference, and the masked variant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import distance

from fairgen.metrics import mmd


def _reference(x, y, sigmas, unbiased):
  """Independent NumPy MMD^2: float64, scipy distances, explicit off-diagonal sums."""
  sigmas = np.atleast_1d(np.asarray(sigmas, np.float64))

  def k(a, b):
    d2 = distance.cdist(a, b, "sqeuclidean")
    return np.mean([np.exp(-d2 / (2 * s * s)) for s in sigmas], axis=0)

  kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
  n, m = len(x), len(y)
  if unbiased:
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
  return kxx.mean() + kyy.mean() - 2 * kxy.mean()


def _samples(seed, n=40, m=30, d=5, shift=0.0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, d)), rng.normal(size=(m, d)) + shift


def test_zero_for_identical_sets():
  x, _ = _samples(0)
  assert float(mmd.mmd2(x, x, 1.5)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("sigma", [1.0, 3.0, (0.5, 2.0, 8.0)])
def test_matches_numpy_reference(unbiased, sigma):
  x, y = _samples(1, shift=0.3)
  expected = _reference(x, y, sigma, unbiased)
  got = float(mmd.mmd2(x, y, jnp.asarray(sigma), unbiased=unbiased))
  assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_positive_and_growing_for_shifted_gaussians():
  values = []
  for shift in (0.0, 0.5, 2.0):
    x, y = _samples(2, n=200, m=200, shift=shift)
    values.append(float(mmd.mmd2(x, y, 2.0, unbiased=True)))
  assert abs(values[0]) < 0.01  # Same distribution: the U-statistic is near 0.
  assert 0 < values[1] < values[2]


@pytest.mark.parametrize("unbiased", [False, True])
def test_masked_equals_unmasked(unbiased):
  x, y = _samples(3, shift=1.0)
  rng = np.random.default_rng(3)
  order = rng.permutation(len(x) + len(y))  # Interleave the groups.
  z = np.concatenate([x, y])[order]
  group = np.concatenate([np.zeros(len(x)), np.ones(len(y))])[order].astype(np.int32)
  expected = float(mmd.mmd2(x, y, 2.0, unbiased=unbiased))
  masked = jax.jit(mmd.masked_mmd2, static_argnames="unbiased")
  got = float(masked(z, group, 2.0, unbiased=unbiased))
  assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
  # Weights of 1 change nothing; a zero weight removes the row from its group.
  ones = np.ones(len(z), np.float32)
  assert float(masked(z, group, 2.0, ones, unbiased=unbiased)) == pytest.approx(expected,
                                                                                rel=1e-5)
  w = ones.copy()
  w[0] = 0.0
  keep = np.arange(1, len(z))
  sub = masked(z[keep], group[keep], 2.0, unbiased=unbiased)
  assert float(masked(z, group, 2.0, w, unbiased=unbiased)) == pytest.approx(float(sub),
                                                                             rel=1e-5)


@pytest.mark.parametrize("unbiased", [False, True])
def test_masked_is_finite_with_a_missing_group(unbiased):
  z = jnp.asarray(np.random.default_rng(4).normal(size=(16, 3)), jnp.float32)
  for group in (np.zeros(16, np.int32), np.ones(16, np.int32)):
    value, grad = jax.jit(jax.value_and_grad(
        lambda z: mmd.masked_mmd2(z, group, mmd.median_bandwidth(z), unbiased=unbiased)))(z)
    assert float(value) == 0.0
    assert np.all(np.isfinite(np.asarray(grad)))
  # One member in a group: the unbiased estimate is undefined (0); the biased one is not.
  single = np.zeros(16, np.int32)
  single[0] = 1
  value, grad = jax.jit(jax.value_and_grad(lambda z: mmd.masked_mmd2(z, single, 1.0,
                                                                     unbiased=unbiased)))(z)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
  assert (float(value) == 0.0) == unbiased


def test_median_bandwidth():
  z = np.random.default_rng(5).normal(size=(30, 4))
  d = distance.pdist(z)
  assert float(mmd.median_bandwidth(z)) == pytest.approx(np.median(d), rel=1e-4)
  assert float(mmd.median_bandwidth(np.zeros((5, 2)))) == pytest.approx(1e-3)
