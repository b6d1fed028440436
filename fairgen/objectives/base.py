"""The contract every objective fulfils, and the pieces objectives share.

An objective bundles pure functions over an explicit state pytree:
- ``init(rng) -> state``: the initial state (``state['step']`` is an int32 scalar);
- ``train_step(state, batch, rng) -> (state, metrics)``: one update. ``rng`` is the run's
  base key; the step folds in ``state['step']`` itself, so the randomness of every step is
  fixed by (seed, step) and resumption is exact;
- ``decode(state, latents, labels) -> images``: samples in [-1, 1] from given latents (EMA
  weights where the objective keeps them); ``generate`` below draws the latents.

Losses are computed per example and reduced at the end by ``losses.weighted_mean``, so
importance weights (``batch['weight']``) enter as one multiplication.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
import optax

from fairgen.config import ConfigError, require

State = dict[str, Any]
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
# (params, one example (a pytree of arrays without the batch axis), key) -> (loss, aux).
ExampleLoss = Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]


class PrivateGradient(Protocol):
  """How privacy enters a step: the one call every private objective makes.

  The composition root hands a private objective one (``fairgen.privacy.DpGradient``, bound
  to the run's mechanism); the objective passes its per-example loss and never sees the
  mechanism's parameters.
  """

  def __call__(self, loss_fn: ExampleLoss, params: Any, examples: Any, key: jax.Array,
               mask: jax.Array, scale: jax.Array | None = None,
               canary: jax.Array | None = None) -> tuple[Any, Any, dict[str, jax.Array]]:
    """``(gradient, per-example aux, stats)``: per-example gradients clipped, summed over the
    sampled rows (``mask``), weighted by ``scale``, noised, and divided by the expected
    batch size."""

  def clipped(self, loss_fn: ExampleLoss, params: Any, examples: Any, key: jax.Array
              ) -> tuple[Any, Any]:
    """``(mean of the clipped per-example gradients, aux)`` of rows that hold no data."""

  def mean(self, values: jax.Array, mask: jax.Array) -> jax.Array:
    """The mean of ``values`` over the sampled rows."""

  def check_variables(self, variables: Mapping[str, Any], what: str) -> None:
    """Raises ConfigError for a network whose batch statistics mix examples."""
OPTIMIZER_NAMES = ("adam", "adamw")


@dataclasses.dataclass(frozen=True)
class Objective:
  """Pure functions of one training objective (see the module docstring).

  Attributes:
    init: ``rng -> state``.
    train_step: ``(state, batch, rng) -> (state, metrics)``.
    decode: ``(state, latents, labels) -> samples`` (images, or encoded table rows);
      ``labels`` is an int32 vector with one entry per latent (ignored by unconditional
      models). None for objectives that train no generator (e.g. fair classifiers).
    latent_dim: size of the latent vectors ``decode`` takes.
    examples_per_step: how many examples one step consumes per unit of ``train.batch_size``
      (a GAN with ``n_disc`` discriminator steps takes ``n_disc`` real batches).
    num_classes: > 0 when ``generate`` uses its labels.
    condition_key: the batch column a conditional model's labels come from (``label`` for
      classes, ``attr`` for sensitive-attribute groups).
    predict: ``(state, batch) -> P(label = 1)`` for objectives that train a classifier
      (fair classifiers, VFAE's label head); None otherwise.
    label_probs: the distribution ``generate`` draws labels from for conditional models
      (None: every class equally often); e.g. the target group distribution.
    member_score: ``(state, images, labels) -> [B]`` a membership-inference attack's score
      of real examples (higher: more likely a training member), e.g. the discriminator's
      logit or the VAE's ELBO; None where the objective has none.
    nll: ``(state, batch, keys, num_samples) -> terms``: per-example negative
      log-likelihood of real data for likelihood models other than VAEs (whose IWAE bound
      ``fairgen.metrics.likelihood`` computes from the model): ``terms['nll']`` in nats per
      example (exact, or an upper bound), beside other per-example terms worth averaging;
      ``keys`` holds one PRNG key per example, ``num_samples`` is the evaluation's budget
      of Monte Carlo samples per example (``eval.iwae_k``) where the bound is estimated.
      None where the objective has no likelihood.
    trajectory: ``(state, latents, labels) -> [B, K, ...]``: an iterative sampler's
      intermediate states, the latents first and the samples last (``--mode=sample``
      writes them as ``trajectory.png``); None for one-shot generators.
    constants: frozen arrays the step needs (e.g. a penalty classifier's parameters), or
      None. When set, ``train_step`` takes them as its ``constants`` keyword argument, and
      the loop passes them to the jitted step as arguments (never as compile-time
      constants).
  """

  init: Callable[[jax.Array], State]
  train_step: Callable[[State, Batch, jax.Array], tuple[State, Metrics]]
  decode: Callable[[State, jax.Array, jax.Array], jax.Array] | None
  latent_dim: int
  examples_per_step: int = 1
  num_classes: int = 0
  condition_key: str = "label"
  predict: Callable[[State, Batch], jax.Array] | None = None
  label_probs: tuple[float, ...] | None = None
  constants: Any = None
  member_score: Callable[[State, jax.Array, jax.Array], jax.Array] | None = None
  nll: Callable[[State, Batch, jax.Array, int], dict[str, jax.Array]] | None = None
  trajectory: Callable[[State, jax.Array, jax.Array], jax.Array] | None = None

  def sample_latents(self, rng: jax.Array, num: int, truncation: float = 0.0) -> jax.Array:
    """Prior latents N(0, I); ``truncation`` > 0 samples the normal truncated to [-t, t]."""
    if truncation > 0:
      return jax.random.truncated_normal(rng, -truncation, truncation, (num, self.latent_dim))
    return jax.random.normal(rng, (num, self.latent_dim))

  def generate(self, state: State, rng: jax.Array, labels: jax.Array,
               truncation: float = 0.0) -> jax.Array:
    """``len(labels)`` samples from latents drawn with ``rng``."""
    return self.decode(state, self.sample_latents(rng, labels.shape[0], truncation), labels)


def make_optimizer(cfg: Mapping[str, Any]) -> optax.GradientTransformation:
  """Adam (or AdamW) from an optimizer config section.

  Keys: name, lr, b1, b2, weight_decay, and optionally decay_rate/decay_steps for a
  staircase exponential learning-rate decay (AIF360's schedule), or linear_decay_steps for
  a linear decay to 0 over that many updates of this optimizer (SNGAN's schedule);
  warmup_steps for a linear warm-up from 0 (DDPM's 5,000), and clip_norm to clip the
  gradient's global norm first (DDPM's 1.0). ``flatten=True`` updates all parameters as
  one flat vector (``optax.flatten``: one fused update instead of one per array; the same
  update to float32 rounding, with the optimizer state in that layout).
  """
  name = cfg.get("name", "adam")
  lr = cfg["lr"]
  if cfg.get("linear_decay_steps"):
    lr = optax.linear_schedule(lr, 0.0, cfg["linear_decay_steps"])
  elif cfg.get("decay_steps"):
    lr = optax.exponential_decay(lr, cfg["decay_steps"], cfg.get("decay_rate", 0.96),
                                 staircase=True)
  if cfg.get("warmup_steps"):
    peak = lr
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg["lr"], cfg["warmup_steps"]),
         peak if callable(peak) else optax.constant_schedule(peak)], [cfg["warmup_steps"]])
  if name == "adam":
    tx = optax.adam(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999))
  elif name == "adamw":
    tx = optax.adamw(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                     weight_decay=cfg.get("weight_decay", 1e-4))
  else:
    raise ConfigError(f"Unknown optimizer {name!r}; valid names: "
                      f"{', '.join(OPTIMIZER_NAMES)}.")
  if cfg.get("clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(cfg["clip_norm"]), tx)
  if cfg.get("flatten"):
    tx = optax.flatten(tx)
  return tx


def check_optimizer(cfg: Mapping[str, Any], path: str) -> None:
  """Raises ConfigError for an impossible optimizer section at ``path`` (e.g. optim.gen)."""
  require(hasattr(cfg, "get") and "lr" in cfg,
          f"{path} must be an optimizer section with at least 'lr'.")
  require(cfg.get("name", "adam") in OPTIMIZER_NAMES,
          f"Unknown {path}.name={cfg.get('name')!r}; valid names: {', '.join(OPTIMIZER_NAMES)}.")
  require(cfg["lr"] is not None and cfg["lr"] > 0, f"{path}.lr must be > 0, got {cfg['lr']}.")
  for b in ("b1", "b2"):
    if b in cfg:
      require(0 <= cfg[b] < 1, f"{path}.{b} must be in [0, 1), got {cfg[b]}.")
  for key in ("weight_decay", "decay_steps", "linear_decay_steps", "warmup_steps",
              "clip_norm"):
    if cfg.get(key) is not None:
      require(cfg[key] >= 0, f"{path}.{key} must be >= 0, got {cfg[key]}.")
  require(not (cfg.get("decay_steps") and cfg.get("linear_decay_steps")),
          f"{path}: decay_steps (exponential) and linear_decay_steps are two schedules; "
          f"set one.")
  if cfg.get("decay_rate") is not None:
    require(0 < cfg["decay_rate"] <= 1,
            f"{path}.decay_rate must be in (0, 1], got {cfg['decay_rate']}.")
  require(isinstance(cfg.get("flatten", False), bool),
          f"{path}.flatten must be True or False, got {cfg.get('flatten')!r}.")


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
  """Exponential moving average with warm-up: ``min(decay, (1 + t) / (10 + t))``."""
  t = step.astype(jnp.float32)
  d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def global_norm(tree: Any) -> jax.Array:
  """The L2 norm of all leaves of a gradient tree."""
  return optax.tree.norm(tree)
