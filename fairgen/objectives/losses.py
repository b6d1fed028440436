"""Loss families and the pieces every objective's step shares (score_sde's loss factories).

The step functions in this package only wire data, models and optimizers; what they
minimise lives here, as pure per-example functions:

- the adversarial loss family (non-saturating, Wasserstein, hinge, least squares):
  ``ADVERSARIAL_LOSSES`` (a registry) maps a name to a pair of
  per-example functions ``d_loss(real_logits, fake_logits) -> (real_term, fake_term)`` and
  ``g_loss(fake_logits) -> term``. The discriminator's loss is split into a real and a
  fake term so that importance weights multiply the real term only (Choi et al. 2020);
- ``gradient_penalty``: ``(|d f(x) / d x| - 1)^2`` per example, for inputs of any rank
  (image batches as well as table rows), at random interpolates of real and fake inputs;
  ``r1_penalty``: ``|d f(x) / d x|^2`` at real inputs;
- ``split_microbatches``: one real micro-batch per discriminator/critic update;
- ``soft_dp_gap``: the demographic-parity gap of a batch (AIF360's sign: unprivileged
  minus privileged), differentiable with soft labels and group weights; ``hard_dp_gap`` is
  the metric's statistical parity difference (``fairgen.metrics.fairness``) of hard ones;
- ``weighted_mean``: how every per-example loss is reduced, with optional self-normalised
  importance weights.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fairgen.metrics import fairness
from fairgen.registry import Registry

_EPS = 1e-6


def weighted_mean(per_example: jax.Array, weight: jax.Array | None = None) -> jax.Array:
  """The mean of per-example losses, weighted by ``weight`` (self-normalised) if given."""
  if weight is None:
    return jnp.mean(per_example)
  weight = weight.astype(per_example.dtype)
  return jnp.sum(per_example * weight) / jnp.sum(weight)


# --- The adversarial loss family. ---------------------------------------------------------


class AdversarialLoss(NamedTuple):
  """Per-example discriminator and generator losses of one GAN formulation.

  Attributes:
    d_loss: ``(real_logits, fake_logits) -> (real_term, fake_term)``, each ``[B]``; the
      discriminator minimises ``mean_w(real_term) + mean(fake_term)``.
    g_loss: ``fake_logits -> [B]``; the generator minimises its mean.
  """

  d_loss: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
  g_loss: Callable[[jax.Array], jax.Array]


def d_nonsaturating(real_logits: jax.Array,
                    fake_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example discriminator losses: -log D(x) on reals, -log(1 - D(G(z))) on fakes."""
  return jax.nn.softplus(-real_logits), jax.nn.softplus(fake_logits)


def g_nonsaturating(fake_logits: jax.Array) -> jax.Array:
  """Per-example non-saturating generator loss: -log D(G(z))."""
  return jax.nn.softplus(-fake_logits)


def d_wasserstein(real_critic: jax.Array,
                  fake_critic: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example WGAN critic losses: ``-C(x)`` on reals, ``C(G(z))`` on fakes."""
  return -real_critic, fake_critic


def g_wasserstein(fake_critic: jax.Array) -> jax.Array:
  """Per-example WGAN generator loss: ``-C(G(z))``."""
  return -fake_critic


def d_hinge(real_logits: jax.Array, fake_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example hinge losses (Lim & Ye 2017; SAGAN, BigGAN): ``max(0, 1 - D(x))`` on reals,
  ``max(0, 1 + D(G(z)))`` on fakes."""
  return jax.nn.relu(1.0 - real_logits), jax.nn.relu(1.0 + fake_logits)


def g_hinge(fake_logits: jax.Array) -> jax.Array:
  """Per-example hinge generator loss: ``-D(G(z))``."""
  return -fake_logits


def d_least_squares(real_out: jax.Array, fake_out: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example least-squares losses (Mao et al. 2017, targets a=0, b=c=1):
  ``(D(x) - 1)^2 / 2`` on reals, ``D(G(z))^2 / 2`` on fakes."""
  return 0.5 * (real_out - 1.0)**2, 0.5 * fake_out**2


def g_least_squares(fake_out: jax.Array) -> jax.Array:
  """Per-example least-squares generator loss: ``(D(G(z)) - 1)^2 / 2``."""
  return 0.5 * (fake_out - 1.0)**2


# A new loss family registers its pair here from its own module:
# ``ADVERSARIAL_LOSSES.register("name")(AdversarialLoss(d_fn, g_fn))``; ``objective.loss``
# then names it.
ADVERSARIAL_LOSSES: Registry[AdversarialLoss] = Registry("adversarial loss")
ADVERSARIAL_LOSSES.register("nonsaturating")(AdversarialLoss(d_nonsaturating, g_nonsaturating))
ADVERSARIAL_LOSSES.register("wasserstein")(AdversarialLoss(d_wasserstein, g_wasserstein))
ADVERSARIAL_LOSSES.register("hinge")(AdversarialLoss(d_hinge, g_hinge))
ADVERSARIAL_LOSSES.register("ls")(AdversarialLoss(d_least_squares, g_least_squares))


def adversarial_loss(name: str, label_smoothing: float = 0.0) -> AdversarialLoss:
  """The loss pair called ``name``; ValueError lists the valid names.

  ``label_smoothing`` > 0 (non-saturating only): one-sided label smoothing (Salimans et al.
  2016), the discriminator's target for reals is ``1 - label_smoothing``; fakes keep 0.
  """
  if name not in ADVERSARIAL_LOSSES:
    raise ValueError(f"Unknown adversarial loss {name!r}; valid: "
                     f"{', '.join(sorted(ADVERSARIAL_LOSSES))}.")
  if not label_smoothing:
    return ADVERSARIAL_LOSSES.get(name)
  if name != "nonsaturating":
    raise ValueError(f"Label smoothing is defined for the non-saturating loss (a "
                     f"cross-entropy target), not for {name!r}.")
  alpha = float(label_smoothing)

  def d_smoothed(real_logits, fake_logits):
    # Cross-entropy with target 1 - alpha: -(1 - a) log D(x) - a log(1 - D(x)).
    real = (1.0 - alpha) * jax.nn.softplus(-real_logits) + alpha * jax.nn.softplus(real_logits)
    return real, jax.nn.softplus(fake_logits)

  return AdversarialLoss(d_smoothed, g_nonsaturating)


# --- Regularisers. -----------------------------------------------------------------------


def gradient_penalty(fn: Callable[[jax.Array], jax.Array], inputs: jax.Array,
                     target: float = 1.0) -> jax.Array:
  """Per-example ``(|d fn(x)_i / d x_i| - target)^2`` (Gulrajani et al. 2017's penalty).

  ``fn`` maps a batch ``[B, ...]`` to per-example outputs ``[B]`` and must treat examples
  independently (no batch norm), so the gradient of ``sum(fn(x))`` with respect to ``x_i``
  is example ``i``'s own gradient. Works for inputs of any rank: the norm is over every
  axis but the first.
  """
  return (jnp.sqrt(input_grad_sq_norm(fn, inputs) + 1e-12) - target)**2


def r1_penalty(fn: Callable[[jax.Array], jax.Array], reals: jax.Array) -> jax.Array:
  """Per-example ``|d fn(x)_i / d x_i|^2`` at real inputs (Mescheder et al. 2018's R1;
  the loss adds ``gamma / 2`` times its mean). Same contract for ``fn`` as
  ``gradient_penalty``."""
  return input_grad_sq_norm(fn, reals)


def input_grad_sq_norm(fn: Callable[[jax.Array], jax.Array], inputs: jax.Array) -> jax.Array:
  """Per-example squared norm of the gradient of ``fn``'s output with respect to its input."""
  grads = jax.grad(lambda x: jnp.sum(fn(x)))(inputs)
  return jnp.sum(jnp.reshape(grads**2, (grads.shape[0], -1)), axis=-1)


def interpolate(real: jax.Array, fake: jax.Array, rng: jax.Array) -> jax.Array:
  """Per-example random points on the lines between ``real`` and ``fake`` (any rank)."""
  mix = jax.random.uniform(rng, (real.shape[0],) + (1,) * (real.ndim - 1))
  return mix * real + (1.0 - mix) * fake


# --- Batching. -----------------------------------------------------------------------------


def split_microbatches(x: jax.Array, k: int) -> jax.Array:
  """[k*B, ...] -> [k, B, ...], keeping the batch axis (the sharded one) contiguous.

  Row ``j`` of micro-batch ``i`` is row ``j * k + i`` of ``x``, so every device's shard of
  the batch axis holds its own rows of every micro-batch and no data moves between devices.
  """
  b = x.shape[0] // k
  return jnp.moveaxis(x.reshape((b, k) + x.shape[1:]), 1, 0)


# --- The demographic-parity gap. -------------------------------------------------------------


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


def hard_dp_gap(y: jax.Array, s: jax.Array) -> jax.Array:
  """``metrics.fairness.statistical_parity_difference`` of 0/1 indicators, inside jit.

  0 instead of NaN when a group is absent from the batch (logged metrics must stay finite).
  """
  spd = fairness.statistical_parity_difference(y, s)
  return jnp.where(jnp.isnan(spd), 0.0, spd)
