"""Flow matching with the linear interpolant: Lipman et al., "Flow Matching for Generative
Modeling" (ICLR 2023), and rectified flow, Liu et al., "Flow Straight and Fast" (ICLR 2023).

Training draws ``t`` (uniformly, or logit-normal as in Esser et al. 2024), a noise image
``e ~ N(0, I)``, the point ``x_t = (1 - t) x_0 + t e`` on the straight line from the data
to the noise, and regresses the line's velocity ``dx_t/dt = e - x_0`` with a per-example
mean squared error over pixels (importance weights: one multiplication). The network sees
``time_scale * t`` (1000: the range of DDPM's timesteps, which its sinusoidal embedding
was made for).

Sampling integrates ``dx/dt = v(x, t)`` from ``x_1 = latents`` at t = 1 to t = 0 with the
EMA parameters: ``euler`` (``N`` network evaluations on ``N`` uniform steps), ``heun``
(Heun's 2nd-order method with a last Euler step, ``2N - 1``, as EDM's sampler) or
``adaptive`` (diffrax's Tsit5 with tolerance ``sample_tol``; ``fairgen.objectives.ode``).
``nll`` is the exact log-likelihood of the same ODE from the dequantized data at t = 0 to
the ``N(0, I)`` prior at t = 1 (Hutchinson's trace), for bits/dim.

Guidance toward groups (``fair.method='guidance'``, ``fairgen/fairness/guidance.py``) is
EDM's, carried over: ``x_t = (1 - t) y`` with EDM's ``y = x_0 + sigma e`` at
``sigma = t / (1 - t)``, so EDM's ``D' = D + scale sigma^2 grad_y log p(g | D)`` on the
denoised estimate ``D = x_t - t v`` is the velocity ``v' = v - scale sigma grad_{x_t} log p(g
| D)``. ``sigma`` is capped at ``GUIDANCE_SIGMA_MAX`` (EDM's ``sigma_max``), which it
reaches at t = 80/81: at t = 1 it is infinite, and the denoised estimate is the data's mean
whatever ``x_t``.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fairgen.config import require
from fairgen.objectives import base
from fairgen.objectives import denoising
from fairgen.objectives import ode
from fairgen.objectives.registry import OBJECTIVES, Entry

TIME_SAMPLINGS = ("uniform", "logit_normal")
GUIDANCE_SIGMA_MAX = 80.0  # Group guidance's noise level at t near 1 (EDM's sigma_max).
SAMPLERS = ("euler", "heun", "adaptive")
DEFAULTS = {
    "time_sampling": "uniform",  # Training t: 'uniform' or 'logit_normal'.
    "logit_mean": 0.0,  # logit_normal: logit(t) ~ N(logit_mean, logit_std^2).
    "logit_std": 1.0,
    "time_scale": 1000.0,  # The network's time input is time_scale * t.
    "sampler": "heun",  # 'euler' (N evaluations), 'heun' (2N - 1) or 'adaptive'.
    "sample_steps": 18,  # N: 18 Heun steps are 35 network evaluations.
    "sample_tol": 1e-3,  # The adaptive sampler's relative and absolute tolerance.
    **denoising.COMMON_DEFAULTS,
}


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(x_t, dx_t/dt)`` on the straight line ``x_t = (1 - t) x_0 + t e`` (``t``: ``[B]``)."""
  tb = t.reshape((-1,) + (1,) * (x0.ndim - 1))
  return (1.0 - tb) * x0 + tb * noise, noise - x0


def training_time(key: jax.Array, n: int, how: str, mean: float, std: float) -> jax.Array:
  """``n`` training times in (0, 1): uniform, or logit-normal."""
  if how == "logit_normal":
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,)))
  return jax.random.uniform(key, (n,))


def per_example_loss(model: Any, params: Any, x0: jax.Array, labels: jax.Array | None,
                     rng: jax.Array, *, time_sampling: str, logit_mean: float,
                     logit_std: float, time_scale: float) -> jax.Array:
  """``mean_pixels((v(x_t, t) - (e - x_0))^2)`` per example."""
  k_t, k_noise, k_drop = jax.random.split(rng, 3)
  t = training_time(k_t, x0.shape[0], time_sampling, logit_mean, logit_std)
  x_t, target = interpolate(x0, jax.random.normal(k_noise, x0.shape), t)
  v = model.apply({"params": params}, x_t, time_scale * t, labels, train=True,
                  rngs={"dropout": k_drop})
  return jnp.mean((v - target) ** 2, axis=tuple(range(1, x0.ndim)))


def _velocity(model: Any, params: Any, labels: jax.Array | None, guidance: float,
              time_scale: float) -> ode.Drift:
  """``v(x, t)`` for a scalar ``t``, guided."""
  return lambda x, t: denoising.guided(model, params, x, jnp.full((x.shape[0],), time_scale * t),
                                       labels, guidance)


def toward_groups(v: ode.Drift, groups: jax.Array, guide: denoising.GroupGuidance
                  ) -> ode.Drift:
  """The velocity ``v`` guided toward each sample's group: ``v - scale sigma grad_x log p(g |
  x - t v)`` with ``sigma = t / (1 - t)``, capped at ``GUIDANCE_SIGMA_MAX`` (the module's
  docstring derives it from EDM's guided denoiser)."""
  def guided(x: jax.Array, t: jax.Array) -> jax.Array:
    def estimate(x):
      velocity = v(x, t)
      return x - t * velocity, velocity

    grad, velocity = denoising.group_log_prob_grad(estimate, x, groups, guide)
    sigma = jnp.minimum(t / jnp.maximum(1.0 - t, 1e-6), GUIDANCE_SIGMA_MAX)
    return velocity - guide.scale * sigma * grad
  return guided


def sample(state: base.State, latents: jax.Array, labels: jax.Array, *, model: Any,
           image_shape: tuple[int, ...], sampler: str, steps: int, tol: float,
           guidance: float, time_scale: float,
           group_guidance: denoising.GroupGuidance | None = None, keep: int = 0,
           clip: bool = True) -> jax.Array:
  """Integrates the flow from ``x_1 = latents`` to t = 0. Images in [-1, 1] (``clip``;
  latents unclipped); with ``keep`` > 0 (fixed-step samplers) the trajectory
  ``[B, keep + 1, ...]``. With ``group_guidance``, ``labels`` are the samples' target
  groups, and the velocity follows the classifier toward them (``toward_groups``)."""
  x1 = latents.reshape((latents.shape[0],) + tuple(image_shape))
  labels = labels.astype(jnp.int32) if model.num_classes or group_guidance else None
  v = _velocity(model, state["ema"], None if group_guidance else labels, guidance,
                time_scale)
  if group_guidance is not None:
    v = toward_groups(v, labels, group_guidance)
  if sampler == "adaptive":
    x, _ = ode.solve(v, x1, 1.0, 0.0, rtol=tol, atol=tol)
    return denoising.finish(x, x[None], x1, keep, clip)
  ts = np.linspace(1.0, 0.0, steps + 1)

  def step(x, inputs, second_order):
    t, t_next = inputs
    d = v(x, t)
    x_next = x + (t_next - t) * d
    if second_order:
      x_next = x + (t_next - t) * 0.5 * (d + v(x_next, t_next))
    return x_next

  inputs = (jnp.asarray(ts[:-1], jnp.float32), jnp.asarray(ts[1:], jnp.float32))
  x, path = denoising.integrate(step, x1, inputs, sampler == "heun")
  return denoising.finish(x, path, x1, keep, clip)


def nll(state: base.State, batch: base.Batch, keys: jax.Array, num_samples: int, *,
        model: Any, time_scale: float, probes: int, tol: float) -> dict[str, jax.Array]:
  """The negative log-likelihood of 8-bit images per example in nats: the ODE's exact
  density of the dequantized images (``ode.log_likelihood``) plus ``D ln 127.5``.
  ``num_samples`` (``eval.iwae_k``) is not used: one ODE solve per example."""
  del num_samples
  x0 = batch["image"].astype(jnp.float32)
  labels = batch[model.condition_key].astype(jnp.int32) if model.num_classes else None
  return ode.nll_terms(_velocity(model, state["ema"], labels, 0.0, time_scale), x0, keys,
                       0.0, 1.0, 1.0, probes=probes, tol=tol)


def check(cfg: Mapping[str, Any]) -> None:
  """Raises ConfigError for impossible flow-matching settings."""
  require(cfg["time_sampling"] in TIME_SAMPLINGS, f"objective.time_sampling must be one of "
          f"{', '.join(TIME_SAMPLINGS)}, got {cfg['time_sampling']!r}.")
  require(cfg["sampler"] in SAMPLERS, f"objective.sampler must be one of "
          f"{', '.join(SAMPLERS)}, got {cfg['sampler']!r}.")
  for key in ("logit_std", "time_scale", "sample_tol"):
    require(cfg[key] > 0, f"objective.{key} must be > 0, got {cfg[key]}.")
  denoising.check_common(cfg)


def build(model: Any, spec: Any, objective: Mapping[str, Any],
          optim: Mapping[str, Any], privacy: base.PrivateGradient | None = None,
          group_guidance: denoising.GroupGuidance | None = None) -> base.Objective:
  """The flow-matching objective from the config's objective and optim sections (DP-SGD
  of the velocity network with ``privacy``; the sampler guided toward groups with
  ``group_guidance``, whose groups are then the labels ``generate`` draws)."""
  denoising.check_network(model, "flow")
  image_shape = tuple(spec.image_shape)
  tx = base.make_optimizer(optim)
  scale = float(objective["time_scale"])
  sampler = functools.partial(
      sample, model=model, image_shape=image_shape, sampler=objective["sampler"],
      steps=int(objective["sample_steps"]), tol=float(objective["sample_tol"]),
      guidance=float(objective["guidance"]), time_scale=scale,
      group_guidance=group_guidance, clip=spec.bounded)
  return base.Objective(
      init=functools.partial(denoising.init, model, image_shape, tx),
      train_step=denoising.step_function(
          model, tx, functools.partial(
              per_example_loss, model, time_sampling=objective["time_sampling"],
              logit_mean=float(objective["logit_mean"]),
              logit_std=float(objective["logit_std"]), time_scale=scale),
          objective, privacy, image_shape),
      decode=sampler,
      latent_dim=int(np.prod(image_shape)),
      num_classes=group_guidance.num_groups if group_guidance else model.num_classes,
      condition_key="attr" if group_guidance else model.condition_key,
      nll=functools.partial(nll, model=model, time_scale=scale,
                            probes=int(objective["likelihood_probes"]),
                            tol=float(objective["likelihood_tol"])),
      trajectory=(None if objective["sampler"] == "adaptive"
                  else functools.partial(sampler, keep=8)))


OBJECTIVES.register("flow")(Entry(build, DEFAULTS, check,
                                  capabilities=("conditional", "sampling_guidance"),
                                  private=True))
