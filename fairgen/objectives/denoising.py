"""What the denoising families (DDPM, EDM, flow matching) share: the state, the train step
around a per-example loss, classifier-free guidance, per-sample sampler noise, and the
networks they accept.

A denoising network is a Linen module ``(x, t, labels, train) -> [B, H, W, C]`` with the
attributes ``num_classes`` (> 0: conditional; label ``num_classes`` means "no label") and
``condition_key``: the U-Net (``fairgen.models.unet``), DDPM++ (``fairgen.models.ddpmpp``)
and the DiT (``fairgen.models.dit``).
``t`` is the family's noise input: DDPM's integer timestep, EDM's ``c_noise(sigma)``, flow
matching's ``1000 t``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairgen.config import ConfigError, require
from fairgen.models.ddpmpp import DDPMpp
from fairgen.models.dit import DiT
from fairgen.models.unet import UNet
from fairgen.objectives import base
from fairgen.objectives import losses

NETWORKS = (UNet, DDPMpp, DiT)
# (params, clean images, labels or None, key) -> the per-example loss, [B].
ImageLoss = Callable[[Any, jax.Array, jax.Array | None, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class GroupGuidance:
  """Sampling-time guidance toward groups (``fair.method='guidance'``).

  Attributes:
    log_prob: ``(variables, images) -> [B, num_groups]``: a frozen attribute classifier's
      log-probabilities of the groups.
    variables: its parameters (constants of the sampling program).
    num_groups: how many groups it tells apart.
    scale: the guidance strength.
  """

  log_prob: Callable[[Any, jax.Array], jax.Array]
  variables: Any
  num_groups: int
  scale: float


def group_log_prob_grad(estimate: Callable[[jax.Array], tuple[jax.Array, Any]],
                        x: jax.Array, groups: jax.Array, guide: GroupGuidance
                        ) -> tuple[jax.Array, Any]:
  """``grad_x sum_i log p(g_i | d_i(x))`` and ``aux``, where ``estimate(x) = (d, aux)`` gives
  the denoised estimate ``d`` (the gradient goes through it) and what else the sampler
  needs from the same network evaluation (``fair.method='guidance'``)."""
  def objective(x):
    d, aux = estimate(x)
    logp = guide.log_prob(guide.variables, d)
    return jnp.sum(jnp.take_along_axis(logp, groups[:, None], axis=1)), aux

  return jax.grad(objective, has_aux=True)(x)


def check_network(model: Any, family: str) -> None:
  """Raises ConfigError unless ``model`` is a denoising network (U-Net, DDPM++ or DiT)."""
  if not isinstance(model, NETWORKS):
    raise ConfigError(f"The {family!r} objective needs a denoising network: model.name="
                      f"'unet', 'ddpmpp' or 'dit', got {type(model).__name__}.")


# The keys EDM and flow matching share, beside their own (``check_common`` checks them).
COMMON_DEFAULTS = {
    "noise_multiplicity": 1,  # DP-SGD: noise draws averaged per example before clipping.
    "ema_decay": 0.999,
    "label_dropout": 0.1,  # Conditional models: P(label -> "no label") in training.
    "guidance": 0.0,  # Classifier-free guidance weight w at sampling.
    "likelihood_probes": 1,  # Hutchinson probes of the ODE likelihood (eval's bits/dim).
    "likelihood_tol": 1e-5,  # Its solver's relative and absolute tolerance.
}


def check_common(cfg: Mapping[str, Any]) -> None:
  """Raises ConfigError for impossible values of the keys EDM and flow matching share."""
  n = cfg["sample_steps"]
  require(isinstance(n, int) and n >= 1, f"objective.sample_steps must be a positive "
          f"integer, got {n!r}.")
  require(cfg["guidance"] >= 0, f"objective.guidance must be >= 0, got {cfg['guidance']}.")
  require(0 <= cfg["ema_decay"] < 1, f"objective.ema_decay must be in [0, 1), got "
          f"{cfg['ema_decay']}.")
  require(0 <= cfg["label_dropout"] < 1, f"objective.label_dropout must be in [0, 1), got "
          f"{cfg['label_dropout']}.")
  for key in ("noise_multiplicity", "likelihood_probes"):
    require(isinstance(cfg[key], int) and cfg[key] >= 1,
            f"objective.{key} must be a positive integer, got {cfg[key]!r}.")
  require(cfg["likelihood_tol"] > 0, f"objective.likelihood_tol must be > 0, got "
          f"{cfg['likelihood_tol']}.")


def init(model: Any, image_shape: tuple[int, ...], tx: optax.GradientTransformation,
         rng: jax.Array) -> base.State:
  """The initial state: step, params, opt and the EMA of the params."""
  x = jnp.zeros((1,) + tuple(image_shape))
  zeros = jnp.zeros((1,), jnp.int32)
  params = model.init({"params": rng}, x, zeros, zeros if model.num_classes else None
                      )["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": tx.init(params),
          "ema": params}


def training_labels(model: Any, batch: base.Batch, rng: jax.Array,
                    label_dropout: float) -> jax.Array | None:
  """A conditional network's labels with some dropped to "no label" (classifier-free
  guidance's training, at rate ``label_dropout``); None for an unconditional one."""
  if not model.num_classes:
    return None
  labels = batch[model.condition_key].astype(jnp.int32)
  drop = jax.random.bernoulli(rng, label_dropout, labels.shape)
  return jnp.where(drop, model.num_classes, labels)


def train_step(state: base.State, batch: base.Batch, rng: jax.Array, *, model: Any,
               tx: optax.GradientTransformation, image_loss: ImageLoss, ema_decay: float,
               label_dropout: float) -> tuple[base.State, base.Metrics]:
  """One update of ``image_loss`` (importance weights from ``batch['weight']``) and the EMA."""
  rng = jax.random.fold_in(rng, state["step"])
  k_loss, k_label = jax.random.split(rng)
  labels = training_labels(model, batch, k_label, label_dropout)

  def loss_fn(params):
    per_example = image_loss(params, batch["image"], labels, k_loss)
    return losses.weighted_mean(per_example, batch.get("weight"))

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  ema = base.ema_update(state["ema"], params, state["step"], ema_decay)
  metrics = {"loss": loss, "grad_norm": base.global_norm(grads)}
  return {"step": state["step"] + 1, "params": params, "opt": opt, "ema": ema}, metrics


def private_train_step(state: base.State, batch: base.Batch, rng: jax.Array, *, model: Any,
                       tx: optax.GradientTransformation, image_loss: ImageLoss,
                       ema_decay: float, label_dropout: float, multiplicity: int,
                       privacy: base.PrivateGradient) -> tuple[base.State, base.Metrics]:
  """The DP-SGD update of ``train_step`` (DPDM, Dockhorn et al. 2023): each example's loss
  is averaged over ``multiplicity`` noise draws (noise levels and noise) before its
  gradient is clipped, which lowers the clipped gradient's variance at no privacy cost;
  then the run's ``privacy`` gradient clips, sums the Poisson-drawn rows and adds noise.
  The EMA is post-processing of the private parameters."""
  rng = jax.random.fold_in(rng, state["step"])
  k_loss, k_label = jax.random.split(rng)
  labels = training_labels(model, batch, k_label, label_dropout)

  def example_loss(params, example, key):
    image, label = example
    images = jnp.repeat(image[None], multiplicity, axis=0)
    repeated = None if label is None else jnp.repeat(label[None], multiplicity, axis=0)
    loss = jnp.mean(image_loss(params, images, repeated, key))
    return loss, {"loss": loss}

  mask = batch["mask"]
  grads, terms, stats = privacy(example_loss, state["params"], (batch["image"], labels),
                                k_loss, mask, batch.get("weight"), batch.get("canary"))
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  ema = base.ema_update(state["ema"], params, state["step"], ema_decay)
  metrics = {"loss": privacy.mean(terms["loss"], mask), "grad_norm": base.global_norm(grads),
             "batch_examples": jnp.sum(mask), **stats}
  return {"step": state["step"] + 1, "params": params, "opt": opt, "ema": ema}, metrics


def step_function(model: Any, tx: optax.GradientTransformation, image_loss: ImageLoss,
                  objective: Any, privacy: base.PrivateGradient | None,
                  image_shape: tuple[int, ...]) -> Callable[..., Any]:
  """The family's train step: ``train_step``, or with ``privacy`` the DP-SGD step with
  ``objective['noise_multiplicity']`` draws per example (after checking that the network
  keeps no batch statistics, which would mix examples)."""
  common = dict(model=model, tx=tx, image_loss=image_loss,
                ema_decay=float(objective["ema_decay"]),
                label_dropout=float(objective["label_dropout"]))
  if privacy is None:
    return functools.partial(train_step, **common)
  zeros = jnp.zeros((1,), jnp.int32)
  privacy.check_variables(jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1,) + tuple(image_shape)), zeros,
      zeros if model.num_classes else None)), "denoising network")
  return functools.partial(private_train_step, **common, privacy=privacy,
                           multiplicity=int(objective["noise_multiplicity"]))


def guided(model: Any, params: Any, x: jax.Array, t: jax.Array, labels: jax.Array | None,
           guidance: float) -> jax.Array:
  """The network's output, guided: ``(1 + w) f(x, y) - w f(x, no label)`` (Ho & Salimans
  2021). Every family's denoiser is affine in the output, so guiding it guides the
  denoised estimate, the noise and the velocity alike."""
  if not model.num_classes:
    return model.apply({"params": params}, x, t, None)
  if not guidance:
    return model.apply({"params": params}, x, t, labels)
  both = model.apply({"params": params}, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                     jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)]))
  cond, uncond = jnp.split(both, 2)
  return (1.0 + guidance) * cond - guidance * uncond


def noise_keys(latents: jax.Array) -> jax.Array:
  """One key per sample from the bits of its first two latent values: a stochastic
  sampler's noise is then fixed by the latents, on any number of devices."""
  bits = jax.lax.bitcast_convert_type(latents[:, :2], jnp.uint32)
  return jax.vmap(lambda b: jax.random.fold_in(jax.random.fold_in(jax.random.key(0), b[0]),
                                               b[1]))(bits)


def step_noise(keys: jax.Array, i: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sampler step ``i``'s standard normal noise, one draw per sample key."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape))(keys)


def integrate(step: Callable[[jax.Array, Any, bool], jax.Array], x: jax.Array, inputs: Any,
              heun: bool) -> tuple[jax.Array, jax.Array]:
  """Runs a sampler's ``step(x, inputs_i, second_order)`` over the leading axis of
  ``inputs`` in one ``lax.scan``: ``(final x, [steps, B, ...] states)``. With ``heun``
  every step but the last is second order; the last (to sigma = 0 or t = 0) is Euler's, so
  N steps cost 2N - 1 network evaluations (Karras et al.'s Algorithm 1)."""
  n = len(jax.tree.leaves(inputs)[0])
  split = n - 1 if heun else n
  x, path = jax.lax.scan(lambda x, inp: (lambda y: (y, y))(step(x, inp, heun)), x,
                         jax.tree.map(lambda a: a[:split], inputs))
  if split < n:
    x = step(x, jax.tree.map(lambda a: a[split], inputs), False)
    path = jnp.concatenate([path, x[None]], axis=0)
  return x, path


def finish(x: jax.Array, path: jax.Array, start: jax.Array, keep: int,
           clip: bool = True) -> jax.Array:
  """A sampler's result: the final images ``x`` (clipped to [-1, 1] with ``clip``; latents
  are not), or with ``keep`` > 0 the trajectory ``[B, keep + 1, ...]``: ``start``, the
  states ``path`` (``[steps, B, ...]``) after ``keep - 1`` evenly spaced steps, and ``x``."""
  bound = (lambda a: jnp.clip(a, -1.0, 1.0)) if clip else (lambda a: a)
  if not keep:
    return bound(x)
  frames = np.unique(np.linspace(0, path.shape[0] - 1, keep + 1).round().astype(np.int32))
  path = jnp.concatenate([start[None], path[frames[:-1]], x[None]], axis=0)
  return bound(jnp.moveaxis(path, 0, 1))
