"""Autoregressive objective: the exact NLL of quantised images under a ``PixelTransformer``.

The loss is ``-log p(x)`` per image in nats, summed over its ``H*W*C`` pixels (with
``levels=2``, the binarised image, the same data as the VAE's Bernoulli likelihood, so it
is directly comparable with the VAE's IWAE bound). Importance weights multiply the
per-image losses (``losses.weighted_mean``); resampling changes only the batches.

Sampling fits ``Objective``'s contract that ``decode`` is a deterministic function of prior
latents ``z ~ N(0, I)``: the latent has one entry per pixel (``latent_dim = H*W*C``), and
pixel ``i`` is the inverse CDF at ``u_i = Phi(z_i)`` of its categorical given the pixels
drawn before it, at ``objective.temperature`` among the ``objective.top_k`` most likely
levels. Each ``u_i`` is uniform, so this is ancestral sampling; a batch of latents split over
the data axis samples on every device at once.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from fairgen.config import ConfigError, require
from fairgen.models.transformer import PixelTransformer
from fairgen.models import transformer
from fairgen.objectives import base
from fairgen.objectives import losses
from fairgen.objectives.registry import OBJECTIVES, Entry

DEFAULTS = {
    "temperature": 1.0,  # Sampling temperature (0: the most likely level at every pixel).
    "top_k": 0,  # Sample among the k most likely levels of every pixel (0: all).
}


def check(cfg: Mapping[str, Any]) -> None:
  """Raises ConfigError for a negative temperature or top-k."""
  t = cfg["temperature"]
  require(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
          and t >= 0, f"objective.temperature must be >= 0, got {t!r}.")
  require(isinstance(cfg["top_k"], int) and not isinstance(cfg["top_k"], bool)
          and cfg["top_k"] >= 0, f"objective.top_k must be an integer >= 0, got "
          f"{cfg['top_k']!r}.")


def _labels(model: PixelTransformer, batch: Mapping[str, jax.Array]) -> jax.Array | None:
  return batch[model.condition_key] if model.num_classes else None


def init(model: PixelTransformer, tx: optax.GradientTransformation,
         rng: jax.Array) -> base.State:
  """The initial state: step, params, opt."""
  tokens = jnp.zeros((1, model.length), jnp.int32)
  labels = jnp.zeros((1,), jnp.int32) if model.num_classes else None
  params = model.init({"params": rng}, tokens, labels)["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": tx.init(params)}


def per_example_loss(model: PixelTransformer, params: Any, images: jax.Array,
                     labels: jax.Array | None = None, rng: jax.Array | None = None
                     ) -> jax.Array:
  """``-log p(x)`` in nats per image ``[B]`` (``labels``: a conditional model's; ``rng``:
  dropout's key in training, None to evaluate)."""
  tokens = transformer.quantise(images.reshape(images.shape[0], -1), model.levels)
  train = rng is not None
  logits = model.apply({"params": params}, tokens, labels, train,
                       rngs={"dropout": rng} if train else None)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
  return jnp.sum(nll, axis=-1)


def train_step(state: base.State, batch: base.Batch, rng: jax.Array, *,
               model: PixelTransformer, tx: optax.GradientTransformation
               ) -> tuple[base.State, base.Metrics]:
  """One update of the (importance-weighted) mean NLL per image."""
  rng = jax.random.fold_in(rng, state["step"])
  labels = _labels(model, batch)

  def loss_fn(params):
    nll = per_example_loss(model, params, batch["image"], labels, rng)
    return losses.weighted_mean(nll, batch.get("weight")), nll

  (loss, nll), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  mean_nll = jnp.mean(nll)
  metrics = {"loss": loss, "nll": mean_nll,
             "bits_per_dim": mean_nll / (model.length * math.log(2.0)),
             "grad_norm": base.global_norm(grads)}
  return {"step": state["step"] + 1, "params": params, "opt": opt}, metrics


def decode(state: base.State, latents: jax.Array, labels: jax.Array, *,
           model: PixelTransformer, temperature: float, top_k: int) -> jax.Array:
  """Images in [-1, 1] sampled pixel by pixel, pixel i at ``u_i = Phi(latents[:, i])``."""
  u = jax.scipy.stats.norm.cdf(latents.astype(jnp.float32))
  tokens, _ = transformer.sample(model, state["params"], u,
                                 labels if model.num_classes else None, temperature, top_k)
  images = transformer.dequantise(tokens, model.levels)
  return images.reshape((latents.shape[0],) + tuple(model.image_shape))


def nll(state: base.State, batch: base.Batch, keys: jax.Array, num_samples: int, *,
        model: PixelTransformer) -> dict[str, jax.Array]:
  """The exact ``-log p(x)`` per image in nats (``keys``, ``num_samples``: unused)."""
  del keys, num_samples  # Exact: nothing to estimate.
  return {"nll": per_example_loss(model, state["params"], batch["image"],
                                  _labels(model, batch))}


def member_score(state: base.State, images: jax.Array, labels: jax.Array, *,
                 model: PixelTransformer) -> jax.Array:
  """``log p(x)`` of real images: the membership attack (members are likelier)."""
  return -per_example_loss(model, state["params"], images,
                           labels if model.num_classes else None)


def build(model: PixelTransformer, spec: Any, objective: Mapping[str, Any],
          optim: Mapping[str, Any], privacy: Any = None) -> base.Objective:
  """The autoregressive objective from the config's objective and optim sections."""
  del spec  # The model carries the image shape.
  if not isinstance(model, PixelTransformer):
    raise ConfigError("The 'autoregressive' objective needs a PixelTransformer "
                      "(model.name='pixel_transformer').")
  if privacy is not None:
    raise ConfigError("The 'autoregressive' objective has no DP-SGD training.")
  tx = base.make_optimizer(optim)
  return base.Objective(
      init=functools.partial(init, model, tx),
      train_step=functools.partial(train_step, model=model, tx=tx),
      decode=functools.partial(decode, model=model,
                               temperature=float(objective["temperature"]),
                               top_k=int(objective["top_k"])),
      latent_dim=model.length,
      num_classes=model.num_classes,
      condition_key=model.condition_key,
      member_score=functools.partial(member_score, model=model),
      nll=functools.partial(nll, model=model))


OBJECTIVES.register("autoregressive")(Entry(build, DEFAULTS, check,
                                            capabilities=("conditional",)))
