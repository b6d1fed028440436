"""Image GANs: the adversarial step (``adversarial.py``) adapted to image batches.

A loss of ``losses.ADVERSARIAL_LOSSES`` (``objective.loss``: non-saturating by default,
Wasserstein, hinge or least squares), ``n_disc`` discriminator updates per generator update
(each on its own real micro-batch), optional regularisers of D (the gradient penalty at
interpolates, ``gp_weight``; R1 at reals, ``r1_gamma``, lazily every ``r1_every`` steps;
one-sided label smoothing, ``label_smoothing``), DiffAugment of every image D sees
(``diffaugment``), spectral normalisation of D and optionally G (``spectral_norm``,
``fairgen.models.spectral``), conditional nets (labels or groups from
``batch[condition_key]``), dropout in the discriminator, batch statistics in the generator,
and a generator EMA (``ema_decay``; 0 disables it, and samples then use the raw weights;
``ema_batch_stats`` gives it batch-norm statistics of its own; ``standing_stats`` samples
with the statistics the sampling weights give on a fixed batch of latents).
Importance weights multiply the discriminator's real-data term only (Choi et al. 2020).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from fairgen.config import ConfigError, require
from fairgen.models import GanModules
from fairgen.models import spectral
from fairgen.objectives import adversarial
from fairgen.objectives import base
from fairgen.objectives import diffaugment
from fairgen.objectives import losses
from fairgen.objectives.registry import OBJECTIVES, Entry

DEFAULTS = {
    "loss": "nonsaturating",  # A name in losses.ADVERSARIAL_LOSSES.
    "n_disc": 1,  # Discriminator updates per generator update.
    "ema_decay": 0.999,  # Generator EMA (0: none).
    "gp_weight": 0.0,  # Weight of the gradient penalty at real/fake interpolates.
    "r1_gamma": 0.0,  # R1 on reals: gamma / 2 * E|grad D(x)|^2 (0: off).
    "r1_every": 1,  # Lazy R1: applied every k steps, scaled by k (StyleGAN2 uses 16).
    "label_smoothing": 0.0,  # One-sided: D's target for reals is 1 - this (nonsaturating).
    "diffaugment": "",  # DiffAugment policy of D's inputs, e.g. "color,translation,cutout".
    "spectral_norm": "",  # Spectrally normalised nets: "", "disc" or "gen,disc".
    # The EMA generator keeps batch-norm statistics of its own (one extra forward pass per
    # step); False samples it with the raw generator's statistics.
    "ema_batch_stats": False,
    # Standing statistics (BigGAN): samples use batch-norm statistics that the sampling
    # weights themselves give on this many prior latents, instead of running averages
    # gathered during training (0: the running averages).
    "standing_stats": 0,
}
OPTIMIZERS = ("gen", "disc")


def check(cfg: Mapping[str, Any]) -> None:
  """Raises ConfigError for impossible GAN settings."""
  require(cfg["loss"] in losses.ADVERSARIAL_LOSSES,
          f"Unknown objective.loss={cfg['loss']!r}; valid: "
          f"{', '.join(sorted(losses.ADVERSARIAL_LOSSES))}.")
  require(cfg["n_disc"] >= 1, f"objective.n_disc must be >= 1, got {cfg['n_disc']}.")
  require(0 <= cfg["ema_decay"] < 1,
          f"objective.ema_decay must be in [0, 1), got {cfg['ema_decay']}.")
  require(cfg["gp_weight"] >= 0, f"objective.gp_weight must be >= 0, got {cfg['gp_weight']}.")
  require(cfg["r1_gamma"] >= 0, f"objective.r1_gamma must be >= 0, got {cfg['r1_gamma']}.")
  require(isinstance(cfg["r1_every"], int) and cfg["r1_every"] >= 1,
          f"objective.r1_every must be an integer >= 1, got {cfg['r1_every']!r}.")
  require(isinstance(cfg["ema_batch_stats"], bool),
          f"objective.ema_batch_stats must be True or False, got {cfg['ema_batch_stats']!r}.")
  require(not cfg["ema_batch_stats"] or cfg["ema_decay"] > 0,
          "objective.ema_batch_stats keeps statistics for the generator EMA; it needs "
          "objective.ema_decay > 0.")
  require(isinstance(cfg["standing_stats"], int) and cfg["standing_stats"] >= 0,
          f"objective.standing_stats must be an integer >= 0, got {cfg['standing_stats']!r}.")
  require(0 <= cfg["label_smoothing"] < 0.5,
          f"objective.label_smoothing must be in [0, 0.5), got {cfg['label_smoothing']}.")
  try:
    diffaugment.parse(cfg["diffaugment"])
  except (ValueError, AttributeError) as e:
    raise ConfigError(f"objective.diffaugment={cfg['diffaugment']!r}: {e}") from None
  nets = spectral_nets(cfg["spectral_norm"])
  require(nets is not None, f"objective.spectral_norm={cfg['spectral_norm']!r}: name nets "
          f"among {', '.join(adversarial.SPECTRAL_NETS)}, comma-separated ('' for none).")
  require(not cfg["label_smoothing"] or cfg["loss"] == "nonsaturating",
          f"objective.label_smoothing is defined for loss='nonsaturating' (a cross-entropy "
          f"target), not for loss={cfg['loss']!r}.")


def spectral_nets(value: Any) -> tuple[str, ...] | None:
  """The nets named by ``objective.spectral_norm`` ('gen,disc' -> ('gen', 'disc')), or None
  if it names anything else."""
  if not isinstance(value, str):
    return None
  names = tuple(n.strip() for n in value.split(",") if n.strip())
  ok = all(n in adversarial.SPECTRAL_NETS for n in names) and len(set(names)) == len(names)
  return names if ok else None


def adapter(nets: GanModules, augment: tuple[str, ...] = ()) -> adversarial.Adapter:
  """How image batches and the DCGAN-style nets plug into the adversarial step.

  ``augment``: a DiffAugment policy applied to every input of D that comes with a key (reals
  and fakes in D's update, fakes in G's); the regularisers (rng None) see raw inputs.
  """

  def generate(gen: Mapping[str, Any], z: jax.Array, y: jax.Array):
    collections = {k: v for k, v in gen.items() if k != "opt"}
    return nets.generator.apply(collections, z, y, train=True,
                                mutable=[k for k in collections if k != "params"])

  def discriminate(params, x, y, rng):
    if augment and rng is not None:  # fold_in: dropout keeps the keys it had without it.
      x = diffaugment.augment(x, jax.random.fold_in(rng, 1), augment)
    rngs = {"dropout": rng} if rng is not None else {}
    return nets.discriminator.apply({"params": params}, x, y, train=rng is not None, rngs=rngs)

  def d_keys(key):
    latent, real, fake = jax.random.split(key, 3)
    # Drawn apart from the split, so adding a penalty leaves the other keys unchanged.
    return {"latent": latent, "real": real, "fake": fake, "mix": jax.random.fold_in(key, 3)}

  def g_keys(key):
    latent, disc = jax.random.split(key)
    return {"latent": latent, "disc": disc}

  def d_metrics(real_logits, fake_logits, weight):
    del weight
    return {"d_real": jnp.mean(jax.nn.sigmoid(real_logits)),
            "d_fake": jnp.mean(jax.nn.sigmoid(fake_logits))}

  return adversarial.Adapter(
      real_inputs=lambda batch: batch["image"],
      conditions=lambda batch: batch[nets.condition_key] if nets.num_classes else batch["label"],
      generate=generate, discriminate=discriminate, d_keys=d_keys, g_keys=g_keys,
      d_metrics=d_metrics, latent_dim=nets.latent_dim, prefix="d")


def init(nets: GanModules, gen_tx: optax.GradientTransformation,
         disc_tx: optax.GradientTransformation, image_shape: tuple[int, int, int], ema: bool,
         rng: jax.Array, *, spectral_norm: tuple[str, ...] = (),
         ema_batch_stats: bool = False) -> base.State:
  """The initial state: step, gen {params, batch_stats, opt}, disc {params, opt}, ema,
  the EMA's own batch statistics where ``ema_batch_stats``, and the spectral-norm state of
  the nets in ``spectral_norm``."""
  g_rng, d_rng = jax.random.split(rng)
  z = jnp.zeros((1, nets.latent_dim))
  labels = jnp.zeros((1,), jnp.int32)
  g_vars = nets.generator.init(g_rng, z, labels, train=False)
  d_vars = nets.discriminator.init(d_rng, jnp.zeros((1,) + image_shape), labels, train=False)
  # fold_in leaves the two nets' keys as they were without spectral norm.
  return adversarial.init_nets(g_vars, d_vars["params"], gen_tx, disc_tx, ema, spectral_norm,
                               jax.random.fold_in(rng, 2), ema_batch_stats)


def standing_statistics(nets: GanModules, variables: Mapping[str, Any],
                        num: int) -> dict[str, Any]:
  """``variables`` with batch-norm statistics measured on ``num`` prior latents with these
  very weights (BigGAN's "standing statistics"), in place of the running averages.

  The running averages follow the raw generator over the last ~1/(1 - momentum) steps, so
  they fit neither the EMA weights nor, late in a fast run, the final raw weights; samples
  then come out blurred or malformed. One training-mode pass with momentum 0 stores the
  statistics of a fixed batch of ``num`` latents (and classes in turn, if conditional).
  """
  z = jax.random.normal(jax.random.key(0), (num, nets.latent_dim), jnp.float32)
  y = (jnp.arange(num) % max(nets.num_classes, 1)).astype(jnp.int32)
  _, stats = nets.generator.clone(bn_momentum=0.0).apply(
      dict(variables), z, y, train=True, mutable=["batch_stats"])
  return {**variables, **stats}


def decode(state: base.State, z: jax.Array, labels: jax.Array, *,
           nets: GanModules, standing_stats: int = 0) -> jax.Array:
  """Generator images for latents ``z``: EMA weights where kept (spectrally normalised with
  their own vectors where G is), with BN running statistics (the EMA's own where kept), or
  standing statistics of ``standing_stats`` latents."""
  variables = {k: v for k, v in state["gen"].items() if k != "opt"}
  sn = state.get("spectral", {})
  if "ema" in state:
    variables["params"] = state["ema"]
    variables.update(state.get("ema_stats", {}))
  sn_key = "ema" if "ema" in state else "gen"
  if sn_key in sn:
    variables["params"] = spectral.normalize(variables["params"], sn[sn_key])
  if standing_stats:
    variables = standing_statistics(nets, variables, standing_stats)
  return nets.generator.apply(variables, z, labels, train=False)


def member_score(state: base.State, images: jax.Array, labels: jax.Array, *,
                 nets: GanModules) -> jax.Array:
  """The discriminator's logit (critic value) of real ``images``: the membership attack of
  GAN audits (a member is what D was trained to call real)."""
  params = state["disc"]["params"]
  sn = state.get("spectral", {}).get("disc")
  if sn is not None:
    params = spectral.normalize(params, sn)
  return nets.discriminator.apply({"params": params}, images, labels, train=False)


def build(nets: GanModules, spec: Any, objective: Mapping[str, Any],
          optim: Mapping[str, Any], penalty: adversarial.GeneratorPenalty | None = None,
          privacy: base.PrivateGradient | None = None) -> base.Objective:
  """The GAN objective from the objective (keys: ``DEFAULTS``) and optim sections.

  ``penalty``: an optional term of the generator's loss (the fairness penalty of
  ``fairgen.fairness.penalty``) with the frozen arrays it reads. ``privacy``: train the
  discriminator, the only network that sees data, with DP-SGD.
  """
  if not isinstance(nets, GanModules):
    raise ConfigError("The 'gan' objective needs an image GAN model (e.g. model.name='dcgan').")
  if privacy is not None:
    privacy.check_variables(jax.eval_shape(
        lambda: nets.discriminator.init(jax.random.key(0),
                                        jnp.zeros((1,) + tuple(spec.image_shape)),
                                        jnp.zeros((1,), jnp.int32), train=False)),
        "discriminator")
  if objective["standing_stats"] and not hasattr(nets.generator, "bn_momentum"):
    raise ConfigError("objective.standing_stats needs a generator with batch norm "
                      "(a bn_momentum attribute); this one has none.")
  gen_tx = base.make_optimizer(optim["gen"])
  disc_tx = base.make_optimizer(optim["disc"])
  settings = adversarial.Settings(
      loss=losses.adversarial_loss(objective["loss"], float(objective["label_smoothing"])),
      n_disc=int(objective["n_disc"]), gp_weight=float(objective["gp_weight"]),
      ema_decay=float(objective["ema_decay"]), r1_gamma=float(objective["r1_gamma"]),
      r1_every=int(objective["r1_every"]), privacy=privacy, num_classes=nets.num_classes)
  policy = diffaugment.parse(objective["diffaugment"])
  return base.Objective(
      init=functools.partial(init, nets, gen_tx, disc_tx, tuple(spec.image_shape),
                             settings.ema_decay > 0,
                             spectral_norm=spectral_nets(objective["spectral_norm"]),
                             ema_batch_stats=bool(objective["ema_batch_stats"])),
      train_step=functools.partial(adversarial.train_step, adapter=adapter(nets, policy),
                                   settings=settings, gen_tx=gen_tx, disc_tx=disc_tx,
                                   penalty=None if penalty is None else penalty.fn),
      decode=functools.partial(decode, nets=nets,
                               standing_stats=int(objective["standing_stats"])),
      latent_dim=nets.latent_dim,
      examples_per_step=settings.n_disc,
      num_classes=nets.num_classes,
      condition_key=nets.condition_key,
      constants=None if penalty is None else penalty.constants,
      member_score=functools.partial(member_score, nets=nets))


OBJECTIVES.register("gan")(Entry(build, DEFAULTS, check, OPTIMIZERS,
                                 ("conditional", "generator_penalty"), private=True,
                                 examples_per_step=lambda cfg: int(cfg["n_disc"])))
