"""Sample-quality metrics on backbone features: FID, KID, Inception Score and PRDC.

Every metric works on plain feature vectors ``[num_samples, num_features]`` from any
backbone (a small MNIST classifier today, InceptionV3 later) or on class probabilities
``[num_samples, num_classes]``. Heavy batch work (moments, kernels, distances) runs in
jitted float32 jnp code on whatever device holds the array (sharding on the first axis
is left to XLA); the final reductions run in float64 NumPy on the host. All matmuls ask
for ``Precision.HIGHEST`` so TPUs/GPUs do not silently drop to bf16/TF32 passes.

References:
  FID: Heusel et al. 2017. KID: Binkowski et al. 2018 (``polynomial_mmd_averages``).
  IS: Salimans et al. 2016. PRDC: Kynkaanniemi et al. 2019 and Naeem et al. 2020
  (clovaai/generative-evaluation-prdc).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from scipy import special

_HIGHEST = jax.lax.Precision.HIGHEST
# Moments waiting on device before FeatureStats folds them into the float64 sums.
_MAX_PENDING = 4
# Relative tolerances of the Frechet distance input checks and result.
_SYMMETRY_RTOL = 1e-5
_PSD_RTOL = 1e-4
_NEGATIVE_FD_RTOL = 1e-6
# Rows of a probability matrix must sum to one within this tolerance.
_PROB_SUM_ATOL = 1e-3
# A validated feature matrix: numpy stays numpy, jax arrays stay on their devices.
_Features = np.ndarray | jax.Array


def _as_2d(x: ArrayLike, name: str) -> _Features:
  """Returns ``x`` as an array (jax arrays stay on device) after a rank check."""
  if not isinstance(x, (jax.Array, np.ndarray)):
    x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(
        f"{name} must be 2-D [num_samples, num_features], got shape {tuple(x.shape)}.")
  return x


def _check_pair(x: ArrayLike, y: ArrayLike, names: tuple[str, str],
                min_samples: int) -> tuple[_Features, _Features]:
  """Checks two feature matrices for rank, matching width and sample counts."""
  x, y = _as_2d(x, names[0]), _as_2d(y, names[1])
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"{names[0]} and {names[1]} have different feature dims: "
                     f"{x.shape[1]} vs {y.shape[1]}.")
  for arr, name in ((x, names[0]), (y, names[1])):
    if arr.shape[0] < min_samples:
      raise ValueError(
          f"{name} needs at least {min_samples} samples, got {arr.shape[0]}.")
  return x, y


# --- FID: streaming Gaussian statistics and the Frechet distance. -------------------


@jax.jit
def batch_moments(features: jax.Array,
                  reference: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Shifted first and second moment sums of one batch, in float32.

  Shifting by a fixed ``reference`` close to the data mean keeps the float32 sums free
  of catastrophic cancellation when the features have a large mean.

  Args:
    features: ``[batch, d]`` array; may be sharded on its first axis.
    reference: ``[d]`` shift vector.

  Returns:
    ``(sum_i (x_i - r), sum_i (x_i - r)(x_i - r)^T)`` of shapes ``[d]`` and ``[d, d]``.
  """
  x = features.astype(jnp.float32) - reference.astype(jnp.float32)
  return jnp.sum(x, axis=0), jnp.matmul(x.T, x, precision=_HIGHEST)


@jax.jit
def _column_mean(features: jax.Array) -> jax.Array:
  return jnp.mean(features.astype(jnp.float32), axis=0)


class FeatureStats:
  """Streaming mean and covariance of feature vectors, e.g. for FID.

  Each ``update`` runs the jitted float32 ``batch_moments`` on the batch, shifted by the
  first batch's mean; the per-batch sums are combined on the host in float64.

  Example:
    stats = FeatureStats()
    for batch in batches:
      stats.update(backbone(batch))
    mu, sigma = stats.mean(), stats.cov()
  """

  def __init__(self, num_features: int | None = None):
    """Creates empty statistics; ``num_features`` is inferred from the first batch."""
    self._num_features = num_features
    self._count = 0
    self._reference_device: jax.Array | None = None
    self._reference: np.ndarray | None = None
    self._sum: np.ndarray | None = None
    self._outer: np.ndarray | None = None
    self._pending: list[tuple[jax.Array, jax.Array]] = []

  @property
  def count(self) -> int:
    """Number of feature vectors seen so far."""
    return self._count

  @property
  def num_features(self) -> int | None:
    """Feature dimension, or None before the first batch."""
    return self._num_features

  def update(self, features: ArrayLike) -> None:
    """Adds a ``[batch, num_features]`` batch (numpy or jax, possibly sharded)."""
    features = _as_2d(features, "features")
    n, d = features.shape
    if self._num_features is None:
      self._num_features = d
    elif d != self._num_features:
      raise ValueError(f"features have dim {d}, expected {self._num_features}.")
    if n == 0:
      return
    if self._reference_device is None:
      self._reference_device = _column_mean(features)
    self._pending.append(batch_moments(features, self._reference_device))
    self._count += n
    if len(self._pending) >= _MAX_PENDING:
      self._flush()

  def merge(self, other: FeatureStats) -> None:
    """Adds the samples summarised by ``other`` into ``self`` (float64, exact shift)."""
    if (self._num_features is not None and other.num_features is not None and
        self._num_features != other.num_features):
      raise ValueError(f"Cannot merge stats of dim {other.num_features} into dim "
                       f"{self._num_features}.")
    self._flush()
    other._flush()
    if other.count == 0:
      return
    if self._count == 0:
      self._num_features = other.num_features
      self._reference_device = other._reference_device
      self._reference = other._reference.copy()
      self._sum, self._outer = other._sum.copy(), other._outer.copy()
      self._count = other.count
      return
    # x - r = (x - r_other) + delta, with delta = r_other - r.
    delta = other._reference - self._reference
    s_other, n_other = other._sum, other.count
    self._outer += (other._outer + np.outer(s_other, delta) + np.outer(delta, s_other) +
                    n_other * np.outer(delta, delta))
    self._sum += s_other + n_other * delta
    self._count += n_other

  def mean(self) -> np.ndarray:
    """Returns the float64 mean ``[num_features]``; needs at least one sample."""
    if self._count < 1:
      raise ValueError("FeatureStats.mean() needs at least 1 sample, got 0.")
    self._flush()
    return self._reference + self._sum / self._count

  def cov(self) -> np.ndarray:
    """Returns the unbiased (ddof=1) float64 covariance; needs at least 2 samples."""
    if self._count < 2:
      raise ValueError(
          f"FeatureStats.cov() needs at least 2 samples, got {self._count}.")
    self._flush()
    n = self._count
    cov = (self._outer - np.outer(self._sum, self._sum) / n) / (n - 1)
    return 0.5 * (cov + cov.T)

  def _flush(self) -> None:
    """Folds the pending device sums into the float64 host accumulators."""
    if not self._pending:
      return
    if self._reference is None:
      d = self._num_features
      self._reference = np.asarray(self._reference_device, dtype=np.float64)
      self._sum = np.zeros((d,), np.float64)
      self._outer = np.zeros((d, d), np.float64)
    for batch_sum, batch_outer in self._pending:
      self._sum += np.asarray(batch_sum, dtype=np.float64)
      self._outer += np.asarray(batch_outer, dtype=np.float64)
    self._pending = []


def _psd_eigh(cov: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
  """Eigen-decomposes a symmetric PSD matrix; tiny negative eigenvalues become 0."""
  scale = float(np.max(np.abs(cov), initial=0.0))
  if np.max(np.abs(cov - cov.T), initial=0.0) > _SYMMETRY_RTOL * scale:
    raise ValueError(f"{name} is not symmetric.")
  w, v = np.linalg.eigh(0.5 * (cov + cov.T))
  w_max = float(np.max(np.abs(w), initial=0.0))
  if w.size and w.min() < -_PSD_RTOL * w_max:
    raise ValueError(f"{name} is not positive semidefinite: smallest eigenvalue "
                     f"{w.min():.3e}, largest {w_max:.3e}.")
  return np.clip(w, 0.0, None), v


def frechet_distance(mu1: ArrayLike, cov1: ArrayLike, mu2: ArrayLike,
                     cov2: ArrayLike) -> float:
  """Frechet distance between N(mu1, cov1) and N(mu2, cov2), in float64 on the host.

  ``||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr(sqrtm(C1 C2))`` with the symmetric form
  ``tr(sqrtm(C1 C2)) = sum sqrt(eig(S1 C2 S1))``, ``S1 = sqrtm(C1)`` from ``eigh``. The
  eigenvalues of ``S1 C2 S1 = (S2 S1)^T (S2 S1)`` are the squared singular values of
  ``S2 S1``, so the trace is evaluated as the nuclear norm of ``S2 S1``: the same
  quantity without the square root that turns rounding noise ``eps`` in null
  directions into ``sqrt(eps)`` (rank-deficient covariances stay exact).

  Args:
    mu1: ``[d]`` mean of the first Gaussian.
    cov1: ``[d, d]`` symmetric PSD covariance of the first Gaussian.
    mu2: ``[d]`` mean of the second Gaussian.
    cov2: ``[d, d]`` symmetric PSD covariance of the second Gaussian.

  Returns:
    The distance, ``>= 0``; negatives within ``1e-6 * scale`` of 0 are rounded to 0.

  Raises:
    ValueError: on bad shapes, NaN/inf, asymmetric or non-PSD covariances.
    RuntimeError: if the result is negative beyond rounding (a numerical failure).
  """
  arrays = {}
  for name, value, ndim in (("mu1", mu1, 1), ("cov1", cov1, 2), ("mu2", mu2, 1),
                            ("cov2", cov2, 2)):
    value = np.asarray(value, dtype=np.float64)
    if value.ndim != ndim:
      raise ValueError(f"{name} must be {ndim}-D, got shape {value.shape}.")
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{name} contains NaN or inf.")
    arrays[name] = value
  d = arrays["mu1"].shape[0]
  for name, shape in (("mu2", (d,)), ("cov1", (d, d)), ("cov2", (d, d))):
    if arrays[name].shape != shape:
      raise ValueError(f"{name} has shape {arrays[name].shape}, expected {shape} "
                       f"to match mu1 of shape {(d,)}.")
  w1, v1 = _psd_eigh(arrays["cov1"], "cov1")
  w2, v2 = _psd_eigh(arrays["cov2"], "cov2")
  sqrt1 = (v1 * np.sqrt(w1)) @ v1.T
  sqrt2 = (v2 * np.sqrt(w2)) @ v2.T
  trace_sqrt = float(np.sum(np.linalg.svd(sqrt2 @ sqrt1, compute_uv=False)))
  diff = arrays["mu1"] - arrays["mu2"]
  scale = float(diff @ diff + w1.sum() + w2.sum())
  result = scale - 2.0 * trace_sqrt
  if result < 0.0:
    if result < -_NEGATIVE_FD_RTOL * scale:
      raise RuntimeError(f"Frechet distance came out negative ({result:.6e}, scale "
                         f"{scale:.6e}); the covariances are numerically broken.")
    result = 0.0
  return float(result)


def fid_from_features(feats1: ArrayLike, feats2: ArrayLike) -> float:
  """Frechet distance between Gaussians fitted to two ``[n, d]`` feature sets."""
  feats1, feats2 = _check_pair(feats1, feats2, ("feats1", "feats2"), min_samples=2)
  stats1, stats2 = FeatureStats(), FeatureStats()
  stats1.update(feats1)
  stats2.update(feats2)
  return frechet_distance(stats1.mean(), stats1.cov(), stats2.mean(), stats2.cov())


# --- KID: unbiased MMD^2 with the cubic polynomial kernel over random subsets. ------


def kid_subset_indices(num_samples1: int, num_samples2: int, num_subsets: int = 100,
                       subset_size: int = 1000,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Row indices of the KID subsets, drawn without replacement per subset.

  Args:
    num_samples1: rows in the first feature set.
    num_samples2: rows in the second feature set.
    num_subsets: number of subsets.
    subset_size: requested subset size, capped at ``min(num_samples1, num_samples2)``.
    seed: seed of ``np.random.default_rng``.

  Returns:
    Two int32 arrays ``[num_subsets, m]`` indexing the first and second set.
  """
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be >= 1, got {num_subsets}.")
  m = min(subset_size, num_samples1, num_samples2)
  if m < 2:
    raise ValueError(f"KID needs subsets of at least 2 samples, got {m} (subset_size="
                     f"{subset_size}, sets of {num_samples1} and {num_samples2}).")
  rng = np.random.default_rng(seed)
  idx1 = np.empty((num_subsets, m), np.int32)
  idx2 = np.empty((num_subsets, m), np.int32)
  for i in range(num_subsets):
    idx1[i] = rng.choice(num_samples1, m, replace=False)
    idx2[i] = rng.choice(num_samples2, m, replace=False)
  return idx1, idx2


@jax.jit
def _kid_row_sums(x_all: jax.Array, y_all: jax.Array, idx1: jax.Array,
                  idx2: jax.Array) -> jax.Array:
  """Per-subset float32 row sums ``[num_subsets, 3, m]`` for the MMD^2 estimator.

  Rows: off-diagonal ``Kxx + Kyy - Kxy - Kxy^T`` (differences first, so the float32
  sums do not cancel), off-diagonal ``Kxy`` and the diagonal of ``Kxy``.
  """
  x_all = x_all.astype(jnp.float32)
  y_all = y_all.astype(jnp.float32)
  inv_dim = 1.0 / x_all.shape[1]
  m = idx1.shape[1]
  off_diag = 1.0 - jnp.eye(m, dtype=jnp.float32)

  def kernel(a, b):
    return (jnp.matmul(a, b.T, precision=_HIGHEST) * inv_dim + 1.0)**3

  def one_subset(indices):
    x, y = x_all[indices[0]], y_all[indices[1]]
    k_xy = kernel(x, y)
    h = (kernel(x, x) + kernel(y, y) - k_xy - k_xy.T) * off_diag
    return jnp.stack([h.sum(axis=1), (k_xy * off_diag).sum(axis=1), jnp.diagonal(k_xy)])

  return jax.lax.map(one_subset, (idx1, idx2))


def kernel_inception_distance(feats1: ArrayLike, feats2: ArrayLike,
                              num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
  """KID: unbiased MMD^2 with ``k(x, y) = (x.y / d + 1)^3``, averaged over subsets.

  Matches ``polynomial_mmd_averages`` (Binkowski et al. 2018) with
  ``mmd_est='unbiased'``: ``sum_{i!=j} (Kxx + Kyy) / (m (m - 1)) - 2 sum Kxy / m^2``.

  Args:
    feats1: ``[n1, d]`` features (e.g. real).
    feats2: ``[n2, d]`` features (e.g. generated).
    num_subsets: number of random subsets.
    subset_size: subset size, capped at ``min(n1, n2)``.
    seed: seed of the subset draw (see ``kid_subset_indices``).

  Returns:
    ``(mean, std)`` of the per-subset MMD^2 (population std, ddof=0).
  """
  feats1, feats2 = _check_pair(feats1, feats2, ("feats1", "feats2"), min_samples=2)
  idx1, idx2 = kid_subset_indices(feats1.shape[0], feats2.shape[0], num_subsets,
                                  subset_size, seed)
  m = idx1.shape[1]
  sums = np.asarray(_kid_row_sums(feats1, feats2, idx1, idx2), np.float64).sum(axis=-1)
  h_sum, xy_off_sum, xy_diag_sum = sums[:, 0], sums[:, 1], sums[:, 2]
  pairs = m * (m - 1)
  mmd2 = h_sum / pairs + (2.0 / m) * (xy_off_sum / pairs - xy_diag_sum / m)
  return float(np.mean(mmd2)), float(np.std(mmd2))


# --- Inception Score. ---------------------------------------------------------------


def inception_score(probs: ArrayLike, num_splits: int = 10) -> tuple[float, float]:
  """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` per split, in float64.

  Split ``i`` is rows ``[i n // s, (i + 1) n // s)``; ``p(y)`` is the split's mean.
  Zero probabilities contribute ``0 log 0 = 0``.

  Args:
    probs: ``[n, num_classes]`` class probabilities (rows sum to 1).
    num_splits: number of splits; needs ``n >= num_splits``.

  Returns:
    ``(mean, std)`` over splits (population std, ddof=0).
  """
  probs = np.asarray(_as_2d(probs, "probs"), dtype=np.float64)
  if num_splits < 1:
    raise ValueError(f"num_splits must be >= 1, got {num_splits}.")
  n = probs.shape[0]
  if n < num_splits:
    raise ValueError(f"probs needs at least num_splits={num_splits} rows, got {n}.")
  if not np.all(np.isfinite(probs)) or np.any(probs < 0):
    raise ValueError("probs must be finite and non-negative.")
  if np.any(np.abs(probs.sum(axis=1) - 1.0) > _PROB_SUM_ATOL):
    raise ValueError("probs rows must sum to 1 (pass softmax outputs, not logits).")
  scores = []
  for i in range(num_splits):
    part = probs[i * n // num_splits:(i + 1) * n // num_splits]
    marginal = part.mean(axis=0, keepdims=True)
    kl = np.sum(special.xlogy(part, part) - special.xlogy(part, marginal), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


# --- PRDC: precision, recall, density and coverage. ---------------------------------


def _distances(a: jax.Array, b: jax.Array, b_sq: jax.Array) -> jax.Array:
  """Euclidean distances ``[len(a), len(b)]`` via ``|a|^2 + |b|^2 - 2 a.b``."""
  a_sq = jnp.sum(a * a, axis=1)
  d2 = a_sq[:, None] + b_sq[None, :] - 2.0 * jnp.matmul(a, b.T, precision=_HIGHEST)
  return jnp.sqrt(jnp.maximum(d2, 0.0))


def _row_chunks(x: jax.Array, chunk_size: int, fill: float = 0.0) -> jax.Array:
  """Pads the rows of ``x`` to a multiple of ``chunk_size`` and splits them."""
  n = x.shape[0]
  pad = -n % chunk_size
  x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
  return x.reshape((-1, chunk_size) + x.shape[1:])


def _knn_radii(x: jax.Array, k: int, chunk_size: int) -> jax.Array:
  """Distance of each row of ``x`` to its k-th nearest neighbour, self excluded."""
  x_sq = jnp.sum(x * x, axis=1)

  def one_chunk(rows):
    return jax.lax.top_k(-_distances(rows, x, x_sq), k + 1)[0]

  # Slice after the loop: slicing top_k's output inside it stops XLA:CPU from
  # recognising the top-k and makes it fully sort every row (~30x slower).
  neg_smallest = jax.lax.map(one_chunk, _row_chunks(x, chunk_size))
  # The (k+1)-th smallest distance, counting the zero self-distance.
  return -neg_smallest[:, :, k].reshape(-1)[:x.shape[0]]


@functools.partial(jax.jit, static_argnames=("nearest_k", "chunk_size"))
def _prdc_device(real: jax.Array, fake: jax.Array, nearest_k: int,
                 chunk_size: int) -> tuple[jax.Array, ...]:
  """Per-sample PRDC statistics, computed in row chunks of ``chunk_size``."""
  real = real.astype(jnp.float32)
  fake = fake.astype(jnp.float32)
  # Distances are shift-invariant; centring shrinks the |a|^2 + |b|^2 rounding.
  center = jnp.mean(real, axis=0)
  real, fake = real - center, fake - center
  real_radii = _knn_radii(real, nearest_k, min(chunk_size, real.shape[0]))
  fake_radii = _knn_radii(fake, nearest_k, min(chunk_size, fake.shape[0]))
  fake_sq = jnp.sum(fake * fake, axis=1)
  chunk = min(chunk_size, real.shape[0])

  def step(counts, inputs):
    rows, radii = inputs
    dist = _distances(rows, fake, fake_sq)  # [chunk, num_fake]
    counts += jnp.sum(dist < radii[:, None], axis=0, dtype=jnp.int32)
    covered = jnp.min(dist, axis=1) < radii
    recalled = jnp.any(dist < fake_radii[None, :], axis=1)
    return counts, (covered, recalled)

  # Padded real rows get radius -1: they contain no fake and are sliced off below.
  counts, (covered, recalled) = jax.lax.scan(
      step, jnp.zeros((fake.shape[0],), jnp.int32),
      (_row_chunks(real, chunk), _row_chunks(real_radii, chunk, fill=-1.0)))
  n_real = real.shape[0]
  return counts, covered.reshape(-1)[:n_real], recalled.reshape(-1)[:n_real]


def prdc(real_feats: ArrayLike, fake_feats: ArrayLike, nearest_k: int = 5, *,
         chunk_size: int = 1024) -> dict[str, float]:
  """Precision, recall, density and coverage, as in clovaai's ``prdc`` package.

  Radii are distances to the ``nearest_k``-th nearest neighbour within a set (self
  excluded); all ball tests are strict (``dist < radius``).

  Args:
    real_feats: ``[n_real, d]`` real features.
    fake_feats: ``[n_fake, d]`` generated features.
    nearest_k: neighbourhood size ``k``; each set needs at least ``k + 1`` samples.
    chunk_size: rows per distance block; peak memory ~ ``chunk_size * n`` floats.

  Returns:
    Dict with ``precision`` (fakes inside some real ball), ``recall`` (reals inside
    some fake ball), ``density`` (mean number of real balls holding a fake, over k)
    and ``coverage`` (reals whose own ball holds a fake).
  """
  if nearest_k < 1:
    raise ValueError(f"nearest_k must be >= 1, got {nearest_k}.")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  real_feats, fake_feats = _check_pair(real_feats, fake_feats,
                                       ("real_feats", "fake_feats"),
                                       min_samples=nearest_k + 1)
  counts, covered, recalled = jax.device_get(
      _prdc_device(real_feats, fake_feats, nearest_k, chunk_size))
  return {
      "precision": float(np.mean(counts > 0)),
      "recall": float(np.mean(recalled)),
      "density": float(np.mean(counts) / nearest_k),
      "coverage": float(np.mean(covered)),
  }
