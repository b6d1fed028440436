"""``fair.method='guidance'``: steer an EDM or flow-matching sampler toward the target groups
at sampling time.

Only an iterative sampler can do this. Each sample is assigned a group drawn from
``fair.target`` (uniform when unset), and every denoised estimate is moved up the frozen
attribute classifier's log-probability of that group, evaluated on the estimate itself
(classifier guidance through the denoiser, as in "universal guidance", Bansal et al. 2023):

  D'(x; sigma) = D(x; sigma) + scale * sigma^2 * grad_x log p(g | D(x; sigma)).

``sigma^2 grad_x log p`` is the change of the score ``grad log p(x | g) - grad log p(x)``
that Bayes' rule asks for, scaled by ``fair.guidance.scale``; the gradient goes through the
denoiser, whose Jacobian shrinks it at high noise. Flow matching's sampler applies the same
change to its velocity (``fairgen.objectives.flow.toward_groups``). The model trains as the
baseline does (unconditionally, on the biased data); only sampling changes, so a trained
baseline checkpoint can be sampled fairly without retraining. The classifier never trains
here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fairgen import data
from fairgen.classifiers import backbones
from fairgen.config import ConfigError, require
from fairgen.fairness import methods
from fairgen.fairness.registry import METHODS, Method
from fairgen.objectives.denoising import GroupGuidance


def sampler_guidance(config: ml_collections.ConfigDict, spec: data.DataSpec) -> GroupGuidance:
  """The guidance of ``fair.method='guidance'`` with the frozen attribute classifier."""
  classifier = methods.attribute_classifier(config)
  if tuple(classifier.image_shape) != tuple(spec.image_shape):
    raise ConfigError(f"The attribute classifier at {classifier.path} takes images of shape "
                      f"{classifier.image_shape}, the data has {spec.image_shape}.")
  model = backbones.classifier_model(classifier.info["architecture"])

  def log_prob(params, images: jax.Array) -> jax.Array:
    logits = model.apply({"params": jax.lax.stop_gradient(params)}, images,
                         train=False)["logits"]
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

  return GroupGuidance(log_prob, jax.device_get(classifier.variables),
                       int(classifier.num_classes), float(config.fair.guidance.scale))


def check_section(fair: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for an impossible ``fair.guidance`` section."""
  require(fair.guidance.scale >= 0, f"fair.guidance.scale must be >= 0, got "
          f"{fair.guidance.scale}.")


def check(config: ml_collections.ConfigDict) -> None:
  """Refuses a model conditioned on labels: the sampler's labels are the target groups."""
  require(not config.model.get("conditional"), "fair.method='guidance' guides an "
          "unconditional model toward the target groups; set model.conditional=False.")


METHODS.register("guidance")(Method(
    summary="the sampler follows the attribute classifier toward each sample's target group",
    defaults={"guidance": dict(scale=1.0)}, needs=("sampling_guidance",),
    check_section=check_section, check=check, guidance=sampler_guidance))
