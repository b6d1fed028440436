"""Adversarial debiasing (Zhang, Lemoine & Mitchell 2018), as in AIF360.

The predictor minimises its classification loss while an adversary tries to recover the
sensitive attribute from the predictor's output (and the true label, for equalized odds).
The predictor's update removes the projection of its gradient onto the adversary's gradient,
then subtracts ``alpha`` times the adversary's gradient:
``g = g_pred - (g_pred . u) u - alpha * g_adv`` with ``u = g_adv / |g_adv|``, per parameter
tensor as in AIF360. With ``debias=False`` it is the plain classifier.

With ``privacy`` both networks see data, so both train by DP-SGD, as one mechanism: each
example's three gradients (the predictor's loss w.r.t. the predictor, the adversary's loss
w.r.t. the predictor and w.r.t. the adversary) are clipped *jointly*, as one vector, to
``clip_norm``, and one Gaussian noise draw is added to their sum. One step is then one
sampled Gaussian mechanism, as the accountant counts it; the projection is post-processing.
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
from fairgen.objectives.registry import OBJECTIVES, Entry


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
               debias: bool, alpha: float, privacy: base.PrivateGradient | None = None
               ) -> tuple[base.State, base.Metrics]:
  """One predictor update (projected when debiasing) and one adversary update; with
  ``privacy``, both from one DP-SGD gradient (see the module docstring)."""
  rng = jax.random.fold_in(rng, state["step"])
  if privacy is not None:
    return _private_step(state, batch, rng, nets=nets, tx=tx, adv_tx=adv_tx, debias=debias,
                         alpha=alpha, privacy=privacy)
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
  grads = {"pred": g_pred}
  if debias:
    metrics["adv_loss"], (grads["adv_pred"], grads["adv"]) = jax.value_and_grad(
        adv_loss, argnums=(0, 1))(p_params, a_params)
  return _update(state, grads, tx=tx, adv_tx=adv_tx, alpha=alpha), metrics


def _update(state: base.State, grads: dict[str, Any], *, tx: optax.GradientTransformation,
            adv_tx: optax.GradientTransformation, alpha: float) -> base.State:
  """Applies ``grads`` (``pred``; and ``adv_pred``, ``adv`` when debiasing)."""
  p_params, a_params = state["pred"]["params"], state["adv"]["params"]
  g_pred = grads["pred"]
  new_state = {"step": state["step"] + 1, "adv": state["adv"]}
  if "adv" in grads:
    g_pred = jax.tree.map(functools.partial(project_out, alpha=alpha), g_pred,
                          grads["adv_pred"])
    updates, a_opt = adv_tx.update(grads["adv"], state["adv"]["opt"], a_params)
    new_state["adv"] = {"params": optax.apply_updates(a_params, updates), "opt": a_opt}
  updates, p_opt = tx.update(g_pred, state["pred"]["opt"], p_params)
  new_state["pred"] = {"params": optax.apply_updates(p_params, updates), "opt": p_opt}
  return new_state


def _private_step(state: base.State, batch: base.Batch, rng: jax.Array, *,
                  nets: DebiasModules, tx: optax.GradientTransformation,
                  adv_tx: optax.GradientTransformation, debias: bool, alpha: float,
                  privacy: base.PrivateGradient) -> tuple[base.State, base.Metrics]:
  """The DP-SGD update of ``train_step``: the three gradients of each example (two when not
  debiasing) clipped as one vector, noised once."""
  params = {"pred": state["pred"]["params"]}
  if debias:  # The predictor twice: its gradient under each loss is kept apart.
    params.update(adv_pred=state["pred"]["params"], adv=state["adv"]["params"])

  def example_loss(params, example, key):
    x, y, a = (v[None] for v in example)
    logits = nets.predictor.apply({"params": params["pred"]}, x, train=True,
                                  rngs={"dropout": key})
    loss = optax.sigmoid_binary_cross_entropy(logits, y)[0]
    out = {"pred_loss": loss, "correct": (logits[0] > 0) == (y[0] > 0)}
    total = loss
    if debias:
      adv_in = nets.predictor.apply({"params": params["adv_pred"]}, x, train=True,
                                    rngs={"dropout": key})
      adv_logits = nets.adversary.apply({"params": params["adv"]}, adv_in, y)
      out["adv_loss"] = optax.sigmoid_binary_cross_entropy(adv_logits, a)[0]
      total = total + out["adv_loss"]
    return total, out

  mask = batch["mask"]
  grads, out, stats = privacy(example_loss, params,
                              (batch["features"], batch["label"], batch["attr"]), rng, mask,
                              batch.get("weight"), batch.get("canary"))
  metrics = {"pred_loss": privacy.mean(out["pred_loss"], mask),
             "pred_grad_norm": base.global_norm(grads["pred"]),
             "train_accuracy": privacy.mean(out["correct"], mask),
             "batch_examples": jnp.sum(mask), **stats}
  if debias:
    metrics["adv_loss"] = privacy.mean(out["adv_loss"], mask)
  return _update(state, grads, tx=tx, adv_tx=adv_tx, alpha=alpha), metrics


def predict(state: base.State, batch: base.Batch, *, nets: DebiasModules) -> jax.Array:
  """P(label = 1 | features) for a batch."""
  logits = nets.predictor.apply({"params": state["pred"]["params"]}, batch["features"])
  return jax.nn.sigmoid(logits)


def build(nets: DebiasModules, spec: Any, objective: Mapping[str, Any],
          optim: Mapping[str, Any], privacy: base.PrivateGradient | None = None
          ) -> base.Objective:
  """The adversarial-debiasing objective from the config's objective and optim sections
  (both networks by DP-SGD with ``privacy``)."""
  if not isinstance(nets, DebiasModules):
    raise ConfigError("The 'adversarial_debiasing' objective needs model.name='fair_mlp'.")
  tx, adv_tx = base.make_optimizer(optim), base.make_optimizer(optim)
  return base.Objective(
      init=functools.partial(init, nets, tx, adv_tx, spec.feature_dim),
      train_step=functools.partial(train_step, nets=nets, tx=tx, adv_tx=adv_tx,
                                   debias=bool(objective["debias"]),
                                   alpha=float(objective["adversary_weight"]),
                                   privacy=privacy),
      decode=None, latent_dim=0,
      predict=functools.partial(predict, nets=nets))


OBJECTIVES.register("adversarial_debiasing")(Entry(build, DEFAULTS, check, private=True))
