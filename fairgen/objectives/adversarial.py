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

With ``Settings.privacy`` (the ``base.PrivateGradient`` the composition root hands the
objective), each discriminator update is DP-SGD: the real-data part of its loss (the real
term, gradient penalty and R1 of each example) has per-example gradients clipped, summed
over the Poisson batch's sampled rows (``mask``) and noised; the fake term's per-example
gradients are clipped too, without noise (DP-CGAN); a conditional net's fakes then take
uniformly drawn labels, in D's updates and in G's, so no real label reaches them.

The step reads top to bottom as its named pieces: ``disc_batch`` (the micro-batches),
``disc_updates`` (``n_disc`` of ``disc_update``, whose gradient is ``disc_loss``'s or, with
privacy, ``private_disc_grads``'), ``gen_update`` and ``averages`` (the EMA, spectral states
and the EMA's own statistics); ``tests/test_adversarial_steps.py`` checks each.

Image GANs loop over the discriminator updates in Python, not ``lax.scan``: XLA:CPU leaves
the convolutions of a while-loop body on a slow path (measured: a full-width DCGAN step 16 s
instead of 0.4 s), and ``n_disc`` is small. Dense nets (``Adapter.scan_disc``) scan.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fairgen.models import spectral
from fairgen.objectives import base
from fairgen.objectives import losses

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
  privacy: base.PrivateGradient | None = None
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


class DiscBatch(NamedTuple):
  """A step's batch cut into ``n_disc`` real micro-batches (leading axis: the update)."""

  reals: jax.Array
  conds: jax.Array
  weights: jax.Array
  masks: jax.Array  # Sampled rows of a Poisson batch (all 1 without privacy).
  canaries: jax.Array  # White-box audit canaries (fairgen.audit; -1: none).


def disc_batch(batch: base.Batch, adapter: Adapter, settings: Settings) -> DiscBatch:
  """The real inputs, conditions, weights, masks and canaries of each D update."""
  n_disc = settings.n_disc
  reals = losses.split_microbatches(adapter.real_inputs(batch), n_disc)
  conds = losses.split_microbatches(adapter.conditions(batch), n_disc)
  weights = (losses.split_microbatches(batch["weight"], n_disc) if "weight" in batch
             else jnp.ones(conds.shape, jnp.float32))
  masks = (losses.split_microbatches(batch["mask"], n_disc) if settings.privacy is not None
           else jnp.ones(conds.shape, jnp.float32))
  # White-box audit canaries (fairgen.audit) ride with the private real rows.
  canaries = (losses.split_microbatches(batch["canary"], n_disc) if "canary" in batch
              else jnp.full(conds.shape, -1, jnp.int32))
  return DiscBatch(reals, conds, weights, masks, canaries)


def fake_labels(settings: Settings, key: jax.Array, y: jax.Array) -> jax.Array:
  """The fakes' labels: the real batch's, or uniform draws in a DP run of a conditional net
  (the real labels are private)."""
  if settings.privacy is None or settings.num_classes == 0:
    return y
  return jax.random.randint(jax.random.fold_in(key, 7), y.shape, 0, settings.num_classes,
                            y.dtype)


def r1_term(settings: Settings, step: jax.Array, r1_fn: Callable[[], jax.Array]
            ) -> jax.Array:
  """R1 (StyleGAN2's lazy form): computed every ``r1_every`` steps, else 0 (not computed)."""
  if settings.r1_every == 1:
    return r1_fn()
  return jax.lax.cond(step % settings.r1_every == 0, r1_fn,
                      lambda: jnp.zeros((), jnp.float32))


def disc_loss(raw_params: Any, d_sn: spectral.State | None, x_real: jax.Array,
              fake: jax.Array, mixed: jax.Array | None, y: jax.Array, w: jax.Array,
              keys: Mapping[str, jax.Array], step: jax.Array, *, adapter: Adapter,
              settings: Settings) -> tuple[jax.Array, base.Metrics]:
  """D's loss on one micro-batch: the weighted real term, the fake term, the gradient
  penalty at ``mixed`` and R1 at the reals (each when its weight is set)."""
  params = _normalized(raw_params, d_sn)
  disc = lambda x: adapter.discriminate(params, x, y, None)  # noqa: E731 (penalties)
  real_out = adapter.discriminate(params, x_real, y, keys.get("real"))
  fake_out = adapter.discriminate(params, fake, y, keys.get("fake"))
  real_term, fake_term = settings.loss.d_loss(real_out, fake_out)
  total = losses.weighted_mean(real_term, w) + jnp.mean(fake_term)
  aux = adapter.d_metrics(real_out, fake_out, w)
  if settings.gp_weight:
    gp = jnp.mean(losses.gradient_penalty(disc, mixed))
    total = total + settings.gp_weight * gp
    aux["gp"] = gp
  if settings.r1_gamma:
    r1 = r1_term(settings, step, lambda: jnp.mean(losses.r1_penalty(disc, x_real)))
    total = total + 0.5 * settings.r1_gamma * settings.r1_every * r1
    aux["r1"] = r1
  return total, aux


def private_disc_grads(d_params: Any, d_sn: spectral.State | None, x_real: jax.Array,
                       fake: jax.Array, mixed: jax.Array | None, y: jax.Array,
                       y_fake: jax.Array, w: jax.Array, m: jax.Array, c: jax.Array,
                       keys: Mapping[str, jax.Array], step: jax.Array, *, adapter: Adapter,
                       settings: Settings) -> tuple[jax.Array, base.Metrics, Any]:
  """The DP-SGD gradient of D's loss: the private real-data terms (real term, gradient
  penalty, R1 of each example) plus the fake term, clipped per example without noise."""
  private = settings.privacy

  def example_loss(raw_params, ex, key):
    params = _normalized(raw_params, d_sn)
    one = lambda v: v[None]  # noqa: E731
    disc = lambda x: adapter.discriminate(params, x, one(ex["y"]), None)  # noqa: E731
    real_out = adapter.discriminate(params, one(ex["x"]), one(ex["y"]), key)
    total = settings.loss.d_loss(real_out, real_out)[0][0]
    aux = {"real_out": real_out[0]}
    if settings.gp_weight:
      aux["gp"] = losses.gradient_penalty(disc, one(ex["mixed"]))[0]
      total = total + settings.gp_weight * aux["gp"]
    if settings.r1_gamma:
      r1 = losses.r1_penalty(disc, one(ex["x"]))[0]
      if settings.r1_every > 1:
        r1 = jnp.where(step % settings.r1_every == 0, r1, 0.0)
      total = total + 0.5 * settings.r1_gamma * settings.r1_every * r1
      aux["r1"] = r1
    aux["total"] = total
    return total, aux

  def fake_example_loss(raw_params, ex, key):
    fake_out = adapter.discriminate(_normalized(raw_params, d_sn), ex["x"][None],
                                    ex["y"][None], key)
    term = settings.loss.d_loss(fake_out, fake_out)[1][0]
    return term, {"fake_out": fake_out[0], "fake_term": term}

  examples = {"x": x_real, "y": y}
  if mixed is not None:
    examples["mixed"] = mixed
  grads, aux, stats = private(example_loss, d_params, examples, keys["real"], m, w, c)
  # DP-CGAN (Torkzadehmahani et al. 2019): the fake term's per-example gradients are
  # clipped to C as well, so that the unclipped fake term cannot outweigh the clipped real
  # one (measured without it: D called everything fake within 400 steps). They see no
  # data, so they get no noise.
  public, fake_aux = private.clipped(fake_example_loss, d_params, {"x": fake, "y": y_fake},
                                     keys["fake"])
  fake_out, fake_loss = fake_aux["fake_out"], jnp.mean(fake_aux["fake_term"])
  grads = jax.tree.map(jnp.add, grads, public)
  # The losses are means over the sampled rows; the adapter's metrics (d_real) also
  # average the padding rows. All are computed from private data without noise, so they
  # stay in the workdir (see fairgen.privacy).
  value = private.mean(aux["total"], m) + fake_loss
  metrics = {**adapter.d_metrics(aux["real_out"], fake_out, w), **stats,
             "batch_examples": jnp.sum(m)}
  for name in ("gp", "r1"):
    if name in aux:
      metrics[name] = private.mean(aux[name], m)
  return value, metrics, grads


class DiscState(NamedTuple):
  """What D's updates carry: its parameters, optimizer state and power-iteration state."""

  params: Any
  opt: Any
  sn: spectral.State | None


def disc_update(disc: DiscState, x_real: jax.Array, y: jax.Array, w: jax.Array,
                m: jax.Array, c: jax.Array, keys: Mapping[str, jax.Array], gen_now: Any,
                step: jax.Array, *, adapter: Adapter, settings: Settings,
                disc_tx: optax.GradientTransformation
                ) -> tuple[DiscState, base.Metrics]:
  """One discriminator update on one real micro-batch against fresh fakes of ``gen_now``
  (the generator as it stands, spectrally normalised if it is)."""
  b = x_real.shape[0]
  z = jax.random.normal(keys["latent"], (b, adapter.latent_dim))
  y_fake = fake_labels(settings, keys["latent"], y)
  fake = jax.lax.stop_gradient(adapter.generate(gen_now, z, y_fake)[0])
  mixed = (losses.interpolate(x_real, fake, keys["mix"]) if settings.gp_weight else None)
  d_sn = disc.sn
  if d_sn is not None:  # One power iteration per update (Miyato et al.'s Algorithm 1).
    d_sn = spectral.power_iteration(disc.params, d_sn)
  if settings.privacy is None:
    (value, aux), grads = jax.value_and_grad(disc_loss, has_aux=True)(
        disc.params, d_sn, x_real, fake, mixed, y, w, keys, step, adapter=adapter,
        settings=settings)
  else:
    value, aux, grads = private_disc_grads(disc.params, d_sn, x_real, fake, mixed, y, y_fake,
                                           w, m, c, keys, step, adapter=adapter,
                                           settings=settings)
  updates, d_opt = disc_tx.update(grads, disc.opt, disc.params)
  d_params = optax.apply_updates(disc.params, updates)
  p = adapter.prefix
  return DiscState(d_params, d_opt, d_sn), {f"{p}_loss": value, **aux,
                                            f"{p}_grad_norm": base.global_norm(grads)}


def disc_updates(disc: DiscState, parts: DiscBatch, rng: jax.Array, gen_now: Any,
                 step: jax.Array, *, adapter: Adapter, settings: Settings,
                 disc_tx: optax.GradientTransformation) -> tuple[DiscState, base.Metrics]:
  """The ``n_disc`` discriminator updates, update ``i`` with ``adapter.d_keys(fold_in(rng,
  i))``: a Python loop, or a ``lax.scan`` for ``adapter.scan_disc``; the last update's
  metrics, with an audit's canary block summed over all of them."""
  update = functools.partial(disc_update, gen_now=gen_now, step=step, adapter=adapter,
                             settings=settings, disc_tx=disc_tx)
  if adapter.scan_disc:
    def body(carry, inputs):
      x, y, w, m, c, i = inputs
      return update(DiscState(*carry), x, y, w, m, c, adapter.d_keys(jax.random.fold_in(rng, i)))

    disc, stacked = jax.lax.scan(body, disc, (*parts, jnp.arange(settings.n_disc)))
    metrics = jax.tree.map(lambda m: m[-1], stacked)
    blocks = [stacked["canary_block"]] if "canary_block" in stacked else []
  else:
    blocks = []
    for i in range(settings.n_disc):
      disc, metrics = update(disc, *(part[i] for part in parts),
                             adapter.d_keys(jax.random.fold_in(rng, i)))
      if "canary_block" in metrics:
        blocks.append(metrics["canary_block"][None])
  if blocks:  # An audit's canary coordinates: every D update's privatised values, summed.
    metrics["canary_block"] = jnp.sum(jnp.concatenate(blocks), axis=0)
  return DiscState(*disc), metrics


def gen_update(gen: Mapping[str, Any], g_sn: spectral.State | None, d_final: Any,
               z: jax.Array, y_fake: jax.Array, keys: Mapping[str, jax.Array],
               step: jax.Array, *, adapter: Adapter, settings: Settings,
               gen_tx: optax.GradientTransformation, penalty: Penalty | None, constants: Any
               ) -> tuple[dict[str, Any], base.Metrics]:
  """One generator update against the updated (normalised) discriminator ``d_final``: the
  adversarial term plus the optional ``penalty``; returns G's new state and metrics."""

  def g_loss_fn(g_params):
    fake, updates = adapter.generate({**gen, "params": _normalized(g_params, g_sn)}, z, y_fake)
    out = adapter.discriminate(d_final, fake, y_fake, keys.get("disc"))
    adv = jnp.mean(settings.loss.g_loss(out))
    aux = {}
    total = adv
    if penalty is not None:
      extra, aux = penalty(fake, step, constants)
      total = adv + extra
      aux = {"g_adv_loss": adv, **aux}
    return total, (updates, aux)

  (g_loss, (g_updates, g_aux)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(
      gen["params"])
  updates, g_opt = gen_tx.update(g_grads, gen["opt"], gen["params"])
  g_params = optax.apply_updates(gen["params"], updates)
  metrics = {"g_loss": g_loss, "g_grad_norm": base.global_norm(g_grads), **g_aux}
  return {**gen, "params": g_params, "opt": g_opt, **g_updates}, metrics


def averages(state: base.State, new_state: base.State, new_sn: dict[str, Any],
             z: jax.Array, y_fake: jax.Array, *, adapter: Adapter, settings: Settings
             ) -> base.State:
  """``new_state`` with what follows the updates: the generator's EMA, the spectral states
  (one power iteration for a normalised EMA), and the EMA generator's own batch-norm
  statistics."""
  sn = state.get("spectral", {})
  if "ema" in state:
    new_state["ema"] = base.ema_update(state["ema"], new_state["gen"]["params"],
                                       state["step"], settings.ema_decay)
  if sn:
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
  return new_state


def train_step(state: base.State, batch: base.Batch, rng: jax.Array, *, adapter: Adapter,
               settings: Settings, gen_tx: optax.GradientTransformation,
               disc_tx: optax.GradientTransformation, penalty: Penalty | None = None,
               constants: Any = None) -> tuple[base.State, base.Metrics]:
  """``n_disc`` discriminator updates, then one generator update, then the averages (see
  the module docstring)."""
  rng = jax.random.fold_in(rng, state["step"])
  gen, sn = state["gen"], dict(state.get("spectral", {}))
  parts = disc_batch(batch, adapter, settings)
  gen_now = {**gen, "params": _normalized(gen["params"], sn.get("gen"))}
  disc = DiscState(state["disc"]["params"], state["disc"]["opt"], sn.get("disc"))
  disc, d_metrics = disc_updates(disc, parts, rng, gen_now, state["step"], adapter=adapter,
                                 settings=settings, disc_tx=disc_tx)

  keys = adapter.g_keys(jax.random.fold_in(rng, settings.n_disc))
  z = jax.random.normal(keys["latent"], (parts.reals.shape[1], adapter.latent_dim))
  y_fake = fake_labels(settings, keys["latent"], parts.conds[-1])
  d_final = _normalized(disc.params, disc.sn)
  g_sn = sn.get("gen")
  if g_sn is not None:
    g_sn = spectral.power_iteration(gen["params"], g_sn)
  new_gen, g_metrics = gen_update(gen, g_sn, d_final, z, y_fake, keys, state["step"],
                                  adapter=adapter, settings=settings, gen_tx=gen_tx,
                                  penalty=penalty, constants=constants)
  new_state = {"step": state["step"] + 1, "gen": new_gen,
               "disc": {"params": disc.params, "opt": disc.opt}}
  new_state = averages(state, new_state, {"disc": disc.sn, "gen": g_sn}, z, y_fake,
                       adapter=adapter, settings=settings)
  metrics = {"g_loss": g_metrics.pop("g_loss"), "g_grad_norm": g_metrics.pop("g_grad_norm"),
             **d_metrics, **g_metrics}
  return new_state, metrics
