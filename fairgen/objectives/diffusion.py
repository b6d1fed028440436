"""DDPM (Ho et al. 2020): the denoising objective, DDIM and ancestral samplers, and the
variational bound in nats (bits/dim through the ``likelihood`` evaluator).

Training draws ``t`` uniformly, ``x_t ~ q(x_t | x_0)``, and regresses the noise (``eps``), the
clean image (``x0``) or ``v`` with a per-example mean squared error (Ho et al.'s
``L_simple``), so importance weights enter as one multiplication. The sampler reads the EMA
parameters.

``decode(state, latents, labels)`` is a deterministic function of its inputs, as every
objective's: the latents are ``x_T`` (``latent_dim = H * W * C``, drawn N(0, I) by
``Objective.sample_latents``), and the ancestral sampler's per-step noise comes from a key
made of each latent's first two values, so the same latents give the same images on any
number of devices. Conditional models (``model.conditional``: classes, or groups for
``fair.method='conditional'``) train with labels dropped to "no label" at
``label_dropout`` and sample with classifier-free guidance of weight ``guidance``:
``(1 + w) eps(x, y) - w eps(x)``.
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
from fairgen.objectives import diffusion_process as dp
from fairgen.objectives.registry import OBJECTIVES, Entry

SAMPLERS = ("ddim", "ancestral")
DEFAULTS = {
    "schedule": "linear",  # 'linear' (Ho et al.) or 'cosine' (Nichol & Dhariwal 2021).
    "timesteps": 1000,
    "beta_start": 1e-4,  # The linear schedule's ends.
    "beta_end": 0.02,
    "prediction": "eps",  # 'eps', 'x0' or 'v'.
    "ema_decay": 0.9999,
    "label_dropout": 0.1,  # Conditional models: P(label -> "no label") in training.
    "guidance": 0.0,  # Classifier-free guidance weight w at sampling (0: conditional only).
    "sampler": "ddim",  # 'ddim' (deterministic at ddim_eta=0) or 'ancestral'.
    "sample_steps": 100,  # Network evaluations per sample (<= timesteps).
    "ddim_eta": 0.0,
    "clip_denoised": True,  # Clip the predicted x_0 to [-1, 1] while sampling (not latents).
}


def check(cfg: Mapping[str, Any]) -> None:
  """Raises ConfigError for impossible diffusion settings."""
  require(cfg["schedule"] in dp.SCHEDULES, f"objective.schedule must be one of "
          f"{', '.join(dp.SCHEDULES)}, got {cfg['schedule']!r}.")
  require(cfg["prediction"] in dp.PREDICTIONS, f"objective.prediction must be one of "
          f"{', '.join(dp.PREDICTIONS)}, got {cfg['prediction']!r}.")
  require(cfg["sampler"] in SAMPLERS, f"objective.sampler must be one of "
          f"{', '.join(SAMPLERS)}, got {cfg['sampler']!r}.")
  t = cfg["timesteps"]
  require(isinstance(t, int) and t >= 2, f"objective.timesteps must be an integer >= 2, "
          f"got {t!r}.")
  require(0 < cfg["beta_start"] < cfg["beta_end"] < 1, f"objective.beta_start and beta_end "
          f"must satisfy 0 < beta_start < beta_end < 1, got {cfg['beta_start']} and "
          f"{cfg['beta_end']}.")
  s = cfg["sample_steps"]
  require(isinstance(s, int) and 1 <= s <= t, f"objective.sample_steps must be an integer "
          f"in [1, timesteps={t}], got {s!r}.")
  require(0 <= cfg["ema_decay"] < 1, f"objective.ema_decay must be in [0, 1), got "
          f"{cfg['ema_decay']}.")
  require(0 <= cfg["label_dropout"] < 1, f"objective.label_dropout must be in [0, 1), got "
          f"{cfg['label_dropout']}.")
  require(cfg["guidance"] >= 0, f"objective.guidance must be >= 0, got {cfg['guidance']}.")
  require(cfg["ddim_eta"] >= 0, f"objective.ddim_eta must be >= 0, got {cfg['ddim_eta']}.")


def per_example_loss(model: Any, params: Any, x0: jax.Array, labels: jax.Array | None,
                     rng: jax.Array, *, schedule: dp.Schedule, prediction: str,
                     train: bool = True) -> jax.Array:
  """Ho et al.'s ``L_simple`` per example: the mean squared error of the network's
  ``eps`` (``x0``, ``v``) at a uniform timestep, averaged over pixels (equal weight for
  every timestep)."""
  k_t, k_noise, k_drop = jax.random.split(rng, 3)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.num_timesteps)
  noise = jax.random.normal(k_noise, x0.shape)
  x_t = dp.q_sample(schedule, x0, t, noise)
  out = model.apply({"params": params}, x_t, t, labels, train=train, rngs={"dropout": k_drop})
  err = (out - dp.target(schedule, prediction, x0, t, noise)) ** 2
  return jnp.mean(err, axis=tuple(range(1, x0.ndim)))


def sample(state: base.State, latents: jax.Array, labels: jax.Array, *, model: Any,
           image_shape: tuple[int, ...], schedule: dp.Schedule, prediction: str,
           steps: int, eta: float, guidance: float, clip_denoised: bool,
           keep: int = 0, clip: bool = True) -> jax.Array:
  """Samples from ``x_T = latents`` by DDIM with ``eta`` over ``steps`` timesteps.

  Returns images in [-1, 1] (``clip``; latents unclipped), ``[B, H, W, C]``; with ``keep``
  > 0, the trajectory instead:
  ``[B, keep + 1, H, W, C]``, ``x_t`` at ``keep`` evenly spaced sampler steps and the
  final image.
  """
  x = latents.reshape((latents.shape[0],) + tuple(image_shape))
  ts = dp.sample_timesteps(schedule.num_timesteps, steps)
  ab = schedule.alpha_bar[ts]
  ab_prev = np.append(ab[1:], 1.0).astype(np.float32)
  keys = denoising.noise_keys(latents)
  labels = labels.astype(jnp.int32)

  def body(x, inputs):
    i, t, a, a_prev = inputs
    t_vec = jnp.full((x.shape[0],), t, jnp.int32)
    out = denoising.guided(model, state["ema"], x, t_vec, labels, guidance)
    x0, eps = dp.predict_x0_eps(schedule, prediction, x, t_vec, out)
    if clip_denoised:  # And the noise direction consistent with the clipped x_0.
      x0 = jnp.clip(x0, -1.0, 1.0)
      eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
    noise = denoising.step_noise(keys, i, x.shape[1:])
    x = dp.ddim_step(x0, eps, a_prev, a, eta, noise)
    return x, x

  inputs = (jnp.arange(len(ts)), jnp.asarray(ts), jnp.asarray(ab), jnp.asarray(ab_prev))
  x, path = jax.lax.scan(body, x, inputs)
  return denoising.finish(x, path, latents.reshape(x.shape), keep, clip)


def nll(state: base.State, batch: base.Batch, keys: jax.Array, num_samples: int, *,
        model: Any, schedule: dp.Schedule, prediction: str
        ) -> dict[str, jax.Array]:
  """The variational bound on ``-log p(x_0)`` per example in nats (Ho et al. eq. 5):
  ``prior`` (``L_T``), ``diffusion`` (``sum_{t=2}^{T} L_{t-1}``) and ``decoder`` (``L_0``,
  the discretised Gaussian of 8-bit data), with Ho et al.'s fixed 'large' variances.

  With ``num_samples`` >= T - 1 every ``L_t`` is evaluated (one ``x_t`` each); fewer
  estimate the sum without bias by stratified sampling: the T - 1 timesteps split into
  ``num_samples`` contiguous strata of sizes ``n_k`` and one uniform timestep ``t_k`` per
  stratum, ``sum_k n_k L_{t_k}``.
  """
  x0 = batch["image"].astype(jnp.float32)
  labels = batch[model.condition_key].astype(jnp.int32) if model.num_classes else None
  params, b, nd = state["ema"], x0.shape[0], x0.ndim
  T = schedule.num_timesteps
  logvar = jnp.asarray(dp.model_log_variance(schedule))
  post_logvar = jnp.asarray(np.log(np.maximum(schedule.posterior_variance, 1e-20)),
                            jnp.float32)
  pixels = tuple(range(1, nd))
  k_dec, k_strata, k_steps = (jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys)
                              for i in range(3))

  def x_t_and_x0(t, step_keys):
    noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:]))(step_keys)
    x_t = dp.q_sample(schedule, x0, t, noise)
    out = model.apply({"params": params}, x_t, t, labels)
    return x_t, dp.predict_x0_eps(schedule, prediction, x_t, t, out)[0]

  ab_last = schedule.alpha_bar[-1]
  prior = jnp.sum(dp.normal_kl(np.sqrt(ab_last) * x0, np.log(1.0 - ab_last), 0.0, 0.0),
                  axis=pixels)
  t0 = jnp.zeros((b,), jnp.int32)
  _, x0_hat = x_t_and_x0(t0, k_dec)
  decoder = -jnp.sum(dp.discretized_gaussian_log_likelihood(x0, x0_hat, 0.5 * logvar[0]),
                     axis=pixels)

  strata = np.array_split(np.arange(1, T), min(num_samples, T - 1))
  starts = np.array([s[0] for s in strata], np.int32)
  sizes = np.array([len(s) for s in strata], np.int32)
  offsets = jax.vmap(lambda k: jax.random.uniform(k, (len(strata),)))(k_strata)  # [B, K]
  ts = starts[None] + jnp.minimum((offsets * sizes[None]).astype(jnp.int32), sizes - 1)

  def term(total, inputs):
    k, t = inputs
    x_t, x0_hat = x_t_and_x0(t, jax.vmap(lambda key: jax.random.fold_in(key, k))(k_steps))
    shape = (b,) + (1,) * (nd - 1)
    kl = dp.normal_kl(dp.posterior_mean(schedule, x0, x_t, t), post_logvar[t].reshape(shape),
                      dp.posterior_mean(schedule, x0_hat, x_t, t), logvar[t].reshape(shape))
    return total + jnp.asarray(sizes)[k] * jnp.sum(kl, axis=pixels), None

  diffusion, _ = jax.lax.scan(term, jnp.zeros((b,)), (jnp.arange(len(strata)), ts.T))
  return {"nll": prior + diffusion + decoder, "prior": prior, "diffusion": diffusion,
          "decoder": decoder}


def build(model: Any, spec: Any, objective: Mapping[str, Any],
          optim: Mapping[str, Any]) -> base.Objective:
  """The DDPM objective from the config's objective and optim sections."""
  denoising.check_network(model, "diffusion")
  image_shape = tuple(spec.image_shape)
  schedule = dp.make_schedule(objective["schedule"], objective["timesteps"],
                              objective["beta_start"], objective["beta_end"])
  tx = base.make_optimizer(optim)
  eta = objective["ddim_eta"] if objective["sampler"] == "ddim" else 1.0
  sampler = functools.partial(
      sample, model=model, image_shape=image_shape, schedule=schedule,
      prediction=objective["prediction"], steps=objective["sample_steps"], eta=eta,
      guidance=float(objective["guidance"]), clip=spec.bounded,
      clip_denoised=bool(objective["clip_denoised"]) and spec.bounded)
  return base.Objective(
      init=functools.partial(denoising.init, model, image_shape, tx),
      train_step=functools.partial(
          denoising.train_step, model=model, tx=tx,
          image_loss=functools.partial(per_example_loss, model, schedule=schedule,
                                       prediction=objective["prediction"]),
          ema_decay=float(objective["ema_decay"]),
          label_dropout=float(objective["label_dropout"])),
      decode=sampler,
      latent_dim=int(np.prod(image_shape)),
      num_classes=model.num_classes,
      condition_key=model.condition_key,
      nll=functools.partial(nll, model=model, schedule=schedule,
                            prediction=objective["prediction"]),
      trajectory=functools.partial(sampler, keep=8))


OBJECTIVES.register("diffusion")(Entry(build, DEFAULTS, check,
                                       capabilities=("conditional",)))
