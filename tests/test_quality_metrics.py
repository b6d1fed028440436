"""Sample-quality metrics must match plain NumPy/SciPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg
from scipy import special
from scipy.spatial import distance

from fairgen.metrics import quality


# ------------------------------ references ------------------------------------------


def ref_frechet(mu1, cov1, mu2, cov2):
  covmean = linalg.sqrtm(cov1 @ cov2)
  return float(np.sum((mu1 - mu2)**2) + np.trace(cov1 + cov2 - 2.0 * covmean).real)


def ref_mmd2_unbiased(x, y):
  """``_mmd2_and_variance(..., mmd_est='unbiased')`` of Binkowski et al."""
  d = x.shape[1]
  k_xx = (x @ x.T / d + 1.0)**3
  k_yy = (y @ y.T / d + 1.0)**3
  k_xy = (x @ y.T / d + 1.0)**3
  m = x.shape[0]
  kt_xx = k_xx.sum() - np.trace(k_xx)
  kt_yy = k_yy.sum() - np.trace(k_yy)
  return (kt_xx + kt_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m)


def ref_inception_score(probs, num_splits):
  n = probs.shape[0]
  scores = []
  for i in range(num_splits):
    part = probs[i * n // num_splits:(i + 1) * n // num_splits]
    py = part.mean(axis=0)
    kl = [special.rel_entr(p, py).sum() for p in part]
    scores.append(np.exp(np.mean(kl)))
  return np.mean(scores), np.std(scores)


def ref_prdc(real, fake, k):
  """clovaai/generative-evaluation-prdc ``compute_prdc`` on full float64 matrices."""
  real_radii = np.sort(distance.cdist(real, real), axis=1)[:, k]
  fake_radii = np.sort(distance.cdist(fake, fake), axis=1)[:, k]
  d_rf = distance.cdist(real, fake)
  in_real = d_rf < real_radii[:, None]
  return {
      "precision": in_real.any(axis=0).mean(),
      "recall": (d_rf < fake_radii[None, :]).any(axis=1).mean(),
      "density": in_real.sum(axis=0).mean() / k,
      "coverage": (d_rf.min(axis=1) < real_radii).mean(),
  }


def random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.5 * np.eye(d)


# ------------------------------ Frechet distance / FeatureStats ---------------------


@pytest.mark.parametrize("d", [8, 64])
def test_frechet_matches_sqrtm_reference(d):
  rng = np.random.default_rng(d)
  for _ in range(3):
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    cov1, cov2 = random_spd(rng, d), random_spd(rng, d)
    got = quality.frechet_distance(mu1, cov1, mu2, cov2)
    np.testing.assert_allclose(got, ref_frechet(mu1, cov1, mu2, cov2), rtol=1e-4)
    # Covariance part alone (equal means) is also accurate.
    got = quality.frechet_distance(mu1, cov1, mu1, cov2)
    np.testing.assert_allclose(got, ref_frechet(mu1, cov1, mu1, cov2), rtol=1e-4)
    assert isinstance(got, float)


def test_frechet_identical_stats_is_zero():
  rng = np.random.default_rng(1)
  full = random_spd(rng, 32)
  low_rank = np.cov(rng.normal(3.0, 2.0, size=(20, 64)), rowvar=False)
  for cov in (full, low_rank, np.zeros((4, 4))):
    mu = rng.normal(size=cov.shape[0])
    assert abs(quality.frechet_distance(mu, cov, mu, cov)) < 1e-6
  # Jax inputs work too.
  full32 = jnp.asarray(full, jnp.float32)
  zeros = jnp.zeros(32)
  assert abs(quality.frechet_distance(zeros, full32, zeros, full32)) < 1e-4


def test_frechet_matches_scipy_sqrtm_on_random_and_rank_deficient_cases():
  """pytorch-fid's formula (scipy's sqrtm of C1 C2) on full-rank and rank-deficient pairs."""
  rng = np.random.default_rng(2)
  for trial in range(40):
    d = 64
    covs = []
    for _ in range(2):
      n = 20 if trial % 2 else int(rng.integers(5, 100))
      x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, size=d) + rng.normal(size=d)
      covs.append(np.cov(x, rowvar=False))
    mu = rng.normal(size=d)
    shift = (0.0, 0.01, 1.0)[trial % 3] * rng.normal(size=d)
    fd = quality.frechet_distance(mu, covs[0], mu + shift, covs[1])
    dmu = np.asarray(shift, np.float64) * np.ones(d)
    ref = (dmu @ dmu + np.trace(covs[0]) + np.trace(covs[1])
           - 2 * np.trace(linalg.sqrtm(covs[0] @ covs[1])).real)
    scale = np.trace(covs[0]) + np.trace(covs[1])
    np.testing.assert_allclose(fd, ref, rtol=1e-4, atol=1e-4 * scale, err_msg=str(trial))
    # Identical rank-deficient stats (up to float32 rounding) stay at 0.
    cov32 = covs[0].astype(np.float32).astype(np.float64)
    assert abs(quality.frechet_distance(mu, covs[0], mu, cov32)) < 1e-3


def test_frechet_rejects_bad_input():
  rng = np.random.default_rng(3)
  mu, cov = np.zeros(4), random_spd(rng, 4)
  bad = cov.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN or inf"):
    quality.frechet_distance(mu, bad, mu, cov)
  with pytest.raises(ValueError, match="NaN or inf"):
    quality.frechet_distance(np.full(4, np.inf), cov, mu, cov)
  with pytest.raises(ValueError, match="shape"):
    quality.frechet_distance(mu, cov, np.zeros(5), cov)
  with pytest.raises(ValueError, match="2-D"):
    quality.frechet_distance(mu, mu, mu, cov)
  with pytest.raises(ValueError, match="positive semidefinite"):
    quality.frechet_distance(mu, -cov, mu, cov)
  with pytest.raises(ValueError, match="symmetric"):
    quality.frechet_distance(mu, cov + np.triu(np.ones((4, 4)), 1), mu, cov)


def test_feature_stats_streaming_matches_numpy():
  rng = np.random.default_rng(4)
  x = rng.normal(5.0, 1.0, size=(1500, 128)).astype(np.float32)
  stats = quality.FeatureStats()
  bounds = [0, 3, 200, 201, 700, 1500]
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    batch = x[lo:hi]
    stats.update(jnp.asarray(batch) if lo % 2 else batch)
  assert stats.count == 1500 and stats.num_features == 128
  ref_mean = x.astype(np.float64).mean(axis=0)
  ref_cov = np.cov(x.astype(np.float64), rowvar=False)
  np.testing.assert_allclose(stats.mean(), ref_mean, rtol=1e-5)
  assert np.abs(stats.cov() - ref_cov).max() <= 1e-5 * np.abs(ref_cov).max()
  assert stats.mean().dtype == np.float64 and stats.cov().dtype == np.float64

  # Merging stats with different reference shifts is exact.
  part1, part2 = quality.FeatureStats(), quality.FeatureStats()
  part1.update(x[:500])
  part2.update(x[500:] + 1.0)
  part1.merge(part2)
  y = np.concatenate([x[:500], x[500:] + 1.0]).astype(np.float64)
  np.testing.assert_allclose(part1.mean(), y.mean(axis=0), rtol=1e-5)
  ref_cov = np.cov(y, rowvar=False)
  assert np.abs(part1.cov() - ref_cov).max() <= 1e-5 * np.abs(ref_cov).max()
  empty = quality.FeatureStats()
  empty.merge(part1)
  np.testing.assert_array_equal(empty.cov(), part1.cov())


def test_feature_stats_errors():
  stats = quality.FeatureStats()
  with pytest.raises(ValueError, match="at least 1"):
    stats.mean()
  stats.update(np.ones((1, 3)))
  with pytest.raises(ValueError, match="at least 2"):
    stats.cov()
  with pytest.raises(ValueError, match="dim"):
    stats.update(np.ones((2, 4)))
  with pytest.raises(ValueError, match="2-D"):
    stats.update(np.ones(3))


def test_fid_from_features():
  rng = np.random.default_rng(5)
  a = rng.normal(size=(400, 16)).astype(np.float32)
  b = (rng.normal(size=(300, 16)) * 1.5 + 0.5).astype(np.float32)
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  ref = ref_frechet(a64.mean(0), np.cov(a64, rowvar=False), b64.mean(0),
                    np.cov(b64, rowvar=False))
  got = quality.fid_from_features(a, jnp.asarray(b))
  np.testing.assert_allclose(got, ref, rtol=1e-4)
  assert abs(quality.fid_from_features(a, a)) < 1e-6
  with pytest.raises(ValueError, match="feature dims"):
    quality.fid_from_features(a, b[:, :8])
  with pytest.raises(ValueError, match="at least 2"):
    quality.fid_from_features(a, b[:1])


# ------------------------------ KID -------------------------------------------------


def test_kid_matches_numpy_reference():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(300, 12)).astype(np.float32)
  y = (rng.normal(size=(250, 12)) * 1.2 + 0.3).astype(np.float32)
  mean, std = quality.kernel_inception_distance(x, y, num_subsets=10,
                                                 subset_size=400, seed=3)
  idx1, idx2 = quality.kid_subset_indices(300, 250, num_subsets=10, subset_size=400,
                                          seed=3)
  assert idx1.shape == idx2.shape == (10, 250)  # Capped at min(n1, n2).
  for row1, row2 in zip(idx1, idx2):
    assert len(set(row1)) == 250 and len(set(row2)) == 250
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  mmds = [ref_mmd2_unbiased(x64[i], y64[j]) for i, j in zip(idx1, idx2)]
  np.testing.assert_allclose(mean, np.mean(mmds), rtol=1e-4)
  np.testing.assert_allclose(std, np.std(mmds), rtol=1e-3)
  assert mean > 0.0


def test_kid_same_distribution_near_zero_and_disjoint_large():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(600, 16))
  y = rng.normal(size=(600, 16))
  mean, std = quality.kernel_inception_distance(x, y, num_subsets=20, subset_size=200)
  assert std > 0.0 and abs(mean) < 2.0 * std
  far_mean, far_std = quality.kernel_inception_distance(
      x, jnp.asarray(y + 10.0), num_subsets=20, subset_size=200)
  assert far_mean > 1.0 and far_mean > 1e3 * abs(mean) and far_mean > 10.0 * far_std


def test_kid_errors():
  x = np.zeros((10, 4))
  with pytest.raises(ValueError, match="feature dims"):
    quality.kernel_inception_distance(x, np.zeros((10, 5)))
  with pytest.raises(ValueError, match="at least 2"):
    quality.kernel_inception_distance(x, np.zeros((1, 4)))
  with pytest.raises(ValueError, match="2-D"):
    quality.kernel_inception_distance(x, np.zeros(4))


# ------------------------------ Inception Score -------------------------------------


def test_inception_score_extremes():
  num_classes, num_splits = 7, 5
  labels = np.tile(np.arange(num_classes), 4 * num_splits)
  one_hot = np.eye(num_classes)[labels]
  mean, std = quality.inception_score(one_hot, num_splits=num_splits)
  np.testing.assert_allclose(mean, num_classes, rtol=1e-12)
  assert std < 1e-9
  same = np.tile(np.random.default_rng(8).dirichlet(np.ones(num_classes)), (50, 1))
  mean, std = quality.inception_score(jnp.asarray(same, jnp.float32), num_splits=5)
  np.testing.assert_allclose(mean, 1.0, atol=1e-6)
  # Identical one-hot predictions: zeros everywhere but one class.
  mean, _ = quality.inception_score(np.eye(num_classes)[np.zeros(30, int)], 3)
  assert mean == 1.0


def test_inception_score_matches_reference():
  rng = np.random.default_rng(9)
  probs = rng.dirichlet(np.full(10, 0.3), size=1003)
  probs[:5] = np.eye(10)[:5]  # Exact zeros are handled.
  mean, std = quality.inception_score(probs, num_splits=10)
  ref_mean, ref_std = ref_inception_score(probs, 10)
  np.testing.assert_allclose([mean, std], [ref_mean, ref_std], rtol=1e-10)


def test_inception_score_errors():
  with pytest.raises(ValueError, match="2-D"):
    quality.inception_score(np.ones(10) / 10)
  with pytest.raises(ValueError, match="num_splits"):
    quality.inception_score(np.ones((5, 2)) / 2, num_splits=10)
  with pytest.raises(ValueError, match="sum to 1"):
    quality.inception_score(np.ones((20, 2)), num_splits=2)
  with pytest.raises(ValueError, match="non-negative"):
    quality.inception_score(np.array([[1.5, -0.5]] * 4), num_splits=2)


# ------------------------------ PRDC ------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1024, 37])
def test_prdc_matches_brute_force(chunk_size):
  rng = np.random.default_rng(10)
  real = rng.normal(size=(300, 8)).astype(np.float32)
  fake = (rng.normal(size=(250, 8)) * 1.3 + 0.4).astype(np.float32)
  for k in (3, 5):
    got = quality.prdc(real, fake, nearest_k=k, chunk_size=chunk_size)
    ref = ref_prdc(real.astype(np.float64), fake.astype(np.float64), k)
    assert set(got) == set(ref)
    for key, value in ref.items():
      assert isinstance(got[key], float)
      np.testing.assert_allclose(got[key], value, atol=1e-12, err_msg=key)


def test_prdc_identical_and_disjoint():
  rng = np.random.default_rng(11)
  real = rng.normal(5.0, 1.0, size=(200, 32))
  got = quality.prdc(real, jnp.asarray(real, jnp.float32), nearest_k=5)
  assert got["precision"] == got["recall"] == got["coverage"] == 1.0
  np.testing.assert_allclose(got["density"], 1.0, atol=0.05)
  got = quality.prdc(real, real + 100.0, nearest_k=5, chunk_size=64)
  assert got == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_errors():
  x = np.zeros((10, 4))
  with pytest.raises(ValueError, match="at least 6"):
    quality.prdc(x, np.zeros((5, 4)), nearest_k=5)
  with pytest.raises(ValueError, match="feature dims"):
    quality.prdc(x, np.zeros((10, 3)))
  with pytest.raises(ValueError, match="2-D"):
    quality.prdc(x[0], x)
  with pytest.raises(ValueError, match="nearest_k"):
    quality.prdc(x, x, nearest_k=0)


def test_sharded_inputs_match_unsharded():
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("needs several (fake CPU) devices")
  sharding = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(devices), ("data",)),
      jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(12)
  n = 16 * len(devices)
  real = rng.normal(3.0, 1.0, size=(n, 8)).astype(np.float32)
  fake = rng.normal(3.2, 1.0, size=(n, 8)).astype(np.float32)
  real_s, fake_s = jax.device_put(real, sharding), jax.device_put(fake, sharding)
  stats, stats_s = quality.FeatureStats(), quality.FeatureStats()
  stats.update(real)
  stats_s.update(real_s)
  np.testing.assert_allclose(stats_s.mean(), stats.mean(), rtol=1e-6)
  np.testing.assert_allclose(stats_s.cov(), stats.cov(), rtol=1e-5, atol=1e-6)
  assert quality.prdc(real_s, fake_s, chunk_size=50) == quality.prdc(real, fake)
  kid = quality.kernel_inception_distance(real, fake, num_subsets=4, subset_size=64)
  kid_s = quality.kernel_inception_distance(real_s, fake_s, num_subsets=4,
                                            subset_size=64)
  np.testing.assert_allclose(kid_s, kid, rtol=1e-4, atol=1e-6)
