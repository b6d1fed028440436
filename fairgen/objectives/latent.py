"""Latent diffusion (Rombach, Blattmann, Lorenz, Esser & Ommer, CVPR 2022): a denoising
objective (DDPM, EDM or flow matching) trained on a frozen autoencoder's latents.

The first stage is fairgen's convolutional VAE with a spatial latent
(``model.latent_channels``; ``experiments/ldm_mnist.py:stage=autoencoder``), trained on its
own.
The second stage's ``latent`` section names its workdir; the composition root
(``fairgen.experiment.load_first_stage``) restores and checks it, builds the denoising
network for the latent map's shape (``latent_spec``) and wraps the objective with
``in_latent_space``:

- the state holds the autoencoder's parameters under ``'autoencoder'`` beside the
  denoiser's. No optimizer sees them, so no step changes them; the checkpoints carry them;
- each step encodes the batch's images, ``z ~ q(z | x)`` (``posterior='sample'``, as the
  paper's KL autoencoder does) or its mean (``'mean'``), times ``scale`` (the paper's
  scale factor: latents of about unit variance), and hands the denoising step a batch whose
  ``image`` is that map;
- ``decode`` runs the denoising sampler in latent space, divides by ``scale`` and decodes
  to the VAE's mean image, so sample grids and every evaluator (FID, PRDC, fairness) see
  images. There is no likelihood (``nll``): the ODE's would be of latents, not images.
- guidance toward groups (``fair.method='guidance'``) runs in latent space with the
  classifier looking at the decoded estimate (``through_decoder``): its gradient reaches
  the latents through the frozen decoder.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fairgen.config import ConfigError, require
from fairgen.models.vae import VAE
from fairgen.objectives import base
from fairgen.objectives import denoising

AUTOENCODER = "autoencoder"  # The state's key of the frozen first stage's parameters.
OBJECTIVES = ("diffusion", "edm", "flow")  # The denoising families it wraps.
POSTERIORS = ("sample", "mean")
DEFAULTS = {
    "workdir": "",  # The first stage's workdir (a VAE with model.latent_channels > 0).
    "scale": 1.0,  # Latents are multiplied by it (the paper's scale factor).
    "posterior": "sample",  # Encode to a posterior sample, or to its mean.
}
_ENCODE_STREAM = 0x1A7E  # Folded into the step's key for the posterior sample.


@dataclasses.dataclass(frozen=True)
class FirstStage:
  """A trained autoencoder, restored: the module, its parameters, the step they are from
  and the workdir."""

  vae: VAE
  params: Any
  step: int
  workdir: str


def section(config: Mapping[str, Any]) -> dict[str, Any]:
  """The ``latent`` section's settings: ``DEFAULTS`` overridden by the config's."""
  given = dict(config["latent"])
  unknown = sorted(set(given) - set(DEFAULTS))
  require(not unknown, f"Unknown key(s) latent.{', latent.'.join(unknown)}; valid: "
          f"{', '.join(DEFAULTS)}.")
  return {**DEFAULTS, **given}


def validate(config: Mapping[str, Any]) -> None:
  """Raises ConfigError for an impossible ``latent`` section or a config it cannot wrap
  (another objective family, DP-SGD)."""
  cfg = section(config)
  require(isinstance(cfg["workdir"], str) and cfg["workdir"].strip(),
          "latent.workdir must name the first stage's workdir: train it with "
          "--config=experiments/ldm_mnist.py:stage=autoencoder --workdir=DIR, then pass "
          "--config.latent.workdir=DIR.")
  scale = cfg["scale"]
  require(isinstance(scale, (int, float)) and not isinstance(scale, bool)
          and math.isfinite(scale) and scale > 0,
          f"latent.scale must be a finite number > 0, got {scale!r}.")
  require(cfg["posterior"] in POSTERIORS, f"latent.posterior must be one of "
          f"{', '.join(POSTERIORS)}, got {cfg['posterior']!r}.")
  name = config["objective"]["name"]
  require(name in OBJECTIVES, f"A latent section trains a denoising objective "
          f"({', '.join(OBJECTIVES)}) on the autoencoder's latents, not {name!r}.")
  require("privacy" not in config, "DP-SGD with a latent section is not supported: the "
          "first stage's autoencoder saw the data without DP, so the samples would not be "
          "private. Train a pixel-space model (experiments/dp_diffusion_mnist.py).")


def latent_spec(spec: Any, vae: VAE) -> Any:
  """The dataset's spec with the latent map's shape for ``image_shape``, unbounded (the
  samplers do not clip latents to [-1, 1])."""
  return dataclasses.replace(spec, image_shape=tuple(vae.spatial_latent), bounded=False)


def encode(vae: VAE, params: Any, images: jax.Array, key: jax.Array, scale: float,
           posterior: str) -> jax.Array:
  """Images ``[B, H, W, C]`` -> scaled latent maps ``[B, h, w, c]`` (a posterior sample
  drawn with ``key``, or the posterior mean)."""
  mean, logvar = vae.apply({"params": params}, images, method=VAE.encode)
  z = mean
  if posterior == "sample":
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
  return (scale * z).reshape((images.shape[0],) + tuple(vae.spatial_latent))


def decode_images(vae: VAE, params: Any, latents: jax.Array, scale: float) -> jax.Array:
  """Scaled latent maps ``[..., h, w, c]`` -> the VAE's mean images ``[..., H, W, C]`` in
  [-1, 1]."""
  lead = latents.shape[:-3]
  flat = latents.reshape((-1, math.prod(vae.spatial_latent))) / scale
  out = vae.apply({"params": params}, flat, method=VAE.decode)
  images = vae.apply({"params": params}, out, method=VAE.mean_image)
  return images.reshape(lead + images.shape[1:])


def through_decoder(guide: denoising.GroupGuidance, first: FirstStage, scale: float
                    ) -> denoising.GroupGuidance:
  """Guidance toward groups for a sampler of scaled latents: the attribute classifier
  (which takes images) scores the first stage's decoding of each denoised latent, so the
  gradient goes through the frozen decoder."""
  def log_prob(variables: Any, latents: jax.Array) -> jax.Array:
    images = decode_images(first.vae, variables[AUTOENCODER], latents, scale)
    return guide.log_prob(variables["classifier"], images)

  return dataclasses.replace(guide, log_prob=log_prob, variables={
      "classifier": guide.variables, AUTOENCODER: first.params})


def _inner(state: base.State) -> base.State:
  """The denoising objective's part of the state."""
  return {k: v for k, v in state.items() if k != AUTOENCODER}


def train_step(state: base.State, batch: base.Batch, rng: jax.Array, *, inner: base.Objective,
               vae: VAE, scale: float, posterior: str, **kwargs: Any
               ) -> tuple[base.State, base.Metrics]:
  """The denoising step on the batch's encoded images; the autoencoder stays as it was."""
  params = state[AUTOENCODER]
  key = jax.random.fold_in(jax.random.fold_in(rng, state["step"]), _ENCODE_STREAM)
  latents = encode(vae, params, batch["image"], key, scale, posterior)
  new, metrics = inner.train_step(_inner(state), {**batch, "image": latents}, rng, **kwargs)
  return {**new, AUTOENCODER: params}, metrics


def decode(state: base.State, latents: jax.Array, labels: jax.Array, *,
           sampler: Any, vae: VAE, scale: float) -> jax.Array:
  """Images from the denoising ``sampler`` run in latent space (or each frame of its
  trajectory, ``[B, K, H, W, C]``), decoded by the frozen autoencoder."""
  return decode_images(vae, state[AUTOENCODER], sampler(_inner(state), latents, labels), scale)


def in_latent_space(inner: base.Objective, first: FirstStage, scale: float,
                    posterior: str) -> base.Objective:
  """``inner`` (a denoising objective built for ``latent_spec``) trained on and sampling
  through ``first``'s frozen autoencoder (see the module docstring)."""
  params = first.params
  common = dict(vae=first.vae, scale=float(scale))
  return dataclasses.replace(
      inner,
      init=lambda rng: {**inner.init(rng), AUTOENCODER: params},
      train_step=functools.partial(train_step, inner=inner, posterior=posterior, **common),
      decode=functools.partial(decode, sampler=inner.decode, **common),
      trajectory=(None if inner.trajectory is None else
                  functools.partial(decode, sampler=inner.trajectory, **common)),
      nll=None, member_score=None)


def check_first_stage_config(saved: Mapping[str, Any], where: str) -> None:
  """Raises ConfigError unless the first stage's saved config trained a VAE."""
  model = (saved.get("model") or {}).get("name")
  if model != "vae" or (saved.get("objective") or {}).get("name") != "vae":
    raise ConfigError(f"{where} holds a run of model {model!r}, not a VAE: latent "
                      f"diffusion's first stage is a conv VAE with a spatial latent "
                      f"(experiments/ldm_mnist.py:stage=autoencoder).")


def check_first_stage(vae: VAE, where: str) -> None:
  """Raises ConfigError unless the VAE ``vae`` (``check_first_stage_config`` passed) has a
  spatial latent."""
  if vae.spatial_latent is None:
    raise ConfigError(f"{where} holds a VAE with a flat latent (model.latent_channels=0); "
                      f"latent diffusion needs a spatial one: train a conv VAE with "
                      f"model.latent_channels > 0 "
                      f"(experiments/ldm_mnist.py:stage=autoencoder).")
