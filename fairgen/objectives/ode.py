"""Probability-flow ODEs: adaptive integration and exact log-likelihood (pure functions).

Both use diffrax (Kidger 2021), the maintained JAX ODE library: Tsit5 with a PID step-size
controller. The likelihood integrates the instantaneous change of variables (Chen et al.
2018; Song et al. 2021, "Score-Based Generative Modeling through SDEs", appendix D.2)

  log p_0(x(t0)) = log p_1(x(t1)) + int_{t0}^{t1} div f(x(t), t) dt,

from the data at ``t0`` to the prior at ``t1``, with the divergence estimated by
Hutchinson's trace estimator ``E[e^T (df/dx) e]`` (Rademacher probes, one
Jacobian-vector product per probe and evaluation; Grathwohl et al. 2019). The networks
act on each example separately, so one batched JVP gives every example's own trace.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

# (x [B, ...], t scalar) -> dx/dt [B, ...].
Drift = Callable[[jax.Array, jax.Array], jax.Array]


def _diffrax() -> Any:
  """diffrax, imported on first use: it takes about a second to import, which every
  fairgen process would pay otherwise, and only the adaptive sampler and the likelihood
  need it."""
  return importlib.import_module("diffrax")


def solve(drift: Drift, x: jax.Array, t0: float, t1: float, *, rtol: float, atol: float,
          max_steps: int = 4096) -> tuple[jax.Array, jax.Array]:
  """``x(t1)`` of ``dx/dt = drift(x, t)`` from ``x(t0) = x`` by adaptive Tsit5, and the
  number of drift evaluations it took."""
  diffrax = _diffrax()
  term = diffrax.ODETerm(lambda t, y, args: drift(y, t))
  sol = diffrax.diffeqsolve(
      term, diffrax.Tsit5(), t0, t1, (t1 - t0) / 16, x,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
  return sol.ys[-1], _evaluations(sol)


def _evaluations(sol: Any) -> jax.Array:
  """Tsit5 evaluates the drift 6 times per attempted step (first-same-as-last saves one)."""
  return 6 * sol.stats["num_steps"] + 1


def divergence_probes(key: jax.Array, shape: tuple[int, ...], probes: int) -> jax.Array:
  """``probes`` Rademacher vectors of ``shape`` (``[probes, *shape]``)."""
  return jax.random.rademacher(key, (probes,) + tuple(shape), jnp.float32)


def log_likelihood(drift: Drift, x: jax.Array, t0: float, t1: float,
                   prior_logp: Callable[[jax.Array], jax.Array], key: jax.Array, *,
                   probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5,
                   max_steps: int = 4096) -> tuple[jax.Array, jax.Array]:
  """``log p_0(x)`` per example (nats) under the flow of ``drift`` from ``t0`` to ``t1``
  with ``prior_logp`` at ``t1``, and the number of drift evaluations.

  The divergence is Hutchinson's estimate with ``probes`` Rademacher vectors (drawn once
  from ``key`` and held fixed along the path, which keeps the ODE smooth): unbiased for
  each path, exact where the Jacobian is diagonal.
  """
  eps = divergence_probes(key, x.shape, probes)
  axes = tuple(range(1, x.ndim))

  def augmented(t, y, args):
    state, _ = y
    def jvp(e):
      return jax.jvp(lambda z: drift(z, t), (state,), (e,))
    values, products = jax.vmap(jvp)(eps)
    div = jnp.mean(jnp.sum(products * eps, axis=tuple(a + 1 for a in axes)), axis=0)
    return values[0], div

  diffrax = _diffrax()
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(augmented), diffrax.Tsit5(), t0, t1, (t1 - t0) / 16,
      (x, jnp.zeros(x.shape[0], jnp.float32)),
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
  end, integral = sol.ys[0][-1], sol.ys[1][-1]
  return prior_logp(end) + integral, _evaluations(sol)


def nll_terms(drift: Drift, x0: jax.Array, keys: jax.Array, t0: float, t1: float,
              prior_std: float, *, probes: int, tol: float) -> dict[str, jax.Array]:
  """The objectives' likelihood evaluation of 8-bit images ``x0`` (one key each): the flow's
  density of the dequantized images (``log_likelihood`` from ``t0`` to the ``N(0,
  prior_std^2 I)`` prior at ``t1``, tolerance ``tol``) as the discrete negative
  log-likelihood in nats (``nll``), and the drift evaluations it took (``nfe``)."""
  x = dequantized(x0, jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys))
  logp, nfe = log_likelihood(drift, x, t0, t1, lambda z: gaussian_logp(z, prior_std),
                             jax.random.fold_in(keys[0], 1), probes=probes, rtol=tol,
                             atol=tol)
  return {"nll": discrete_nll(logp, x0), "nfe": jnp.full((x0.shape[0],), nfe, jnp.float32)}


def gaussian_logp(x: jax.Array, std: float) -> jax.Array:
  """``log N(x; 0, std^2 I)`` per example."""
  d = math.prod(x.shape[1:])
  sq = jnp.sum(jnp.reshape(x, (x.shape[0], -1)) ** 2, axis=1)
  return -0.5 * sq / std**2 - d * (math.log(std) + 0.5 * math.log(2 * math.pi))


def dequantized(x: jax.Array, keys: jax.Array) -> jax.Array:
  """8-bit images in [-1, 1] (values ``k / 127.5 - 1``) moved uniformly within their bins of
  width 2/255, one key per example: a continuous density's ``-log p`` of these, plus
  ``D log(127.5)``, bounds the discrete negative log-likelihood (``discrete_nll``)."""
  u = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:]))(keys)
  return x + (u - 0.5) * (2.0 / 255.0)


def discrete_nll(logp: jax.Array, x: jax.Array) -> jax.Array:
  """The discrete negative log-likelihood in nats of 8-bit data from a density's ``logp``
  at the dequantized values: ``-logp + D log(127.5)`` (bins of width 2/255)."""
  return -logp + math.prod(x.shape[1:]) * math.log(127.5)
