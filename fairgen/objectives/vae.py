"""VAE objective: the negative ELBO, reconstruction + beta * KL, per example.

A conditional VAE (``model.conditional``) reads its labels from ``batch[condition_key]``;
its ``decode`` and ``member_score`` use the labels they are given.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from fairgen.config import ConfigError, require
from fairgen.models.vae import VAE
from fairgen.objectives import base
from fairgen.objectives import losses
from fairgen.objectives.registry import OBJECTIVES, Entry


DEFAULTS = {
    "beta": 1.0,  # Weight of the KL term (a beta-VAE for beta != 1).
    # KL annealing: the KL weight rises linearly from 0 to beta over this many steps (0: off).
    "kl_warmup_steps": 0,
}


def check(cfg: Mapping[str, Any]) -> None:
  """Raises ConfigError for a negative beta or warm-up."""
  require(cfg["beta"] >= 0, f"objective.beta must be >= 0, got {cfg['beta']}.")
  require(isinstance(cfg["kl_warmup_steps"], int) and cfg["kl_warmup_steps"] >= 0,
          f"objective.kl_warmup_steps must be an integer >= 0, got {cfg['kl_warmup_steps']!r}.")


def kl_weight(step: jax.Array, beta: float, warmup_steps: int) -> jax.Array:
  """The KL term's weight at ``step``: ``beta * min(1, step / warmup_steps)`` (KL annealing,
  Bowman et al. 2016), ``beta`` throughout without warm-up."""
  if not warmup_steps:
    return jnp.asarray(beta, jnp.float32)
  return beta * jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)


def init(model: VAE, tx: optax.GradientTransformation, rng: jax.Array) -> base.State:
  """The initial VAE state: step, params, opt."""
  p_rng, z_rng = jax.random.split(rng)
  x = jnp.zeros((1,) + tuple(model.image_shape))
  params = model.init({"params": p_rng, "latent": z_rng}, x, _labels_or_none(model, 1)
                      )["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": tx.init(params)}


def _labels_or_none(model: VAE, batch: int) -> jax.Array | None:
  """Zero labels for a conditional VAE's init, None for an unconditional one."""
  return jnp.zeros((batch,), jnp.int32) if model.num_classes else None


def per_example_loss(model: VAE, params: Any, x: jax.Array, rng: jax.Array,
                     beta: float | jax.Array, labels: jax.Array | None = None
                     ) -> dict[str, jax.Array]:
  """Per-example negative ELBO terms (one posterior sample; ``labels`` for a conditional
  VAE)."""
  out = model.apply({"params": params}, x, labels, rngs={"latent": rng})
  recon = -out["log_likelihood"]
  return {"loss": recon + beta * out["kl"], "recon": recon, "kl": out["kl"]}


def train_step(state: base.State, batch: base.Batch, rng: jax.Array, *, model: VAE,
               tx: optax.GradientTransformation, beta: float, kl_warmup_steps: int = 0,
               privacy: base.PrivateGradient | None = None) -> tuple[base.State, base.Metrics]:
  """One update of the (beta-)ELBO, the KL weight annealed over ``kl_warmup_steps``; with
  ``privacy``, a DP-SGD update of the whole VAE (per-example clipped ELBO gradients,
  importance weights scaling the clipped gradients)."""
  rng = jax.random.fold_in(rng, state["step"])
  beta = kl_weight(state["step"], beta, kl_warmup_steps)
  labels = batch[model.condition_key] if model.num_classes else None
  weight = batch.get("weight")
  if privacy is not None:
    return _private_step(state, batch, labels, rng, model=model, tx=tx, beta=beta,
                         privacy=privacy)

  def loss_fn(params):
    terms = per_example_loss(model, params, batch["image"], rng, beta, labels)
    return losses.weighted_mean(terms["loss"], weight), terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {"loss": loss, "recon": jnp.mean(terms["recon"]), "kl": jnp.mean(terms["kl"]),
             "grad_norm": base.global_norm(grads), "kl_weight": beta}
  return {"step": state["step"] + 1, "params": params, "opt": opt}, metrics


def _private_step(state: base.State, batch: base.Batch, labels: jax.Array | None,
                  rng: jax.Array, *, model: VAE,
                  tx: optax.GradientTransformation, beta: float | jax.Array,
                  privacy: base.PrivateGradient) -> tuple[base.State, base.Metrics]:
  """The DP-SGD update of ``train_step``, through the run's ``privacy`` gradient."""

  def example_loss(params, example, key):
    image, label = example
    terms = per_example_loss(model, params, image[None], key, beta,
                             None if label is None else label[None])
    return terms["loss"][0], jax.tree.map(lambda t: t[0], terms)

  mask = batch["mask"]
  grads, terms, stats = privacy(example_loss, state["params"], (batch["image"], labels), rng,
                                mask, batch.get("weight"), batch.get("canary"))
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {"loss": privacy.mean(terms["loss"], mask),
             "recon": privacy.mean(terms["recon"], mask),
             "kl": privacy.mean(terms["kl"], mask), "grad_norm": base.global_norm(grads),
             "batch_examples": jnp.sum(mask), **stats}
  return {"step": state["step"] + 1, "params": params, "opt": opt}, metrics


def decode(state: base.State, z: jax.Array, labels: jax.Array, *, model: VAE) -> jax.Array:
  """Decoder mean images for latents ``z`` (and ``labels``, for a conditional VAE)."""
  params = model.apply({"params": state["params"]}, z,
                       labels if model.num_classes else None, method=VAE.decode)
  return model.apply({"params": state["params"]}, params, method=VAE.mean_image)


def member_score(state: base.State, images: jax.Array, labels: jax.Array, *, model: VAE,
                 beta: float) -> jax.Array:
  """The ELBO of real ``images`` (one posterior sample, a fixed key): the membership attack
  of VAE audits (members are reconstructed better); a conditional VAE's given ``labels``."""
  terms = per_example_loss(model, state["params"], images, jax.random.key(0), beta,
                           labels if model.num_classes else None)
  return -terms["loss"]


def build(model: VAE, spec: Any, objective: Mapping[str, Any],
          optim: Mapping[str, Any], privacy: base.PrivateGradient | None = None
          ) -> base.Objective:
  """The VAE objective from the config's objective and optim sections (DP-SGD of the whole
  VAE with ``privacy``)."""
  del spec  # The model carries the image shape.
  if not isinstance(model, VAE):
    raise ConfigError("The 'vae' objective needs a VAE model (model.name='vae').")
  if privacy is not None:
    privacy.check_variables(jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0), "latent": jax.random.key(1)},
                           jnp.zeros((1,) + tuple(model.image_shape)),
                           _labels_or_none(model, 1))), "VAE")
  tx = base.make_optimizer(optim)
  return base.Objective(
      init=functools.partial(init, model, tx),
      train_step=functools.partial(train_step, model=model, tx=tx,
                                   beta=float(objective["beta"]),
                                   kl_warmup_steps=int(objective["kl_warmup_steps"]),
                                   privacy=privacy),
      decode=functools.partial(decode, model=model),
      latent_dim=model.latent_dim,
      num_classes=model.num_classes,
      condition_key=model.condition_key,
      member_score=functools.partial(member_score, model=model,
                                     beta=float(objective["beta"])))


OBJECTIVES.register("vae")(Entry(build, DEFAULTS, check, capabilities=("conditional",),
                                 private=True))
