"""The fairness penalty ``L_G + lambda * L_F`` of ``fair.method='penalty'``.

``L_F`` is the divergence (KL or L2) between the batch-mean group distribution that a frozen
attribute classifier predicts for the generated samples and the target distribution. The
penalty is a pure function the GAN step calls inside its jitted step; gradients flow into the
generated images, never into the classifier.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fairgen import data
from fairgen.classifiers import backbones
from fairgen.config import ConfigError, require
from fairgen.fairness import methods
from fairgen.fairness.registry import METHODS, Method
from fairgen.objectives.adversarial import GeneratorPenalty

DIVERGENCES = ("kl", "l2")
_EPS = 1e-8

# images -> (weight * L_F, metrics).
Penalty = Callable[[jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def attribute_penalty(probs_fn: Callable[[jax.Array], jax.Array], target: np.ndarray,
                      divergence: str = "kl", weight: float = 1.0) -> Penalty:
  """``images -> (weight * L_F, metrics)``: the divergence of mean predicted groups from target.

  ``L_F`` is ``KL(p || t) = sum_g p_g log(p_g / t_g)`` or ``||p - t||_2`` with ``p`` the
  batch mean of ``probs_fn(images)`` (the frozen attribute classifier's softmax), the same
  directions as the fairness-discrepancy metric. Gradients flow through ``probs_fn`` into
  the images (and so into the generator), never into the classifier.
  """
  if divergence not in DIVERGENCES:
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}.")
  t = jnp.asarray(target, jnp.float32)

  def penalty(images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    p = jnp.mean(probs_fn(images), axis=0)
    if divergence == "kl":
      # t > 0 where the target has mass; where t == 0, p log(p / eps) pushes p to 0.
      value = jnp.sum(p * (jnp.log(p + _EPS) - jnp.log(t + _EPS)))
    else:
      value = jnp.sqrt(jnp.sum((p - t) ** 2) + _EPS**2)
    metrics = {"fair_penalty": value}
    metrics.update({f"gen_group_{g}": p[g] for g in range(p.shape[0])})
    return weight * value, metrics

  return penalty


def generator_penalty(config: ml_collections.ConfigDict, spec: data.DataSpec
                      ) -> GeneratorPenalty:
  """The penalty of ``fair.method='penalty'`` with the frozen attribute classifier.

  The classifier's parameters are the penalty's ``constants``: the training step receives
  them as jit arguments (not as constants compiled into it), and no gradient reaches them.
  """
  classifier = methods.attribute_classifier(config)
  if tuple(classifier.image_shape) != tuple(spec.image_shape):
    raise ConfigError(f"The attribute classifier at {classifier.path} takes images of shape "
                      f"{classifier.image_shape}, the data has {spec.image_shape}.")
  model = backbones.classifier_model(classifier.info["architecture"])
  target = methods.target_distribution(config, classifier.num_classes)
  divergence = config.fair.penalty.divergence
  weight = float(config.fair.penalty.weight)

  def fn(images: jax.Array, step: jax.Array, params: Any
         ) -> tuple[jax.Array, dict[str, jax.Array]]:
    del step  # The penalty applies at every step.

    def probs_fn(x: jax.Array) -> jax.Array:
      logits = model.apply({"params": jax.lax.stop_gradient(params)}, x, train=False)["logits"]
      return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    return attribute_penalty(probs_fn, target, divergence, weight)(images)

  return GeneratorPenalty(fn, constants=jax.device_get(classifier.variables))


def check_section(fair: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for an impossible ``fair.penalty`` section."""
  require(fair.penalty.divergence in DIVERGENCES,
          f"fair.penalty.divergence must be one of {DIVERGENCES}, got "
          f"{fair.penalty.divergence!r}.")
  require(fair.penalty.weight >= 0, f"fair.penalty.weight must be >= 0, got "
          f"{fair.penalty.weight}.")


METHODS.register("penalty")(Method(
    summary="L_G + weight * divergence(mean predicted groups of the fakes, target)",
    # L_G + weight * divergence(mean predicted groups, target).
    defaults={"penalty": dict(weight=1.0, divergence="kl")},
    needs=("generator_penalty",), check_section=check_section, penalty=generator_penalty))
