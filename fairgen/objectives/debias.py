"""Adversarial debiasing (Zhang, Lemoine & Mitchell 2018), as in AIF360.

The predictor minimises its classification loss while an adversary tries to recover the
sensitive attribute from the predictor's output (and the true label, for equalized odds).
The predictor's update removes the projection of its gradient onto the adversary's gradient,
then subtracts ``alpha`` times the adversary's gradient:
``g = g_pred - (g_pred . u) u - alpha * g_adv`` with ``u = g_adv / |g_adv|``, per parameter
tensor as in AIF360. With ``debias=False`` it is the plain classifier.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from fairgen.config import ConfigError, require
from fairgen.models.tabular import DebiasModules
from fairgen.objectives import base
from fairgen.objectives import losses


DEFAULTS = {
    "debias": True,  # False: the plain classifier (no adversary).
    "adversary_weight": 0.1,  # alpha: how hard the predictor fights the adversary.
}


def check(cfg: Mapping[str, Any]) -> None:
  """Raises ConfigError for a negative adversary weight."""
  require(cfg["adversary_weight"] >= 0,
          f"objective.adversary_weight must be >= 0, got {cfg['adversary_weight']}.")


def project_out(g_pred: jax.Array, g_adv: jax.Array, alpha: float) -> jax.Array:
  """``g_pred`` minus its projection on ``g_adv``, minus ``alpha * g_adv`` (one tensor)."""
  unit = g_adv / (jnp.linalg.norm(g_adv) + 1e-12)
  return g_pred - jnp.sum(g_pred * unit) * unit - alpha * g_adv


def init(nets: DebiasModules, tx: optax.GradientTransformation,
         adv_tx: optax.GradientTransformation, feature_dim: int, rng: jax.Array) -> base.State:
  """The initial state: step, pred {params, opt}, adv {params, opt}."""
  p_rng, a_rng = jax.random.split(rng)
  x = jnp.zeros((1, feature_dim))
  p_params = nets.predictor.init(p_rng, x)["params"]
  a_params = nets.adversary.init(a_rng, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
  return {"step": jnp.zeros((), jnp.int32),
          "pred": {"params": p_params, "opt": tx.init(p_params)},
          "adv": {"params": a_params, "opt": adv_tx.init(a_params)}}


def train_step(state: base.State, batch: base.Batch, rng: jax.Array, *, nets: DebiasModules,
               tx: optax.GradientTransformation, adv_tx: optax.GradientTransformation,
               debias: bool, alpha: float) -> tuple[base.State, base.Metrics]:
  """One predictor update (projected when debiasing) and one adversary update."""
  rng = jax.random.fold_in(rng, state["step"])
  x, y, a = batch["features"], batch["label"], batch["attr"]
  weight = batch.get("weight")
  p_params, a_params = state["pred"]["params"], state["adv"]["params"]

  def logits_of(pp):
    return nets.predictor.apply({"params": pp}, x, train=True, rngs={"dropout": rng})

  def pred_loss(pp):
    logits = logits_of(pp)
    return losses.weighted_mean(optax.sigmoid_binary_cross_entropy(logits, y), weight), logits

  def adv_loss(pp, ap):
    adv_logits = nets.adversary.apply({"params": ap}, logits_of(pp), y)
    return losses.weighted_mean(optax.sigmoid_binary_cross_entropy(adv_logits, a), weight)

  (p_loss, logits), g_pred = jax.value_and_grad(pred_loss, has_aux=True)(p_params)
  metrics = {"pred_loss": p_loss, "pred_grad_norm": base.global_norm(g_pred),
             "train_accuracy": jnp.mean((logits > 0) == (y > 0))}
  new_state = {"step": state["step"] + 1}
  if debias:
    a_loss, (g_adv_p, g_adv_a) = jax.value_and_grad(adv_loss, argnums=(0, 1))(p_params,
                                                                             a_params)
    g_pred = jax.tree.map(functools.partial(project_out, alpha=alpha), g_pred, g_adv_p)
    updates, a_opt = adv_tx.update(g_adv_a, state["adv"]["opt"], a_params)
    new_state["adv"] = {"params": optax.apply_updates(a_params, updates), "opt": a_opt}
    metrics["adv_loss"] = a_loss
  else:
    new_state["adv"] = state["adv"]
  updates, p_opt = tx.update(g_pred, state["pred"]["opt"], p_params)
  new_state["pred"] = {"params": optax.apply_updates(p_params, updates), "opt": p_opt}
  return new_state, metrics


def predict(state: base.State, batch: base.Batch, *, nets: DebiasModules) -> jax.Array:
  """P(label = 1 | features) for a batch."""
  logits = nets.predictor.apply({"params": state["pred"]["params"]}, batch["features"])
  return jax.nn.sigmoid(logits)


def build(nets: DebiasModules, spec: Any, objective: Mapping[str, Any],
          optim: Mapping[str, Any]) -> base.Objective:
  """The adversarial-debiasing objective from the config's objective and optim sections."""
  if not isinstance(nets, DebiasModules):
    raise ConfigError("The 'adversarial_debiasing' objective needs model.name='fair_mlp'.")
  tx, adv_tx = base.make_optimizer(optim), base.make_optimizer(optim)
  return base.Objective(
      init=functools.partial(init, nets, tx, adv_tx, spec.feature_dim),
      train_step=functools.partial(train_step, nets=nets, tx=tx, adv_tx=adv_tx,
                                   debias=bool(objective["debias"]),
                                   alpha=float(objective["adversary_weight"])),
      decode=None, latent_dim=0,
      predict=functools.partial(predict, nets=nets))
