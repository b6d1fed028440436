"""GAN objective: non-saturating loss, TTUR, ``n_disc`` D steps per G step, generator EMA.

The discriminator's loss is split into a per-example real term and a per-example fake term,
so importance weights multiply the real term only (Choi et al. 2020).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from fairgen.models import GanModules
from fairgen.objectives import base

# images -> (loss, metrics), added to the generator's loss (fairgen.fair.attribute_penalty).
Penalty = Callable[[jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def d_nonsaturating(real_logits: jax.Array,
                    fake_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example discriminator losses: -log D(x) on reals, -log(1 - D(G(z))) on fakes."""
  return jax.nn.softplus(-real_logits), jax.nn.softplus(fake_logits)


def g_nonsaturating(fake_logits: jax.Array) -> jax.Array:
  """Per-example non-saturating generator loss: -log D(G(z))."""
  return jax.nn.softplus(-fake_logits)


def _split_microbatches(x: jax.Array, k: int) -> jax.Array:
  """[k*B, ...] -> [k, B, ...], keeping the batch axis (the sharded one) contiguous."""
  b = x.shape[0] // k
  return jnp.moveaxis(x.reshape((b, k) + x.shape[1:]), 1, 0)


def init(nets: GanModules, gen_tx: optax.GradientTransformation,
         disc_tx: optax.GradientTransformation, image_shape: tuple[int, int, int],
         rng: jax.Array) -> base.State:
  """The initial GAN state: step, gen {params, batch_stats, opt}, disc {params, opt}, ema."""
  g_rng, d_rng = jax.random.split(rng)
  z = jnp.zeros((1, nets.latent_dim))
  labels = jnp.zeros((1,), jnp.int32)
  g_vars = nets.generator.init(g_rng, z, labels, train=False)
  d_vars = nets.discriminator.init(d_rng, jnp.zeros((1,) + image_shape), labels, train=False)
  gen = {"params": g_vars["params"], "opt": gen_tx.init(g_vars["params"])}
  if "batch_stats" in g_vars:
    gen["batch_stats"] = g_vars["batch_stats"]
  disc = {"params": d_vars["params"], "opt": disc_tx.init(d_vars["params"])}
  return {"step": jnp.zeros((), jnp.int32), "gen": gen, "disc": disc,
          "ema": jax.tree.map(jnp.copy, g_vars["params"])}


def train_step(state: base.State, batch: base.Batch, rng: jax.Array, *, nets: GanModules,
               gen_tx: optax.GradientTransformation, disc_tx: optax.GradientTransformation,
               n_disc: int, ema_decay: float, penalty: Penalty | None = None
               ) -> tuple[base.State, base.Metrics]:
  """One generator update after ``n_disc`` discriminator updates.

  ``penalty`` (``images -> (loss, metrics)``) is added to the generator's loss: the
  fairness penalty ``L_G + lambda * L_F`` (``fairgen.fair.attribute_penalty``).
  """
  rng = jax.random.fold_in(rng, state["step"])
  G, D = nets.generator, nets.discriminator
  gen, disc = state["gen"], state["disc"]
  g_state = {k: v for k, v in gen.items() if k == "batch_stats"}

  def generate(g_params, z, labels):
    fake, updates = G.apply({"params": g_params, **g_state}, z, labels, train=True,
                            mutable=list(g_state))
    return fake, updates

  reals = _split_microbatches(batch["image"], n_disc)
  labels = _split_microbatches(batch[nets.condition_key] if nets.num_classes else
                               batch["label"], n_disc)
  weights = (_split_microbatches(batch["weight"], n_disc) if "weight" in batch
             else jnp.ones(labels.shape, jnp.float32))
  b = reals.shape[1]

  def d_update(carry, inputs):
    d_params, d_opt = carry
    x_real, y, w, i = inputs
    r_z, r_real, r_fake = jax.random.split(jax.random.fold_in(rng, i), 3)
    z = jax.random.normal(r_z, (b, nets.latent_dim))
    fake, _ = generate(gen["params"], z, y)
    fake = jax.lax.stop_gradient(fake)

    def loss_fn(p):
      real_logits = D.apply({"params": p}, x_real, y, train=True, rngs={"dropout": r_real})
      fake_logits = D.apply({"params": p}, fake, y, train=True, rngs={"dropout": r_fake})
      real_loss, fake_loss = d_nonsaturating(real_logits, fake_logits)
      loss = base.weighted_mean(real_loss, w) + jnp.mean(fake_loss)
      return loss, (jnp.mean(jax.nn.sigmoid(real_logits)), jnp.mean(jax.nn.sigmoid(fake_logits)))

    (loss, (d_real, d_fake)), grads = jax.value_and_grad(loss_fn, has_aux=True)(d_params)
    updates, d_opt = disc_tx.update(grads, d_opt, d_params)
    d_params = optax.apply_updates(d_params, updates)
    return (d_params, d_opt), {"d_loss": loss, "d_real": d_real, "d_fake": d_fake,
                               "d_grad_norm": base.global_norm(grads)}

  # A Python loop, not lax.scan: XLA:CPU leaves the convolutions of a while-loop body on a
  # slow path (measured: a full-width DCGAN step 16 s instead of 0.4 s); n_disc is small.
  carry = (disc["params"], disc["opt"])
  for i in range(n_disc):
    carry, d_metrics = d_update(carry, (reals[i], labels[i], weights[i], i))
  d_params, d_opt = carry

  r_z, r_drop = jax.random.split(jax.random.fold_in(rng, n_disc))
  z = jax.random.normal(r_z, (b, nets.latent_dim))
  y_fake = labels[-1]

  def g_loss_fn(g_params):
    fake, updates = generate(g_params, z, y_fake)
    logits = D.apply({"params": d_params}, fake, y_fake, train=True, rngs={"dropout": r_drop})
    loss = jnp.mean(g_nonsaturating(logits))
    aux = {"g_adv_loss": loss}
    if penalty is not None:
      fair_loss, fair_metrics = penalty(fake)
      loss, aux = loss + fair_loss, {**aux, **fair_metrics}
    return loss, (updates, aux)

  (g_loss, (g_updates, g_aux)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(
      gen["params"])
  updates, g_opt = gen_tx.update(g_grads, gen["opt"], gen["params"])
  g_params = optax.apply_updates(gen["params"], updates)
  new_gen = {"params": g_params, "opt": g_opt, **g_updates}
  new_state = {
      "step": state["step"] + 1,
      "gen": new_gen,
      "disc": {"params": d_params, "opt": d_opt},
      "ema": base.ema_update(state["ema"], g_params, state["step"], ema_decay),
  }
  metrics = {"g_loss": g_loss, "g_grad_norm": base.global_norm(g_grads), **d_metrics}
  if penalty is not None:
    metrics.update(g_aux)
  return new_state, metrics


def decode(state: base.State, z: jax.Array, labels: jax.Array, *, nets: GanModules,
           use_ema: bool) -> jax.Array:
  """Generator images for latents ``z`` (EMA weights if kept, BN running statistics)."""
  params = state["ema"] if use_ema else state["gen"]["params"]
  variables = {"params": params}
  if "batch_stats" in state["gen"]:
    variables["batch_stats"] = state["gen"]["batch_stats"]
  return nets.generator.apply(variables, z, labels, train=False)


def build(nets: GanModules, spec: Any, objective: Mapping[str, Any],
          optim: Mapping[str, Any], penalty: Penalty | None = None) -> base.Objective:
  """The GAN objective from the config's objective and optim sections.

  ``penalty``: an optional term of the generator's loss (see ``train_step``).
  """
  if not isinstance(nets, GanModules):
    raise ValueError("The 'gan' objective needs a GAN model (e.g. model.name='dcgan').")
  gen_tx = base.make_optimizer(optim["gen"])
  disc_tx = base.make_optimizer(optim["disc"])
  n_disc = int(objective["n_disc"])
  return base.Objective(
      init=functools.partial(init, nets, gen_tx, disc_tx, tuple(spec.image_shape)),
      train_step=functools.partial(train_step, nets=nets, gen_tx=gen_tx, disc_tx=disc_tx,
                                   n_disc=n_disc, ema_decay=float(objective["ema_decay"]),
                                   penalty=penalty),
      decode=functools.partial(decode, nets=nets, use_ema=float(objective["ema_decay"]) > 0),
      latent_dim=nets.latent_dim,
      examples_per_step=n_disc,
      num_classes=nets.num_classes)
