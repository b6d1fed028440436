"""Maximum mean discrepancy (Gretton et al. 2012) with Gaussian RBF kernels; jittable.

``MMD^2(P, Q) = E k(x, x') + E k(y, y') - 2 E k(x, y)`` with
``k(a, b) = exp(-|a - b|^2 / (2 sigma^2))``. ``sigma`` is one bandwidth or a 1-D array of
bandwidths whose kernels are averaged (a multi-scale kernel, still characteristic).

Two estimators:
- biased (the default; the V-statistic): every pair, diagonals included. It is >= 0 and
  exactly 0 for identical sets, which makes it a well-behaved training penalty (VFAE);
- unbiased (the U-statistic): within-set diagonals left out. Its expectation is the
  population MMD^2, but it can be negative and is not 0 for identical sets.

``masked_mmd2`` compares two groups inside one batch (e.g. ``s = 0`` and ``s = 1``) with
fixed shapes, so it can be jitted and differentiated; a group that is empty (or, for the
unbiased estimate, has fewer than two members) gives 0 with finite gradients, never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

_HIGHEST = jax.lax.Precision.HIGHEST


def squared_distances(x: ArrayLike, y: ArrayLike) -> jax.Array:
  """Pairwise squared Euclidean distances ``[n, m]`` between the rows of ``x`` and ``y``."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  xy = jnp.matmul(x, y.T, precision=_HIGHEST)
  d2 = jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :] - 2.0 * xy
  return jnp.maximum(d2, 0.0)  # Cancellation can leave tiny negatives.


def rbf_kernel(x: ArrayLike, y: ArrayLike, sigma: ArrayLike) -> jax.Array:
  """Gaussian kernel matrix ``[n, m]``, averaged over the bandwidths in ``sigma``."""
  return _rbf_from_d2(squared_distances(x, y), sigma)


def _rbf_from_d2(d2: jax.Array, sigma: ArrayLike) -> jax.Array:
  sigma = jnp.atleast_1d(jnp.asarray(sigma, jnp.float32))
  return jnp.mean(jnp.exp(-d2[..., None] / (2.0 * sigma**2)), axis=-1)


def median_bandwidth(z: ArrayLike) -> jax.Array:
  """The median heuristic: the median distance between distinct rows of ``z``.

  Not differentiated through (``stop_gradient``): the bandwidth is a property of the
  kernel, not a quantity to optimise. At least 1e-3, so collapsed rows give no zero.
  """
  z = jnp.asarray(z, jnp.float32)
  n = z.shape[0]
  rows, cols = jnp.triu_indices(n, k=1)
  d2 = squared_distances(z, z)[rows, cols]
  return jax.lax.stop_gradient(jnp.maximum(jnp.sqrt(jnp.median(d2)), 1e-3))


def _quad(a: jax.Array, k: jax.Array, b: jax.Array) -> jax.Array:
  """``a^T k b`` at full float32 precision."""
  return jnp.dot(a, jnp.dot(k, b, precision=_HIGHEST), precision=_HIGHEST)


def mmd2(x: ArrayLike, y: ArrayLike, sigma: ArrayLike, unbiased: bool = False) -> jax.Array:
  """MMD^2 between the samples ``x`` ``[n, d]`` and ``y`` ``[m, d]``.

  Args:
    x: samples of the first distribution.
    y: samples of the second distribution.
    sigma: a bandwidth, or a 1-D array of bandwidths (their kernels are averaged).
    unbiased: the U-statistic (needs n, m >= 2) instead of the biased V-statistic.

  Returns:
    A scalar.
  """
  k_xx, k_yy, k_xy = rbf_kernel(x, x, sigma), rbf_kernel(y, y, sigma), rbf_kernel(x, y, sigma)
  if not unbiased:
    return jnp.mean(k_xx) + jnp.mean(k_yy) - 2.0 * jnp.mean(k_xy)
  n, m = k_xx.shape[0], k_yy.shape[0]
  if n < 2 or m < 2:
    raise ValueError(f"The unbiased MMD^2 needs >= 2 samples per set, got {n} and {m}.")
  within_x = (jnp.sum(k_xx) - jnp.trace(k_xx)) / (n * (n - 1))
  within_y = (jnp.sum(k_yy) - jnp.trace(k_yy)) / (m * (m - 1))
  return within_x + within_y - 2.0 * jnp.mean(k_xy)


def masked_mmd2(z: ArrayLike, group: ArrayLike, sigma: ArrayLike,
                weight: ArrayLike | None = None, unbiased: bool = False) -> jax.Array:
  """MMD^2 between the rows of ``z`` with ``group == 0`` and those with ``group == 1``.

  Equals ``mmd2(z[group == 0], z[group == 1], sigma, unbiased)`` with uniform weights,
  but keeps static shapes. With ``weight``, each group is the weighted empirical
  distribution (self-normalised within the group, as ``objectives.losses.weighted_mean``).

  Args:
    z: rows ``[n, d]``.
    group: binary group of each row ``[n]``.
    sigma: a bandwidth or a 1-D array of bandwidths.
    weight: optional non-negative importance weights ``[n]``.
    unbiased: the U-statistic: within-group diagonals left out, with the weighted
      normaliser ``1 - sum(w^2)`` (``n (n - 1)`` for uniform weights).

  Returns:
    A scalar; 0 if a group is empty (unbiased: has fewer than two rows).
  """
  z = jnp.asarray(z, jnp.float32)
  group = jnp.asarray(group)
  w = jnp.ones(group.shape, jnp.float32) if weight is None else jnp.asarray(weight, jnp.float32)
  masks = [w * (group == g).astype(jnp.float32) for g in (0, 1)]
  totals = [jnp.sum(m) for m in masks]
  present = (totals[0] > 0) & (totals[1] > 0)
  # Normalised weights; an empty group gets zeros (the safe divisor keeps gradients finite).
  p0, p1 = (m / jnp.where(t > 0, t, 1.0) for m, t in zip(masks, totals))
  k = rbf_kernel(z, z, sigma)
  diag = jnp.diagonal(k)

  def within(p):
    total = _quad(p, k, p)
    if not unbiased:
      return total, jnp.array(True)
    sq = jnp.sum(p * p)
    ok = sq < 1.0 - 1e-6  # False for a group with a single (positive-weight) row.
    return (total - jnp.sum(p * p * diag)) / jnp.where(ok, 1.0 - sq, 1.0), ok

  (w0, ok0), (w1, ok1) = within(p0), within(p1)
  value = w0 + w1 - 2.0 * _quad(p0, k, p1)
  return jnp.where(present & ok0 & ok1, value, 0.0)
