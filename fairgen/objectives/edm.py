"""EDM: Karras, Aittala, Aila & Laine, "Elucidating the Design Space of Diffusion-Based
Generative Models" (NeurIPS 2022; ``NVlabs/edm``'s ``training/loss.py``,
``training/networks.py`` and ``generate.py``).

The model is a denoiser ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)`` of images
noised as ``x = y + sigma n``. ``objective.parameterization`` picks one of the paper's three
columns of Table 1, each its preconditioning, its training noise levels and its loss
weight ``lambda(sigma)``:

- ``edm``: ``c_skip = s_d^2 / (sigma^2 + s_d^2)``, ``c_out = sigma s_d / sqrt(sigma^2 + s_d^2)``,
  ``c_in = 1 / sqrt(sigma^2 + s_d^2)``, ``c_noise = ln(sigma) / 4``; ``ln sigma ~
  N(P_mean, P_std^2)``; ``lambda = (sigma^2 + s_d^2) / (sigma s_d)^2``;
- ``vp`` (Song et al.'s VP SDE, beta_d = 19.9, beta_min = 0.1): ``c_skip = 1``,
  ``c_out = -sigma``, ``c_in = 1 / sqrt(sigma^2 + 1)``, ``c_noise = 999 sigma^-1(sigma)``;
  ``sigma = sigma(t)``, ``t ~ U(1e-5, 1)``; ``lambda = 1 / sigma^2``;
- ``ve``: ``c_skip = 1``, ``c_out = sigma``, ``c_in = 1``, ``c_noise = ln(sigma / 2)``;
  ``sigma`` log-uniform in [0.02, 100]; ``lambda = 1 / sigma^2``.

The per-example loss is ``lambda(sigma) mean((D(y + n; sigma) - y)^2)`` over pixels, so
importance weights enter as one multiplication.

Sampling (any parameterization) solves the probability-flow ODE ``dx/dsigma = (x -
D(x; sigma)) / sigma`` on the noise levels ``sigma_i = (sigma_max^(1/rho) + i / (N - 1)
(sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` (rho = 7) then 0: the paper's Algorithm 1,
Heun's 2nd-order method with a last Euler step (``2N - 1`` network evaluations), or Euler
(``N``). With ``s_churn`` > 0 it is Algorithm 2, the stochastic sampler: at noise levels in
``[s_tmin, s_tmax]`` it first adds noise of std ``s_noise`` to raise sigma by ``gamma =
min(s_churn / N, sqrt(2) - 1)``. The noise levels are clamped to the parameterization's
range, as ``generate.py`` does. ``nll`` integrates the same ODE (in ``ln sigma``) with
Hutchinson's trace (``fairgen.objectives.ode``) for bits/dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fairgen.config import require
from fairgen.objectives import base
from fairgen.objectives import denoising
from fairgen.objectives import ode
from fairgen.objectives.registry import OBJECTIVES, Entry

PARAMETERIZATIONS = ("edm", "vp", "ve")
SAMPLERS = ("heun", "euler")
VP_BETA_D, VP_BETA_MIN, VP_EPSILON_T, VP_M = 19.9, 0.1, 1e-5, 1000
VE_SIGMA_MIN, VE_SIGMA_MAX = 0.02, 100.0
DEFAULTS = {
    "parameterization": "edm",  # 'edm', 'vp' or 've' (the paper's Table 1).
    "sigma_data": 0.5,  # EDM's s_d: the data's standard deviation.
    "p_mean": -1.2,  # EDM's training noise: ln sigma ~ N(p_mean, p_std^2).
    "p_std": 1.2,
    "sigma_min": 0.002,  # The sampler's noise levels (clamped to the parameterization's).
    "sigma_max": 80.0,
    "rho": 7.0,
    "sampler": "heun",  # 'heun' (2N - 1 evaluations) or 'euler' (N).
    "sample_steps": 18,  # N: 18 Heun steps are 35 network evaluations.
    "s_churn": 0.0,  # > 0: the stochastic sampler (Algorithm 2).
    "s_tmin": 0.0,
    "s_tmax": 1e9,  # EDM's infinity: every noise level.
    "s_noise": 1.0,
    **denoising.COMMON_DEFAULTS,
}


@dataclasses.dataclass(frozen=True)
class Precond:
  """One column of Karras et al.'s Table 1: preconditioning, training noise and weight."""

  name: str = "edm"
  sigma_data: float = 0.5
  p_mean: float = -1.2
  p_std: float = 1.2

  @property
  def sigma_range(self) -> tuple[float, float]:
    """The noise levels the network is trained on (the sampler's clamp)."""
    if self.name == "vp":
      return vp_sigma(VP_EPSILON_T), vp_sigma(1.0)
    if self.name == "ve":
      return VE_SIGMA_MIN, VE_SIGMA_MAX
    return 0.0, math.inf

  def coefficients(self, sigma: jax.Array) -> tuple[jax.Array, ...]:
    """``(c_skip, c_out, c_in, c_noise)`` at noise levels ``sigma``."""
    one = jnp.ones_like(sigma)
    if self.name == "vp":
      return one, -sigma, 1.0 / jnp.sqrt(sigma**2 + 1.0), (VP_M - 1) * vp_sigma_inv(sigma)
    if self.name == "ve":
      return one, sigma, one, jnp.log(0.5 * sigma)
    sd2 = self.sigma_data**2
    return (sd2 / (sigma**2 + sd2), sigma * self.sigma_data / jnp.sqrt(sigma**2 + sd2),
            1.0 / jnp.sqrt(sigma**2 + sd2), jnp.log(sigma) / 4.0)

  def training_sigma(self, key: jax.Array, n: int) -> jax.Array:
    """``n`` training noise levels drawn from the parameterization's distribution."""
    if self.name == "vp":
      t = 1.0 + jax.random.uniform(key, (n,)) * (VP_EPSILON_T - 1.0)
      return vp_sigma(t)
    if self.name == "ve":
      return VE_SIGMA_MIN * (VE_SIGMA_MAX / VE_SIGMA_MIN) ** jax.random.uniform(key, (n,))
    return jnp.exp(self.p_mean + self.p_std * jax.random.normal(key, (n,)))

  def weight(self, sigma: jax.Array) -> jax.Array:
    """The loss weight ``lambda(sigma)``."""
    if self.name == "edm":
      return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
    return 1.0 / sigma**2


def vp_sigma(t: Any) -> Any:
  """The VP SDE's noise level at time ``t``: ``sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``."""
  lib = jnp if isinstance(t, jax.Array) else np
  return lib.sqrt(lib.exp(0.5 * VP_BETA_D * t**2 + VP_BETA_MIN * t) - 1.0)


def vp_sigma_inv(sigma: jax.Array) -> jax.Array:
  """The time at which the VP SDE reaches noise level ``sigma``."""
  return (jnp.sqrt(VP_BETA_MIN**2 + 2.0 * VP_BETA_D * jnp.log1p(sigma**2)) - VP_BETA_MIN
          ) / VP_BETA_D


def guided_denoise(denoiser: Callable[[jax.Array], jax.Array], x: jax.Array,
                   sigma: jax.Array, groups: jax.Array,
                   guide: denoising.GroupGuidance) -> jax.Array:
  """``D(x) + scale sigma^2 grad_x log p(g | D(x))``: the denoised estimate moved up the
  frozen classifier's log-probability of each sample's group ``g`` (``fairgen/fairness/
  guidance.py``), the gradient taken through the denoiser."""
  grad, d = denoising.group_log_prob_grad(lambda x: (denoiser(x),) * 2, x, groups, guide)
  return d + guide.scale * sigma**2 * grad


def denoise(model: Any, params: Any, precond: Precond, x: jax.Array, sigma: jax.Array,
            labels: jax.Array | None, guidance: float = 0.0, **kwargs: Any) -> jax.Array:
  """``D(x; sigma)`` (``sigma``: ``[B]``), guided with weight ``guidance`` for a conditional
  network; ``kwargs`` (``train``, ``rngs``) go to the network in training."""
  c_skip, c_out, c_in, c_noise = (c.reshape((-1,) + (1,) * (x.ndim - 1))
                                  for c in precond.coefficients(sigma))
  inputs = c_in * x
  if kwargs:
    out = model.apply({"params": params}, inputs, c_noise.reshape(-1), labels, **kwargs)
  else:
    out = denoising.guided(model, params, inputs, c_noise.reshape(-1), labels, guidance)
  return c_skip * x + c_out * out


def per_example_loss(model: Any, params: Any, x0: jax.Array, labels: jax.Array | None,
                     rng: jax.Array, *, precond: Precond) -> jax.Array:
  """``lambda(sigma) mean_pixels((D(y + sigma n; sigma) - y)^2)`` per example."""
  k_sigma, k_noise, k_drop = jax.random.split(rng, 3)
  sigma = precond.training_sigma(k_sigma, x0.shape[0])
  noised = x0 + sigma.reshape((-1,) + (1,) * (x0.ndim - 1)) * jax.random.normal(
      k_noise, x0.shape)
  d = denoise(model, params, precond, noised, sigma, labels, train=True,
              rngs={"dropout": k_drop})
  return precond.weight(sigma) * jnp.mean((d - x0) ** 2, axis=tuple(range(1, x0.ndim)))


def sigma_steps(steps: int, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
  """Karras et al.'s eq. 5: ``steps`` noise levels from ``sigma_max`` down to ``sigma_min``
  evenly spaced in ``sigma^(1/rho)``, then 0 (``steps + 1`` values, float64)."""
  i = np.arange(steps, dtype=np.float64)
  ramp = i / max(steps - 1, 1)
  sig = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
         ) ** rho
  return np.append(sig, 0.0)


def churn(sigmas: np.ndarray, s_churn: float, s_tmin: float, s_tmax: float) -> np.ndarray:
  """Algorithm 2's ``gamma_i`` per step: ``min(s_churn / N, sqrt(2) - 1)`` at noise levels in
  ``[s_tmin, s_tmax]``, else 0."""
  n = len(sigmas) - 1
  gamma = min(s_churn / n, math.sqrt(2.0) - 1.0)
  cur = sigmas[:-1]
  return np.where((cur >= s_tmin) & (cur <= s_tmax), gamma, 0.0)


def sample(state: base.State, latents: jax.Array, labels: jax.Array, *, model: Any,
           image_shape: tuple[int, ...], precond: Precond, sigmas: np.ndarray,
           gammas: np.ndarray, heun: bool, s_noise: float, guidance: float,
           group_guidance: denoising.GroupGuidance | None = None,
           keep: int = 0, clip: bool = True) -> jax.Array:
  """Algorithms 1 and 2 from ``x_0 = sigma_0 * latents`` over the noise levels ``sigmas``
  (ending in 0; ``gammas``: each step's churn). Images in [-1, 1] (``clip``; latents
  unclipped), ``[B, H, W, C]``; with
  ``keep`` > 0 the trajectory ``[B, keep + 1, H, W, C]`` (see ``diffusion.sample``).
  With ``group_guidance``, ``labels`` are the samples' target groups, and every denoised
  estimate moves up the classifier's log-probability of its group (``guided_denoise``)."""
  x = latents.reshape((latents.shape[0],) + tuple(image_shape)) * float(sigmas[0])
  keys = denoising.noise_keys(latents)
  labels = labels.astype(jnp.int32)

  def d_of(x, s):
    sigma = jnp.full((x.shape[0],), s)
    d = functools.partial(denoise, model, state["ema"], precond, sigma=sigma,
                          labels=None if group_guidance else labels, guidance=guidance)
    if group_guidance is None:
      return (x - d(x)) / s
    return (x - guided_denoise(d, x, s, labels, group_guidance)) / s

  def step(x, inputs, second_order):
    i, cur, nxt, gamma = inputs
    hat = cur * (1.0 + gamma)
    noise = denoising.step_noise(keys, i, x.shape[1:])
    x_hat = x + jnp.sqrt(jnp.maximum(hat**2 - cur**2, 0.0)) * s_noise * noise
    d_cur = d_of(x_hat, hat)
    x_next = x_hat + (nxt - hat) * d_cur
    if second_order:  # Heun's correction.
      x_next = x_hat + (nxt - hat) * 0.5 * (d_cur + d_of(x_next, nxt))
    return x_next

  f32 = lambda a: jnp.asarray(a, jnp.float32)
  n = len(sigmas) - 1
  inputs = (jnp.arange(n), f32(sigmas[:-1]), f32(sigmas[1:]), f32(gammas))
  x, path = denoising.integrate(step, x, inputs, heun)
  start = latents.reshape(x.shape) * float(sigmas[0])
  return denoising.finish(x, path, start, keep, clip)


def nll(state: base.State, batch: base.Batch, keys: jax.Array, num_samples: int, *,
        model: Any, precond: Precond, sigma_min: float, sigma_max: float, probes: int,
        tol: float) -> dict[str, jax.Array]:
  """The negative log-likelihood of 8-bit images per example in nats: the probability-flow
  ODE's exact density (Hutchinson's trace with ``probes`` probes, tolerance ``tol``) of the
  uniformly dequantized images at ``sigma_min``, integrated in ``ln sigma`` to the prior
  ``N(0, sigma_max^2 I)``, plus ``D ln 127.5`` for the bins (``ode.discrete_nll``).
  ``num_samples`` (``eval.iwae_k``) is not used: one ODE solve per example."""
  del num_samples
  x0 = batch["image"].astype(jnp.float32)
  labels = batch[model.condition_key].astype(jnp.int32) if model.num_classes else None

  def drift(x, s):  # dx/d(ln sigma) = x - D(x; sigma).
    sigma = jnp.full((x.shape[0],), jnp.exp(s))
    return x - denoise(model, state["ema"], precond, x, sigma, labels)

  return ode.nll_terms(drift, x0, keys, math.log(sigma_min), math.log(sigma_max), sigma_max,
                       probes=probes, tol=tol)


def check(cfg: Mapping[str, Any]) -> None:
  """Raises ConfigError for impossible EDM settings."""
  require(cfg["parameterization"] in PARAMETERIZATIONS, f"objective.parameterization must "
          f"be one of {', '.join(PARAMETERIZATIONS)}, got {cfg['parameterization']!r}.")
  require(cfg["sampler"] in SAMPLERS, f"objective.sampler must be one of "
          f"{', '.join(SAMPLERS)}, got {cfg['sampler']!r}.")
  require(0 < cfg["sigma_min"] < cfg["sigma_max"], f"objective.sigma_min and sigma_max "
          f"must satisfy 0 < sigma_min < sigma_max, got {cfg['sigma_min']} and "
          f"{cfg['sigma_max']}.")
  for key in ("sigma_data", "p_std", "rho"):
    require(cfg[key] > 0, f"objective.{key} must be > 0, got {cfg[key]}.")
  for key in ("s_churn", "s_tmin", "s_noise"):
    require(cfg[key] >= 0, f"objective.{key} must be >= 0, got {cfg[key]}.")
  require(cfg["s_tmax"] >= cfg["s_tmin"], f"objective.s_tmax must be >= s_tmin, got "
          f"{cfg['s_tmax']} and {cfg['s_tmin']}.")
  denoising.check_common(cfg)


def sampler_sigmas(objective: Mapping[str, Any], precond: Precond) -> np.ndarray:
  """The sampler's noise levels: ``sigma_min``/``sigma_max`` clamped to the range the
  parameterization trains on (``generate.py``), on the rho schedule, then 0."""
  low, high = precond.sigma_range
  return sigma_steps(objective["sample_steps"], max(objective["sigma_min"], low),
                     min(objective["sigma_max"], high), objective["rho"])


def build(model: Any, spec: Any, objective: Mapping[str, Any],
          optim: Mapping[str, Any], privacy: base.PrivateGradient | None = None,
          group_guidance: denoising.GroupGuidance | None = None) -> base.Objective:
  """The EDM objective from the config's objective and optim sections (DP-SGD of the
  denoiser with ``privacy``; the sampler guided toward groups with ``group_guidance``,
  whose groups are then the labels ``generate`` draws)."""
  denoising.check_network(model, "edm")
  image_shape = tuple(spec.image_shape)
  precond = Precond(objective["parameterization"], float(objective["sigma_data"]),
                    float(objective["p_mean"]), float(objective["p_std"]))
  tx = base.make_optimizer(optim)
  sigmas = sampler_sigmas(objective, precond)
  sampler = functools.partial(
      sample, model=model, image_shape=image_shape, precond=precond, sigmas=sigmas,
      gammas=churn(sigmas, objective["s_churn"], objective["s_tmin"], objective["s_tmax"]),
      heun=objective["sampler"] == "heun", s_noise=float(objective["s_noise"]),
      guidance=float(objective["guidance"]), group_guidance=group_guidance,
      clip=spec.bounded)
  return base.Objective(
      init=functools.partial(denoising.init, model, image_shape, tx),
      train_step=denoising.step_function(
          model, tx, functools.partial(per_example_loss, model, precond=precond), objective,
          privacy, image_shape),
      decode=sampler,
      latent_dim=int(np.prod(image_shape)),
      num_classes=group_guidance.num_groups if group_guidance else model.num_classes,
      condition_key="attr" if group_guidance else model.condition_key,
      nll=functools.partial(nll, model=model, precond=precond,
                            sigma_min=float(sigmas[-2]), sigma_max=float(sigmas[0]),
                            probes=int(objective["likelihood_probes"]),
                            tol=float(objective["likelihood_tol"])),
      trajectory=functools.partial(sampler, keep=8))


OBJECTIVES.register("edm")(Entry(build, DEFAULTS, check,
                                 capabilities=("conditional", "sampling_guidance"),
                                 private=True))
