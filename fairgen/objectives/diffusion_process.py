"""The Gaussian diffusion process of DDPM (Ho et al. 2020): schedules, the forward process,
its posterior, the samplers' update and the variational bound's terms. Pure functions.

Timesteps are indices ``t = 0 .. T-1`` (the paper's ``t = 1 .. T``): ``alpha_bar[t]`` is
``prod_{s <= t} (1 - beta_s)``, so ``q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0,
(1 - alpha_bar_t) I)``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "x0", "v")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A noise schedule's per-timestep constants (float32 arrays of length T)."""

  betas: np.ndarray
  alpha_bar: np.ndarray
  alpha_bar_prev: np.ndarray  # alpha_bar[t - 1], 1 at t = 0.
  posterior_variance: np.ndarray  # beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t).

  @property
  def num_timesteps(self) -> int:
    return len(self.betas)


def make_schedule(name: str, timesteps: int, beta_start: float = 1e-4,
                  beta_end: float = 0.02, cosine_s: float = 0.008) -> Schedule:
  """The ``linear`` schedule of Ho et al. (betas from ``beta_start`` to ``beta_end``) or the
  ``cosine`` one of Nichol & Dhariwal 2021 (``alpha_bar(t) = cos^2((t/T + s)/(1 + s) pi/2)``
  normalised to 1 at t = 0, betas clipped at 0.999), computed in float64."""
  if name == "linear":
    betas = np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)
  elif name == "cosine":
    f = np.cos((np.arange(timesteps + 1) / timesteps + cosine_s) / (1 + cosine_s)
               * math.pi / 2) ** 2
    betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
  else:
    raise ValueError(f"Unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}.")
  alpha_bar = np.cumprod(1.0 - betas)
  alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
  posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
  f32 = lambda a: np.asarray(a, np.float32)
  return Schedule(f32(betas), f32(alpha_bar), f32(alpha_bar_prev), f32(posterior_variance))


def _at(values: np.ndarray | jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """``values[t]`` shaped to broadcast against ``ndim``-dimensional images."""
  return jnp.asarray(values)[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def q_sample(s: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """A draw of ``x_t ~ q(x_t | x_0)``: ``sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``."""
  ab = _at(s.alpha_bar, t, x0.ndim)
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def target(s: Schedule, prediction: str, x0: jax.Array, t: jax.Array,
           noise: jax.Array) -> jax.Array:
  """What the network regresses: the noise (``eps``), the clean image (``x0``), or ``v =
  sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0`` (Salimans & Ho 2022)."""
  if prediction == "eps":
    return noise
  if prediction == "x0":
    return x0
  ab = _at(s.alpha_bar, t, x0.ndim)
  return jnp.sqrt(ab) * noise - jnp.sqrt(1.0 - ab) * x0


def predict_x0_eps(s: Schedule, prediction: str, x_t: jax.Array, t: jax.Array,
                   out: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(x_0, eps)`` implied by the network output ``out`` at ``x_t``."""
  ab = _at(s.alpha_bar, t, x_t.ndim)
  if prediction == "eps":
    return (x_t - jnp.sqrt(1.0 - ab) * out) / jnp.sqrt(ab), out
  if prediction == "x0":
    return out, (x_t - jnp.sqrt(ab) * out) / jnp.sqrt(1.0 - ab)
  x0 = jnp.sqrt(ab) * x_t - jnp.sqrt(1.0 - ab) * out
  return x0, jnp.sqrt(1.0 - ab) * x_t + jnp.sqrt(ab) * out


def posterior_mean(s: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
  """The mean of ``q(x_{t-1} | x_t, x_0)`` (Ho et al. eq. 7)."""
  b, ab, abp = (_at(v, t, x_t.ndim) for v in (s.betas, s.alpha_bar, s.alpha_bar_prev))
  return (jnp.sqrt(abp) * b / (1.0 - ab)) * x0 + (jnp.sqrt(1.0 - b) * (1.0 - abp)
                                                  / (1.0 - ab)) * x_t


def ddim_step(x0: jax.Array, eps: jax.Array, ab_prev: jax.Array, ab: jax.Array,
              eta: float, noise: jax.Array) -> jax.Array:
  """One step of DDIM (Song et al. 2021, eq. 12) from ``alpha_bar = ab`` to ``ab_prev``.

  ``sigma = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev)``: eta = 0 is the
  deterministic DDIM sampler; eta = 1 is ancestral sampling with the posterior variance (on
  every timestep, DDPM's sampler; on a subsequence, the respaced chain of Nichol & Dhariwal).
  """
  sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
  direction = jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma**2, 0.0)) * eps
  return jnp.sqrt(ab_prev) * x0 + direction + sigma * noise


def sample_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
  """The ``steps`` timesteps a sampler visits, descending, evenly spaced from T-1 to 0."""
  return np.unique(np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int32))[::-1]


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array,
              logvar2: jax.Array) -> jax.Array:
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _approx_std_normal_cdf(x: jax.Array) -> jax.Array:
  """The standard normal CDF (Ho et al.'s tanh approximation, for parity with their
  bits/dim)."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, mean: jax.Array,
                                        log_scale: jax.Array) -> jax.Array:
  """log P(x) of 8-bit data in [-1, 1] under N(mean, e^(2 log_scale)) integrated over each
  value's bin of width 2/255 (the end bins reach to -inf and +inf): DDPM's decoder
  ``L_0``, elementwise, in nats."""
  centred = x - mean
  inv_std = jnp.exp(-log_scale)
  cdf_plus = _approx_std_normal_cdf(inv_std * (centred + 1.0 / 255.0))
  cdf_min = _approx_std_normal_cdf(inv_std * (centred - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def model_log_variance(s: Schedule) -> np.ndarray:
  """The reverse process's fixed log-variance of Ho et al.'s CIFAR-10 model ('fixedlarge'):
  ``beta_t``, except at the first step, which takes the posterior variance of the second
  (as ``diffusion_tf`` does: the first step's own posterior variance is 0)."""
  variance = np.append(s.posterior_variance[1], s.betas[1:]) if len(s.betas) > 1 else s.betas
  return np.log(np.asarray(variance, np.float64)).astype(np.float32)
