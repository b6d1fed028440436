"""The one adversarial train step: ``n_disc`` discriminator updates, then a generator update.

Image GANs (``gan.py``) and tabular GANs (``tabgan.py``) differ only in the shape of their
data, which an ``Adapter`` describes: how a batch becomes real inputs and conditions, how the
generator and discriminator are applied, and how each update splits its random key. The loss
family (``losses.ADVERSARIAL_LOSSES``), the gradient penalty, importance weights, the
generator penalty and the EMA are the same for both.

Per step, with ``rng = fold_in(base, step)``:
- discriminator update ``i`` (of ``n_disc``) takes its own real micro-batch
  (``losses.split_microbatches``) and the keys ``adapter.d_keys(fold_in(rng, i))``. Its loss
  is ``weighted_mean(real_term, w) + mean(fake_term) + gp_weight * mean(gp)
  + r1_gamma / 2 * mean(r1)``: importance weights ``w`` multiply the real term only (Choi et
  al. 2020), self-normalised; ``gp`` is the gradient penalty at random interpolates of real
  and fake inputs (any rank), ``r1`` the squared input gradient at the reals (lazy: every
  ``r1_every`` steps, scaled by it);
- the generator update uses ``adapter.g_keys(fold_in(rng, n_disc))`` and minimises
  ``mean(g_term) + penalty`` where ``penalty(fake, step, constants)`` is an optional extra
  term (the fairness penalty; ``constants`` are its frozen arrays, jit arguments). ``g_loss`` is that total, ``g_adv_loss`` the adversarial part.

Spectrally normalised nets (``state['spectral']``, ``fairgen.models.spectral``) take one
power iteration per update of their own, on the parameters before it, and are applied with
their weights divided by the estimate: D in its updates and in G's, G in its update and
for D's fakes; a normalised G's EMA gets one iteration per step on the updated EMA.

With ``Settings.privacy`` (``fairgen.privacy``), each discriminator update is DP-SGD: the
real-data part of its loss (the real term, gradient penalty and R1 of each example) has
per-example gradients clipped, summed over the Poisson batch's sampled rows (``mask``) and
noised; the fake term's per-example gradients are clipped too, without noise (DP-CGAN); a conditional net's fakes then take
uniformly drawn labels, in D's updates and in G's, so no real label reaches them.

Image GANs loop over the discriminator updates in Python, not ``lax.scan``: XLA:CPU leaves
the convolutions of a while-loop body on a slow path (measured: a full-width DCGAN step 16 s
instead of 0.4 s), and ``n_disc`` is small. Dense nets (``Adapter.scan_disc``) scan.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fairgen.models import spectral
from fairgen.objectives import base
from fairgen.objectives import losses
from fairgen.privacy import DpSettings
from fairgen.privacy import dpsgd

# (fake inputs, state['step'], constants) -> (loss, metrics): an extra generator loss term.
Penalty = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, dict[str, jax.Array]]]


class GeneratorPenalty(NamedTuple):
  """An extra term of the generator's loss and the frozen arrays it reads.

  Attributes:
    fn: ``(fake, step, constants) -> (loss, metrics)``.
    constants: arrays ``fn`` needs (e.g. a frozen classifier's parameters); the objective
      carries them as ``Objective.constants``, so they reach the jitted step as arguments.
  """

  fn: Penalty
  constants: Any = None


@dataclasses.dataclass(frozen=True)
class Adapter:
  """The data-shape-specific half of an adversarial objective.

  Attributes:
    real_inputs: ``batch -> [k * B, ...]`` real discriminator inputs.
    conditions: ``batch -> [k * B]`` int32 conditions (zeros for unconditional nets).
    generate: ``(gen_state, latents, conditions) -> (fake, updated collections)``: the
      generator in training mode (``gen_state`` holds ``params`` and e.g. batch stats).
    discriminate: ``(params, inputs, conditions, rng | None) -> [B]`` logits or critic
      values; ``rng`` is None where no randomness is allowed (the gradient penalty).
    d_keys: ``key -> {'latent', 'real', 'fake', 'mix'}`` keys of a discriminator update.
    g_keys: ``key -> {'latent', 'disc'}`` keys of the generator update.
    d_metrics: ``(real_out, fake_out, weight) -> metrics`` of a discriminator update.
    latent_dim: the generator's latent size.
    prefix: the discriminator's metric prefix (``d`` or ``critic``).
    scan_disc: run the discriminator updates in a ``lax.scan`` (one compiled body: right
      for small dense nets) instead of a Python loop (right for convolutions, see above).
  """

  real_inputs: Callable[[base.Batch], jax.Array]
  conditions: Callable[[base.Batch], jax.Array]
  generate: Callable[[Mapping[str, Any], jax.Array, jax.Array], tuple[jax.Array, Any]]
  discriminate: Callable[[Any, jax.Array, jax.Array, jax.Array | None], jax.Array]
  d_keys: Callable[[jax.Array], dict[str, jax.Array]]
  g_keys: Callable[[jax.Array], dict[str, jax.Array]]
  d_metrics: Callable[[jax.Array, jax.Array, jax.Array], dict[str, jax.Array]]
  latent_dim: int
  prefix: str = "d"
  scan_disc: bool = False


@dataclasses.dataclass(frozen=True)
class Settings:
  """The hyperparameters of the step (from the objective's config section)."""

  loss: losses.AdversarialLoss
  n_disc: int
  gp_weight: float = 0.0
  ema_decay: float = 0.0
  r1_gamma: float = 0.0
  r1_every: int = 1
  # DP-SGD for the discriminator (``fairgen.privacy``): its real-data terms (the real loss,
  # the gradient penalty, R1) are clipped per example and noised; the fake term sees no
  # data: clipped per example, not noised.
  privacy: DpSettings | None = None
  # The classes of a conditional net. With privacy, fakes take labels drawn uniformly (the
  # real batch's labels are private; the fake term and G's update must not see them).
  num_classes: int = 0


SPECTRAL_NETS = ("gen", "disc")  # What ``spectral_norm`` may name.


def init_nets(gen_vars: Mapping[str, Any], disc_params: Any,
              gen_tx: optax.GradientTransformation, disc_tx: optax.GradientTransformation,
              ema: bool, spectral_norm: tuple[str, ...] = (),
              rng: jax.Array | None = None, ema_stats: bool = False) -> base.State:
  """The state: step, gen {params, opt, other collections}, disc {params, opt}, [ema],
  [ema_stats: the EMA generator's own collections, e.g. batch_stats, where ``ema_stats``],
  and [spectral {net: power-iteration state}] for the nets in ``spectral_norm`` (a subset
  of ``SPECTRAL_NETS``; the EMA of a normalised generator gets its own, key 'ema').
  """
  gen = {"params": gen_vars["params"], "opt": gen_tx.init(gen_vars["params"]),
         **{k: v for k, v in gen_vars.items() if k != "params"}}
  state = {"step": jnp.zeros((), jnp.int32), "gen": gen,
           "disc": {"params": disc_params, "opt": disc_tx.init(disc_params)}}
  if ema:
    state["ema"] = jax.tree.map(jnp.copy, gen_vars["params"])
    collections = {k: v for k, v in gen_vars.items() if k != "params"}
    if ema_stats and collections:
      state["ema_stats"] = jax.tree.map(jnp.copy, collections)
  if spectral_norm:
    if rng is None:
      raise ValueError("Spectral normalisation needs an rng for its initial vectors.")
    nets = {"gen": gen["params"], "disc": disc_params}
    sn = {net: spectral.init_state(nets[net], jax.random.fold_in(rng, i))
          for i, net in enumerate(SPECTRAL_NETS) if net in spectral_norm}
    if "gen" in sn and ema:
      sn["ema"] = jax.tree.map(jnp.copy, sn["gen"])
    state["spectral"] = sn
  return state


def _normalized(params: Any, sn: spectral.State | None) -> Any:
  """``params`` spectrally normalised with ``sn``, or as they are without it."""
  return params if sn is None else spectral.normalize(params, sn)


def train_step(state: base.State, batch: base.Batch, rng: jax.Array, *, adapter: Adapter,
               settings: Settings, gen_tx: optax.GradientTransformation,
               disc_tx: optax.GradientTransformation, penalty: Penalty | None = None,
               constants: Any = None) -> tuple[base.State, base.Metrics]:
  """``n_disc`` discriminator updates, then one generator update (see the module docstring)."""
  rng = jax.random.fold_in(rng, state["step"])
  n_disc, loss = settings.n_disc, settings.loss
  gen = state["gen"]
  reals = losses.split_microbatches(adapter.real_inputs(batch), n_disc)
  conds = losses.split_microbatches(adapter.conditions(batch), n_disc)
  weights = (losses.split_microbatches(batch["weight"], n_disc) if "weight" in batch
             else jnp.ones(conds.shape, jnp.float32))
  b = reals.shape[1]
  p = adapter.prefix
  sn = dict(state.get("spectral", {}))
  gen_now = {**gen, "params": _normalized(gen["params"], sn.get("gen"))}

  public_labels = settings.privacy is not None and settings.num_classes > 0

  def fake_labels(key, y):
    """The fakes' labels: the real batch's, or uniform draws in a DP run."""
    if not public_labels:
      return y
    return jax.random.randint(jax.random.fold_in(key, 7), y.shape, 0, settings.num_classes,
                              y.dtype)

  def d_update(d_params, d_opt, d_sn, x_real, y, w, m, c, keys):
    z = jax.random.normal(keys["latent"], (b, adapter.latent_dim))
    y_fake = fake_labels(keys["latent"], y)
    fake = jax.lax.stop_gradient(adapter.generate(gen_now, z, y_fake)[0])
    mixed = (losses.interpolate(x_real, fake, keys["mix"]) if settings.gp_weight else None)
    if d_sn is not None:  # One power iteration per update (Miyato et al.'s Algorithm 1).
      d_sn = spectral.power_iteration(d_params, d_sn)

    def loss_fn(raw_params):
      params = _normalized(raw_params, d_sn)
      real_out = adapter.discriminate(params, x_real, y, keys.get("real"))
      fake_out = adapter.discriminate(params, fake, y, keys.get("fake"))
      real_term, fake_term = loss.d_loss(real_out, fake_out)
      total = losses.weighted_mean(real_term, w) + jnp.mean(fake_term)
      aux = adapter.d_metrics(real_out, fake_out, w)
      if settings.gp_weight:
        gp = jnp.mean(losses.gradient_penalty(
            lambda x: adapter.discriminate(params, x, y, None), mixed))
        total = total + settings.gp_weight * gp
        aux["gp"] = gp
      if settings.r1_gamma:
        # Lazy R1 (StyleGAN2): every r1_every steps, scaled by r1_every; skipped (not
        # computed) on the other steps.
        def r1_fn():
          return jnp.mean(losses.r1_penalty(
              lambda x: adapter.discriminate(params, x, y, None), x_real))

        r1 = r1_fn() if settings.r1_every == 1 else jax.lax.cond(
            state["step"] % settings.r1_every == 0, r1_fn, lambda: jnp.zeros((), jnp.float32))
        total = total + 0.5 * settings.r1_gamma * settings.r1_every * r1
        aux["r1"] = r1
      return total, aux

    if settings.privacy is None:
      (value, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(d_params)
    else:
      value, aux, grads = _private_d_grads(d_params, d_sn, x_real, fake, mixed, y, y_fake, w,
                                           m, c, keys)
    updates, d_opt = disc_tx.update(grads, d_opt, d_params)
    d_params = optax.apply_updates(d_params, updates)
    return d_params, d_opt, d_sn, {f"{p}_loss": value, **aux,
                                   f"{p}_grad_norm": base.global_norm(grads)}

  def _private_d_grads(d_params, d_sn, x_real, fake, mixed, y, y_fake, w, m, c, keys):
    """The DP-SGD gradient of D's loss: private real-data terms plus the exact fake term."""
    privacy = settings.privacy

    def example_loss(raw_params, ex, key):
      params = _normalized(raw_params, d_sn)
      one = lambda v: v[None]
      disc = lambda x: adapter.discriminate(params, x, one(ex["y"]), None)
      real_out = adapter.discriminate(params, one(ex["x"]), one(ex["y"]), key)
      real_term = loss.d_loss(real_out, real_out)[0][0]
      total, aux = real_term, {"real_out": real_out[0]}
      if settings.gp_weight:
        aux["gp"] = losses.gradient_penalty(disc, one(ex["mixed"]))[0]
        total = total + settings.gp_weight * aux["gp"]
      if settings.r1_gamma:
        r1 = losses.r1_penalty(disc, one(ex["x"]))[0]
        if settings.r1_every > 1:
          r1 = jnp.where(state["step"] % settings.r1_every == 0, r1, 0.0)
        total = total + 0.5 * settings.r1_gamma * settings.r1_every * r1
        aux["r1"] = r1
      aux["total"] = total
      return total, aux

    examples = {"x": x_real, "y": y}
    if mixed is not None:
      examples["mixed"] = mixed
    private, aux, stats = dpsgd.dp_gradient(example_loss, d_params, examples, keys["real"],
                                            privacy, m, w, c)

    def fake_example_loss(raw_params, ex, key):
      fake_out = adapter.discriminate(_normalized(raw_params, d_sn), ex["x"][None],
                                      ex["y"][None], key)
      term = loss.d_loss(fake_out, fake_out)[1][0]
      return term, {"fake_out": fake_out[0], "fake_term": term}

    # DP-CGAN (Torkzadehmahani et al. 2019): the fake term's per-example gradients are
    # clipped to C as well, so that the unclipped fake term cannot outweigh the clipped real
    # one (measured without it: D called everything fake within 400 steps). They see no
    # data, so they get no noise.
    n_fake = fake.shape[0]
    public, fake_aux, _ = dpsgd.private_gradient(
        fake_example_loss, d_params, {"x": fake, "y": y_fake}, keys["fake"],
        clip_norm=privacy.clip_norm, noise_multiplier=0.0, expected_batch_size=n_fake,
        mask=jnp.ones((n_fake,), jnp.float32), microbatch_size=privacy.microbatch_size,
        mesh=privacy.mesh, ghost=privacy.ghost_clipping)
    fake_out, fake_loss = fake_aux["fake_out"], jnp.mean(fake_aux["fake_term"])
    grads = jax.tree.map(jnp.add, private, public)
    # The losses are means over the sampled rows; the adapter's metrics (d_real) also
    # average the padding rows. All are computed from private data without noise, so they
    # stay in the workdir (see fairgen.privacy).
    value = dpsgd.masked_mean(aux["total"], m) + fake_loss
    metrics = {**adapter.d_metrics(aux["real_out"], fake_out, w), **stats,
               "batch_examples": jnp.sum(m)}
    for name in ("gp", "r1"):
      if name in aux:
        metrics[name] = dpsgd.masked_mean(aux[name], m)
    return value, metrics, grads

  masks = (losses.split_microbatches(batch["mask"], n_disc) if settings.privacy is not None
           else jnp.ones(conds.shape, jnp.float32))
  # White-box audit canaries (fairgen.audit) ride with the private real rows.
  canaries = (losses.split_microbatches(batch["canary"], n_disc) if "canary" in batch
              else jnp.full(conds.shape, -1, jnp.int32))
  d_params, d_opt, d_sn = state["disc"]["params"], state["disc"]["opt"], sn.get("disc")
  if adapter.scan_disc:
    def body(carry, inputs):
      x, y, w, m, c, i = inputs
      *carry, metrics = d_update(*carry, x, y, w, m, c,
                                 adapter.d_keys(jax.random.fold_in(rng, i)))
      return tuple(carry), metrics

    (d_params, d_opt, d_sn), stacked = jax.lax.scan(
        body, (d_params, d_opt, d_sn),
        (reals, conds, weights, masks, canaries, jnp.arange(n_disc)))
    d_metrics = jax.tree.map(lambda m: m[-1], stacked)
    blocks = [stacked["canary_block"]] if "canary_block" in stacked else []
  else:
    blocks = []
    for i in range(n_disc):
      d_params, d_opt, d_sn, d_metrics = d_update(
          d_params, d_opt, d_sn, reals[i], conds[i], weights[i], masks[i], canaries[i],
          adapter.d_keys(jax.random.fold_in(rng, i)))
      if "canary_block" in d_metrics:
        blocks.append(d_metrics["canary_block"][None])
  if blocks:  # An audit's canary coordinates: every D update's privatised values, summed.
    d_metrics["canary_block"] = jnp.sum(jnp.concatenate(blocks), axis=0)

  keys = adapter.g_keys(jax.random.fold_in(rng, n_disc))
  z = jax.random.normal(keys["latent"], (b, adapter.latent_dim))
  y_fake = fake_labels(keys["latent"], conds[-1])
  d_final = _normalized(d_params, d_sn)
  g_sn = sn.get("gen")
  if g_sn is not None:
    g_sn = spectral.power_iteration(gen["params"], g_sn)

  def g_loss_fn(g_params):
    fake, updates = adapter.generate({**gen, "params": _normalized(g_params, g_sn)}, z, y_fake)
    out = adapter.discriminate(d_final, fake, y_fake, keys.get("disc"))
    adv = jnp.mean(loss.g_loss(out))
    aux = {}
    total = adv
    if penalty is not None:
      extra, aux = penalty(fake, state["step"], constants)
      total = adv + extra
      aux = {"g_adv_loss": adv, **aux}
    return total, (updates, aux)

  (g_loss, (g_updates, g_aux)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(
      gen["params"])
  updates, g_opt = gen_tx.update(g_grads, gen["opt"], gen["params"])
  g_params = optax.apply_updates(gen["params"], updates)
  new_state = {
      "step": state["step"] + 1,
      "gen": {**gen, "params": g_params, "opt": g_opt, **g_updates},
      "disc": {"params": d_params, "opt": d_opt},
  }
  if "ema" in state:
    new_state["ema"] = base.ema_update(state["ema"], g_params, state["step"],
                                       settings.ema_decay)
  if sn:
    new_sn = {"disc": d_sn, "gen": g_sn}
    if "ema" in sn:
      new_sn["ema"] = spectral.power_iteration(new_state["ema"], sn["ema"])
    new_state["spectral"] = {k: v for k, v in new_sn.items() if k in sn}
  if "ema_stats" in state:
    # The EMA generator's own batch-norm statistics: it runs once in training mode on the
    # generator update's latents, so its running averages are of its own activations,
    # not of the raw generator's (which sampling with the EMA would otherwise use).
    ema_params = _normalized(new_state["ema"], new_state.get("spectral", {}).get("ema"))
    new_state["ema_stats"] = adapter.generate(
        {**state["ema_stats"], "params": ema_params}, z, y_fake)[1]
  metrics = {"g_loss": g_loss, "g_grad_norm": base.global_norm(g_grads), **d_metrics, **g_aux}
  return new_state, metrics
