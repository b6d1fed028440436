"""Fair tabular GAN: WGAN-GP (Gulrajani et al. 2017) with TabFairGAN's fairness penalty.

The adversarial step of ``adversarial.py`` adapted to table rows.

Each step makes ``n_critic`` critic updates, each on its own real micro-batch (the loop
hands ``n_critic * batch_size`` rows; ``examples_per_step = n_critic``), then one generator
update. Critic loss per step: ``E[C(fake)] - E_w[C(real)] + gp_weight * E[(|grad C(x^)| -
1)^2]`` on random interpolates ``x^`` of real and fake rows; importance weights weight the
real term only. Generator loss (``g_loss``): ``-E[C(G(z))] + lambda_fair * |DP gap|``,
its adversarial part logged as ``g_adv_loss``. The DP gap of the
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

from fairgen.config import ConfigError, require
from fairgen.models.tabgan import TabGanModules, join_rows
from fairgen.objectives import adversarial
from fairgen.objectives import base
from fairgen.objectives import losses
from fairgen.objectives.registry import OBJECTIVES, Entry

DEFAULTS = {
    "n_critic": 5,  # Critic updates per generator update.
    "gp_weight": 10.0,  # Weight of the gradient penalty.
    "lambda_fair": 0.0,  # Weight of |DP gap| of the generated rows (0: plain WGAN-GP).
    "fair_start_step": 0,  # The penalty applies from this step on.
}
OPTIMIZERS = ("gen", "disc")


def check(cfg: Mapping[str, Any]) -> None:
  """Raises ConfigError for impossible settings."""
  require(cfg["n_critic"] >= 1, f"objective.n_critic must be >= 1, got {cfg['n_critic']}.")
  for key in ("gp_weight", "lambda_fair", "fair_start_step"):
    require(cfg[key] >= 0, f"objective.{key} must be >= 0, got {cfg[key]}.")


def adapter(nets: TabGanModules) -> adversarial.Adapter:
  """How encoded rows and the row generator and critic plug into the adversarial step."""

  def real_inputs(batch):
    return join_rows(batch["features"], batch["label"], batch["attr"], nets.num_classes,
                     nets.num_groups)

  def generate(gen, z, y):
    del y  # The generator draws the label and attribute as part of the row.
    return nets.generator.apply({"params": gen["params"]}, z, train=True), {}

  def discriminate(params, rows, y, rng):
    del y, rng
    return nets.discriminator.apply({"params": params}, rows)

  def d_keys(key):
    latent, mix = jax.random.split(key)
    return {"latent": latent, "mix": mix}

  def d_metrics(real_out, fake_out, weight):
    return {"wasserstein": losses.weighted_mean(real_out, weight) - jnp.mean(fake_out)}

  return adversarial.Adapter(
      real_inputs=real_inputs,
      conditions=lambda batch: jnp.zeros(batch["label"].shape, jnp.int32),
      generate=generate, discriminate=discriminate, d_keys=d_keys,
      g_keys=lambda key: {"latent": key}, d_metrics=d_metrics,
      latent_dim=nets.latent_dim, prefix="critic", scan_disc=True)


def _is_one(rows: jax.Array, column: int) -> jax.Array:
  """1.0 where the binary block ending at ``column`` (its "1" entry) has its argmax there."""
  return (jnp.argmax(rows[:, column - 1:column + 1], -1) == 1).astype(jnp.float32)


def dp_penalty(rows: jax.Array, step: jax.Array, constants: Any, *, nets: TabGanModules,
               lambda_fair: float, fair_start_step: int
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``lambda_fair * |soft DP gap|`` of generated rows, from ``fair_start_step`` on."""
  del constants  # The DP gap needs no frozen arrays.
  fair_on = (step >= fair_start_step).astype(jnp.float32)
  gap = losses.soft_dp_gap(rows[:, nets.label_column], rows[:, nets.attr_column])
  value = lambda_fair * fair_on * jnp.abs(gap)
  hard = losses.hard_dp_gap(_is_one(rows, nets.label_column), _is_one(rows, nets.attr_column))
  return value, {"fair_penalty": value, "dp_gap": gap, "dp_gap_hard": hard}


def init(nets: TabGanModules, gen_tx: optax.GradientTransformation,
         disc_tx: optax.GradientTransformation, rng: jax.Array) -> base.State:
  """The initial state: step, gen {params, opt}, disc {params, opt}."""
  g_rng, c_rng = jax.random.split(rng)
  g_vars = nets.generator.init(g_rng, jnp.zeros((1, nets.latent_dim)))
  c_params = nets.discriminator.init(c_rng, jnp.zeros((1, nets.row_dim)))["params"]
  return adversarial.init_nets(g_vars, c_params, gen_tx, disc_tx, ema=False)


def decode(state: base.State, latents: jax.Array, labels: jax.Array, *,
           nets: TabGanModules) -> jax.Array:
  """Generated rows ``[n, D + 4]``: one-hot categoricals, continuous values as generated.

  ``labels`` is unused: the generator draws the label as part of the row.
  """
  del labels
  return nets.generator.apply({"params": state["gen"]["params"]}, latents, train=False)


def build(nets: TabGanModules, spec: Any, objective: Mapping[str, Any],
          optim: Mapping[str, Any]) -> base.Objective:
  """The fair WGAN-GP objective from the objective (keys: ``DEFAULTS``) and optim sections."""
  del spec  # The modules carry the row layout.
  if not isinstance(nets, TabGanModules):
    raise ConfigError("The 'tabgan' objective needs a tabular GAN model (model.name='tabgan').")
  gen_tx, disc_tx = base.make_optimizer(optim["gen"]), base.make_optimizer(optim["disc"])
  settings = adversarial.Settings(loss=losses.adversarial_loss("wasserstein"),
                                  n_disc=int(objective["n_critic"]),
                                  gp_weight=float(objective["gp_weight"]))
  penalty = functools.partial(dp_penalty, nets=nets, lambda_fair=float(objective["lambda_fair"]),
                              fair_start_step=int(objective["fair_start_step"]))
  return base.Objective(
      init=functools.partial(init, nets, gen_tx, disc_tx),
      train_step=functools.partial(adversarial.train_step, adapter=adapter(nets),
                                   settings=settings, gen_tx=gen_tx, disc_tx=disc_tx,
                                   penalty=penalty),
      decode=functools.partial(decode, nets=nets),
      latent_dim=nets.latent_dim,
      examples_per_step=settings.n_disc)


OBJECTIVES.register("tabgan")(Entry(build, DEFAULTS, check, OPTIMIZERS,
                                    examples_per_step=lambda cfg: int(cfg["n_critic"])))
