"""VFAE objective (Louizos et al. 2016): a fair representation z1 of tabular rows.

Per example (the paper's supervised case, every label known):
``recon NLL + beta * KL + alpha_y * BCE(y | z1)``, reduced by ``losses.weighted_mean``; plus
the batch-level penalty ``mmd_weight * MMD^2(z1[s = 0], z1[s = 1])`` on the reparameterised
samples of ``q(z1 | x, s)``. The MMD uses the exact Gaussian-kernel matrix of the batch (the
paper approximates it with random Fourier features for large batches) with bandwidth
``mmd_sigma``, or the median heuristic on the batch when ``mmd_sigma`` is 0, and the
biased (V-statistic) estimate, which is >= 0 and exactly 0 for equal sets
(``mmd_unbiased=True`` for the U-statistic, which can go below 0). A batch holding only one
group contributes 0 (masked, never NaN). Importance weights (``batch['weight']``) weight
both the per-example terms and each group's distribution in the MMD.

Config: ``objective`` keys are ``DEFAULTS``; ``optim`` is one optimizer section
(``base.make_optimizer``).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from fairgen.config import ConfigError, require
from fairgen.metrics import mmd
from fairgen.models.vfae import VFAE
from fairgen.objectives import base
from fairgen.objectives import losses
from fairgen.objectives.registry import OBJECTIVES, Entry

DEFAULTS = {
    "beta": 1.0,  # Weight of the KL term(s).
    "alpha_y": 1.0,  # Weight of the label term -log q(y | z1).
    "mmd_weight": 1.0,  # Weight of MMD^2 between the groups' z1.
    "mmd_sigma": 0.0,  # Kernel bandwidth; 0: the batch's median pairwise distance.
    "mmd_unbiased": False,  # The U-statistic instead of the (biased) V-statistic.
}


def check(cfg: Mapping[str, Any]) -> None:
  """Raises ConfigError for negative weights or bandwidth."""
  for key in ("beta", "alpha_y", "mmd_weight", "mmd_sigma"):
    require(float(cfg[key]) >= 0, f"objective.{key} must be >= 0, got {cfg[key]}.")


def init(model: VFAE, tx: optax.GradientTransformation, rng: jax.Array) -> base.State:
  """The initial state: step, params, opt."""
  p_rng, z_rng = jax.random.split(rng)
  x = jnp.zeros((1, model.feature_dim), jnp.float32)
  zeros = jnp.zeros((1,), jnp.int32)
  params = model.init({"params": p_rng, "latent": z_rng}, x, zeros, zeros)["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": tx.init(params)}


def group_mmd(z: jax.Array, attr: jax.Array, sigma: float, unbiased: bool,
              weight: jax.Array | None = None) -> jax.Array:
  """MMD^2 between the rows of ``z`` of the two groups (bandwidth 0: median heuristic)."""
  bandwidth = mmd.median_bandwidth(z) if sigma <= 0 else sigma
  return mmd.masked_mmd2(z, attr, bandwidth, weight=weight, unbiased=unbiased)


def train_step(state: base.State, batch: base.Batch, rng: jax.Array, *, model: VFAE,
               tx: optax.GradientTransformation, beta: float, alpha_y: float,
               mmd_weight: float, mmd_sigma: float, mmd_unbiased: bool
               ) -> tuple[base.State, base.Metrics]:
  """One update of the VFAE loss (see the module docstring)."""
  rng = jax.random.fold_in(rng, state["step"])
  x, s, y = batch["features"], batch["attr"], batch["label"]
  weight = batch.get("weight")

  def loss_fn(params):
    out = model.apply({"params": params}, x, s, y, rngs={"latent": rng})
    per_example = out["recon"] + beta * out["kl"] + alpha_y * out["label_nll"]
    penalty = group_mmd(out["z1"], s, mmd_sigma, mmd_unbiased, weight)
    return losses.weighted_mean(per_example, weight) + mmd_weight * penalty, (out, penalty)

  (loss, (out, penalty)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {
      "loss": loss,
      "recon": losses.weighted_mean(out["recon"], weight),
      "kl": losses.weighted_mean(out["kl"], weight),
      "label_nll": losses.weighted_mean(out["label_nll"], weight),
      "mmd": penalty,
      "train_accuracy": jnp.mean(((out["logit"] > 0) == (y > 0)).astype(jnp.float32)),
      "grad_norm": base.global_norm(grads),
  }
  return {"step": state["step"] + 1, "params": params, "opt": opt}, metrics


def encode_representation(state: base.State, features: jax.Array, attr: jax.Array, *,
                          modules: VFAE) -> jax.Array:
  """The fair representation: the posterior mean of ``q(z1 | x, s)``, ``[B, latent_dim]``."""
  mean, _ = modules.apply({"params": state["params"]}, features, attr, method=VFAE.encode)
  return mean


def reconstruction_error(state: base.State, features: jax.Array, attr: jax.Array, *,
                         modules: VFAE) -> jax.Array:
  """Per-example reconstruction NLL (nats) of rows decoded from the posterior mean."""

  def fn(module: VFAE) -> jax.Array:
    mean, _ = module.encode(features, attr)
    return module.reconstruction_nll(features, module.decode(mean, attr))

  return modules.apply({"params": state["params"]}, method=fn)


def predict(state: base.State, batch: base.Batch, *, model: VFAE) -> jax.Array:
  """``P(y = 1)`` from the label head at the posterior mean of ``z1``, ``[B]``."""

  def fn(module: VFAE) -> jax.Array:
    mean, _ = module.encode(batch["features"], batch["attr"])
    return jax.nn.sigmoid(module.classify(mean))

  return model.apply({"params": state["params"]}, method=fn)


def build(model: VFAE, spec: Any, objective: Mapping[str, Any],
          optim: Mapping[str, Any]) -> base.Objective:
  """The VFAE objective from the config's objective (keys: ``DEFAULTS``) and optim sections."""
  del spec  # The model carries the column layout.
  if not isinstance(model, VFAE):
    raise ConfigError("The 'vfae' objective needs a VFAE model (model.name='vfae').")
  cfg = objective
  tx = base.make_optimizer(optim)
  return base.Objective(
      init=functools.partial(init, model, tx),
      train_step=functools.partial(
          train_step, model=model, tx=tx, beta=float(cfg["beta"]),
          alpha_y=float(cfg["alpha_y"]), mmd_weight=float(cfg["mmd_weight"]),
          mmd_sigma=float(cfg["mmd_sigma"]), mmd_unbiased=bool(cfg["mmd_unbiased"])),
      decode=None,  # A representation learner: no prior sampling of rows.
      latent_dim=model.latent_dim,
      predict=functools.partial(predict, model=model))


OBJECTIVES.register("vfae")(Entry(build, DEFAULTS, check))
