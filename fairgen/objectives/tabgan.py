"""Fair tabular GAN: WGAN-GP (Gulrajani et al. 2017) with TabFairGAN's fairness penalty.

Each step makes ``n_critic`` critic updates, each on its own real micro-batch (the loop
hands ``n_critic * batch_size`` rows; ``examples_per_step = n_critic``), then one generator
update. Critic loss per step: ``E[C(fake)] - E_w[C(real)] + gp_weight * E[(|grad C(x^)| -
1)^2]`` on random interpolates ``x^`` of real and fake rows; importance weights weight the
real term only. Generator loss: ``-E[C(G(z))] + lambda_fair * |DP gap|``. The DP gap of the
generated rows is computed, as in TabFairGAN (Rajabi & Garibay 2022), with the generator's
soft (Gumbel-softmax) label and attribute columns ``p_y = P(label = 1)`` and
``p_s = P(attr = 1)`` as weights, so it is differentiable:
``E[p_y | unpriv] - E[p_y | priv] = sum(p_y (1 - p_s)) / sum(1 - p_s) - sum(p_y p_s) / sum(p_s)``
(AIF360's sign: unprivileged minus privileged). TabFairGAN's own penalty is signed,
``-lambda * gap``, which keeps rewarding the unprivileged group past parity; the absolute
value here makes parity the optimum. ``lambda_fair = 0`` is the plain WGAN-GP. TabFairGAN
trains without the penalty first and then fine-tunes with it: the penalty here applies from
step ``fair_start_step`` on (0: from the start).

Config: ``objective`` keys are ``DEFAULTS``; ``optim.gen`` and ``optim.disc`` are the
generator's and critic's optimizers (usually Adam with b1 = 0.5, b2 = 0.9; the WGAN-GP
paper's Algorithm 1 uses lr 1e-4, b1 = 0, b2 = 0.9).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from fairgen import config as config_lib
from fairgen.models.tabgan import TabGanModules, join_rows, split_generated
from fairgen.objectives import base
from fairgen.objectives.vfae import settings  # Shared config-key check.

DEFAULTS = {
    "n_critic": 5,  # Critic updates per generator update.
    "gp_weight": 10.0,  # Weight of the gradient penalty.
    "lambda_fair": 0.0,  # Weight of |DP gap| of the generated rows (0: plain WGAN-GP).
    "fair_start_step": 0,  # The penalty applies from this step on.
}

_EPS = 1e-6


def soft_dp_gap(p_label: jax.Array, p_attr: jax.Array) -> jax.Array:
  """``E[p_label | unprivileged] - E[p_label | privileged]`` with soft group weights.

  Args:
    p_label: probability (or indicator) of the favourable label per row ``[B]``.
    p_attr: probability (or indicator) of the privileged group per row ``[B]``.

  Returns:
    The signed gap (a scalar); a group with no weight counts as a rate of 0.
  """
  unpriv = 1.0 - p_attr
  rate_u = jnp.sum(p_label * unpriv) / (jnp.sum(unpriv) + _EPS)
  rate_p = jnp.sum(p_label * p_attr) / (jnp.sum(p_attr) + _EPS)
  return rate_u - rate_p


def _microbatches(x: jax.Array, k: int) -> jax.Array:
  """[k*B, ...] -> [k, B, ...], keeping the batch axis (the sharded one) contiguous."""
  b = x.shape[0] // k
  return jnp.moveaxis(x.reshape((b, k) + x.shape[1:]), 1, 0)


def init(nets: TabGanModules, gen_tx: optax.GradientTransformation,
         critic_tx: optax.GradientTransformation, rng: jax.Array) -> base.State:
  """The initial state: step, gen {params, opt}, critic {params, opt}."""
  g_rng, c_rng = jax.random.split(rng)
  g_params = nets.generator.init(g_rng, jnp.zeros((1, nets.latent_dim)))["params"]
  c_params = nets.critic.init(c_rng, jnp.zeros((1, nets.row_dim)))["params"]
  return {"step": jnp.zeros((), jnp.int32),
          "gen": {"params": g_params, "opt": gen_tx.init(g_params)},
          "critic": {"params": c_params, "opt": critic_tx.init(c_params)}}


def gradient_penalty(critic: Any, params: Any, interpolates: jax.Array) -> jax.Array:
  """Per-example ``(|d C(x) / d x| - 1)^2`` at ``interpolates`` (the critic is row-wise)."""
  grads = jax.grad(lambda x: jnp.sum(critic.apply({"params": params}, x)))(interpolates)
  return (jnp.sqrt(jnp.sum(grads**2, axis=-1) + 1e-12) - 1.0)**2


def generated_rows(nets: TabGanModules, params: Any, rng: jax.Array, num: int,
                   train: bool = True) -> jax.Array:
  """``num`` rows from fresh prior latents (soft or straight-through in training)."""
  latents = jax.random.normal(rng, (num, nets.latent_dim))
  return nets.generator.apply({"params": params}, latents, train=train)


def train_step(state: base.State, batch: base.Batch, rng: jax.Array, *, nets: TabGanModules,
               gen_tx: optax.GradientTransformation, critic_tx: optax.GradientTransformation,
               n_critic: int, gp_weight: float, lambda_fair: float, fair_start_step: int
               ) -> tuple[base.State, base.Metrics]:
  """``n_critic`` critic updates, then one generator update (see the module docstring)."""
  rng = jax.random.fold_in(rng, state["step"])
  C = nets.critic
  real = join_rows(batch["features"], batch["label"], batch["attr"], nets.num_classes,
                   nets.num_groups)
  reals = _microbatches(real, n_critic)
  weights = (_microbatches(batch["weight"], n_critic) if "weight" in batch
             else jnp.ones(reals.shape[:2], jnp.float32))
  b = reals.shape[1]
  g_params = state["gen"]["params"]

  def critic_update(carry, inputs):
    params, opt = carry
    x_real, w, i = inputs
    r_fake, r_mix = jax.random.split(jax.random.fold_in(rng, i))
    fake = jax.lax.stop_gradient(generated_rows(nets, g_params, r_fake, b))
    mix = jax.random.uniform(r_mix, (b, 1))
    interpolates = mix * x_real + (1.0 - mix) * fake

    def loss_fn(p):
      c_real = C.apply({"params": p}, x_real)
      c_fake = C.apply({"params": p}, fake)
      wasserstein = base.weighted_mean(c_real, w) - jnp.mean(c_fake)
      gp = jnp.mean(gradient_penalty(C, p, interpolates))
      return -wasserstein + gp_weight * gp, (wasserstein, gp)

    (loss, (wdist, gp)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = critic_tx.update(grads, opt, params)
    return (optax.apply_updates(params, updates), opt), {
        "critic_loss": loss, "wasserstein": wdist, "gp": gp,
        "critic_grad_norm": base.global_norm(grads)}

  (c_params, c_opt), c_metrics = jax.lax.scan(
      critic_update, (state["critic"]["params"], state["critic"]["opt"]),
      (reals, weights, jnp.arange(n_critic)))
  c_metrics = jax.tree.map(lambda m: m[-1], c_metrics)

  r_gen = jax.random.fold_in(rng, n_critic)
  fair_on = (state["step"] >= fair_start_step).astype(jnp.float32)

  def g_loss_fn(params):
    rows = generated_rows(nets, params, r_gen, b)
    adversarial = -jnp.mean(C.apply({"params": c_params}, rows))
    gap = soft_dp_gap(rows[:, nets.label_column], rows[:, nets.attr_column])
    penalty = lambda_fair * fair_on * jnp.abs(gap)
    return adversarial + penalty, (adversarial, penalty, gap, rows)

  (_, (g_loss, penalty, gap, rows)), g_grads = jax.value_and_grad(
      g_loss_fn, has_aux=True)(g_params)
  updates, g_opt = gen_tx.update(g_grads, state["gen"]["opt"], g_params)
  new_state = {
      "step": state["step"] + 1,
      "gen": {"params": optax.apply_updates(g_params, updates), "opt": g_opt},
      "critic": {"params": c_params, "opt": c_opt},
  }
  metrics = {"g_loss": g_loss, "fair_penalty": penalty, "dp_gap": gap,
             "dp_gap_hard": _hard_gap(_is_one(rows, nets.label_column),
                                      _is_one(rows, nets.attr_column)),
             "g_grad_norm": base.global_norm(g_grads), **c_metrics}
  return new_state, metrics


def _is_one(rows: jax.Array, column: int) -> jax.Array:
  """1.0 where the binary block ending at ``column`` (its "1" entry) has its argmax there."""
  return (jnp.argmax(rows[:, column - 1:column + 1], -1) == 1).astype(jnp.float32)


def _hard_gap(y: jax.Array, s: jax.Array) -> jax.Array:
  """DP gap of 0/1 indicators; 0 when a group is absent (the loop needs finite metrics)."""
  n_p, n_u = jnp.sum(s), jnp.sum(1.0 - s)
  gap = (jnp.sum(y * (1.0 - s)) / jnp.maximum(n_u, 1.0)
         - jnp.sum(y * s) / jnp.maximum(n_p, 1.0))
  return jnp.where((n_p > 0) & (n_u > 0), gap, 0.0)


def decode(state: base.State, latents: jax.Array, labels: jax.Array, *,
           nets: TabGanModules) -> jax.Array:
  """Generated rows ``[n, D + 4]``: one-hot categoricals, continuous values as generated.

  ``labels`` is unused: the generator draws the label as part of the row.
  """
  del labels
  return nets.generator.apply({"params": state["gen"]["params"]}, latents, train=False)


def build(nets: TabGanModules, spec: Any, objective: Mapping[str, Any],
          optim: Mapping[str, Any]) -> base.Objective:
  """The fair WGAN-GP objective from the config's objective (``DEFAULTS``) and optim
  (``gen``, ``disc``) sections."""
  del spec  # The modules carry the row layout.
  if not isinstance(nets, TabGanModules):
    raise config_lib.ConfigError(
        "The 'tabgan' objective needs a tabular GAN model (model.name='tabgan').")
  cfg = settings(objective, DEFAULTS)
  n_critic = int(cfg["n_critic"])
  if n_critic < 1:
    raise config_lib.ConfigError(f"objective.n_critic must be >= 1, got {n_critic}.")
  for key in ("gp_weight", "lambda_fair", "fair_start_step"):
    if cfg[key] < 0:
      raise config_lib.ConfigError(f"objective.{key} must be >= 0, got {cfg[key]}.")
  for net in ("gen", "disc"):
    if net not in optim:
      raise config_lib.ConfigError(
          f"The 'tabgan' objective needs optim.{net} (an optimizer: name, lr, b1, b2).")
  gen_tx, critic_tx = base.make_optimizer(optim["gen"]), base.make_optimizer(optim["disc"])
  return base.Objective(
      init=functools.partial(init, nets, gen_tx, critic_tx),
      train_step=functools.partial(
          train_step, nets=nets, gen_tx=gen_tx, critic_tx=critic_tx, n_critic=n_critic,
          gp_weight=float(cfg["gp_weight"]), lambda_fair=float(cfg["lambda_fair"]),
          fair_start_step=int(cfg["fair_start_step"])),
      decode=functools.partial(decode, nets=nets),
      latent_dim=nets.latent_dim,
      examples_per_step=n_critic)


__all__ = ["DEFAULTS", "build", "decode", "soft_dp_gap", "split_generated", "train_step"]
