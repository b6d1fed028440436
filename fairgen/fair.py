"""Fairness mitigations as config switches, for any GAN or VAE objective (``config.fair``).

A researcher has a *biased* dataset in which one group of a sensitive attribute is
under-represented, plus a small balanced *reference* set (``fairgen/data/bias.py``). They
want samples whose groups follow ``fair.target`` (uniform by default). ``fair.method``:

============  =================================================================  ===========
method        what changes                                                        objectives
============  =================================================================  ===========
baseline      nothing: train on ``data.options.subset`` ('biased' or 'union')     gan, vae
importance    Choi et al. 2020: a density-ratio classifier tells reference from   gan, vae
              biased examples; ``w(x) = p_ref(x) / p_bias(x)``, flattened to
              ``w**alpha``, weights each biased example's real-data loss (the D
              loss on reals, the VAE's ELBO), self-normalised per batch.
              Reference examples have weight 1.
resample      batches drawn with probability ``target[g] / count[g]`` per example  gan, vae
              of group ``g``: every group appears at its target rate.
conditional   the generator is conditioned on the group (``model.conditional``,    gan
              ``model.condition_key='attr'``) and sampled with the target prior.
penalty       ``L_G + lambda * L_F``: ``L_F`` is KL or L2 between the batch-mean   gan
              predicted group distribution of generated samples (a frozen
              attribute classifier) and the target.
============  =================================================================  ===========

Everything here runs before training (weights, samplers, the frozen classifier) or is a
pure function the objective calls inside its jitted step (``attribute_penalty``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fairgen import data
from fairgen import density_ratio
from fairgen.config import ConfigError, require
from fairgen.metrics import backbones
from fairgen.models.classifier import Classifier

METHODS = ("baseline", "importance", "resample", "conditional", "penalty")
DIVERGENCES = ("kl", "l2")
RATIO_DIR = "density_ratio"
_EPS = 1e-8

Penalty = Callable[[jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def fair_section(method: str = "baseline") -> ml_collections.ConfigDict:
  """The ``fair`` config section with its defaults."""
  return ml_collections.ConfigDict(dict(
      method=method,
      # Target group distribution; None: uniform over the dataset's groups.
      target=ml_collections.config_dict.placeholder(tuple),
      # The frozen attribute classifier of the penalty and the fairness evaluators
      # (default: $FAIRGEN_CACHE/classifier_<data cache tag>_attr).
      classifier_dir=ml_collections.config_dict.placeholder(str),
      # importance: w**alpha; clip > 0 clips w to [1/clip, clip] (0: no clipping).
      alpha=1.0,
      clip=0.0,
      # importance: the density-ratio classifier (fairgen/density_ratio.py).
      ratio=dict(steps=1000, batch_size=64, lr=1e-3, width=16, feature_dim=64, dropout=0.25,
                 augment_shift=2, seed=0),
      # penalty: L_G + weight * divergence(mean predicted groups, target).
      penalty=dict(weight=1.0, divergence="kl"),
      # Evaluation: bootstrap resamples of the fairness discrepancy, and generated samples
      # per group for per-group FID/precision/recall.
      bootstrap=200,
      group_samples=500,
  ))


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for an impossible ``fair`` section (called by ``config.validate``)."""
  fair = config.fair
  require(fair.method in METHODS,
          f"Unknown fair.method={fair.method!r}; valid methods: {', '.join(METHODS)}.")
  require(fair.alpha >= 0, f"fair.alpha must be >= 0, got {fair.alpha}.")
  require(fair.clip == 0 or fair.clip >= 1, "fair.clip must be 0 (off) or >= 1.")
  require(fair.penalty.divergence in DIVERGENCES,
          f"fair.penalty.divergence must be one of {DIVERGENCES}, got "
          f"{fair.penalty.divergence!r}.")
  require(fair.penalty.weight >= 0, "fair.penalty.weight must be >= 0.")
  if fair.target is not None:
    t = np.asarray(fair.target, np.float64)
    require(t.ndim == 1 and np.all(t >= 0) and np.isclose(t.sum(), 1.0),
            f"fair.target must be a probability per group, got {fair.target}.")
  objective = config.objective.name
  method = fair.method
  if method in ("conditional", "penalty"):
    require(objective == "gan", f"fair.method={method!r} needs objective.name='gan', got "
            f"{objective!r}.")
  conditioned = bool(config.model.get("conditional")) and (
      config.model.get("condition_key") == "attr")
  if method == "conditional":
    require(conditioned, "fair.method='conditional' needs model.conditional=True and "
            "model.condition_key='attr'.")
  if method == "importance":
    require(config.data.options.get("subset") == "union",
            "fair.method='importance' needs both sets: data.options.subset='union'.")


def method(config: ml_collections.ConfigDict) -> str:
  """The config's mitigation ('baseline' when it has no ``fair`` section)."""
  return config.fair.method if "fair" in config else "baseline"


def target_distribution(config: ml_collections.ConfigDict, num_groups: int) -> np.ndarray:
  """``fair.target`` as a float64 [num_groups] array (uniform when unset)."""
  target = config.fair.target if "fair" in config else None
  if target is None:
    return np.full(num_groups, 1.0 / num_groups)
  t = np.asarray(target, np.float64)
  if t.shape != (num_groups,):
    raise ConfigError(f"fair.target has {len(t)} entries; the data has {num_groups} groups.")
  return t / t.sum()


def attribute_classifier(config: ml_collections.ConfigDict) -> backbones.Backbone:
  """The frozen attribute classifier (``fair.classifier_dir`` or the default cache dir).

  Raises:
    BackboneNotFoundError: with the ``tools/train_classifier.py`` command that trains it
      on the balanced subset of the dataset.
  """
  path = config.fair.classifier_dir if "fair" in config else None
  path = path or backbones.default_classifier_dir(data.cache_tag(config.data), "attr")
  command = backbones.train_command(config.data, "attr", {"subset": "balanced"})
  return backbones.load_backbone_or_explain("classifier", path, command)


# --- Data-side mitigations: importance weights and resampling. ----------------------------


def resample_probs(groups: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Per-example sampling probabilities ``target[g] / count[g]``: group ``g`` at rate target[g].

  Raises:
    DataError: if a group with target mass has no examples.
  """
  counts = np.bincount(groups, minlength=len(target))
  missing = [g for g in range(len(target)) if target[g] > 0 and counts[g] == 0]
  if missing:
    raise data.DataError(f"Cannot resample: groups {missing} have no examples in the "
                         f"training split (group counts {counts.tolist()}).")
  per_group = np.where(counts > 0, target / np.maximum(counts, 1), 0.0)
  probs = per_group[groups]
  return probs / probs.sum()


def _ratio_model(cfg: Any) -> Classifier:
  return backbones.classifier_model({"num_classes": 2, "width": cfg.width,
                                     "feature_dim": cfg.feature_dim, "dropout": cfg.dropout})


def fit_importance_weights(config: ml_collections.ConfigDict, source: data.Source
                           ) -> tuple[np.ndarray, dict[str, Any]]:
  """Trains the density-ratio classifier on ``source`` and returns per-example weights.

  Returns:
    ``(weights [N] float32, info)``: ``info`` holds the classifier's training record and
    the weight diagnostics (effective group proportions after weighting).
  """
  fair = config.fair
  is_ref = data.read_column(source, "is_ref").astype(np.int32)
  images = data.read_column(source, "image")
  if not is_ref.any() or is_ref.all():
    raise data.DataError("fair.method='importance' needs reference and biased examples "
                         "(data.options.subset='union' with ref_fraction > 0).")
  model = _ratio_model(fair.ratio)
  params, info = density_ratio.fit_density_ratio(
      images[is_ref == 1], images[is_ref == 0], model, steps=int(fair.ratio.steps),
      batch_size=int(fair.ratio.batch_size), lr=float(fair.ratio.lr),
      seed=int(fair.ratio.seed), augment_shift=int(fair.ratio.augment_shift))
  log_odds = density_ratio.classifier_log_odds(model, params, images)
  weights = density_ratio.importance_weights(log_odds, is_ref, float(fair.alpha),
                                             float(fair.clip) or None)
  if source.spec.num_groups:
    groups = data.read_column(source, "attr").astype(np.int32)
    info["diagnostics"] = density_ratio.weight_diagnostics(weights, groups, is_ref,
                                                           source.spec.num_groups)
  return weights, info


def importance_weights(config: ml_collections.ConfigDict, source: data.Source,
                       workdir: str) -> np.ndarray:
  """The run's importance weights: read from ``WORKDIR/density_ratio/``, else fitted there.

  The weights are saved once (``weights.npy`` + ``info.json``, written atomically), so a
  resumed run reuses exactly the weights it started with.
  """
  directory = os.path.join(workdir, RATIO_DIR)
  path = os.path.join(directory, "weights.npy")
  if os.path.exists(path):
    weights = np.load(path, allow_pickle=False)
    if weights.shape != (len(source),):
      raise data.DataError(
          f"{path} holds {weights.shape} weights, the training split has {len(source)} "
          f"examples: the data changed since this workdir was started. Use a new workdir.")
    return weights
  start = time.perf_counter()
  weights, info = fit_importance_weights(config, source)
  info["seconds"] = round(time.perf_counter() - start, 2)
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
      np.save(f, weights, allow_pickle=False)
    with open(os.path.join(directory, "info.json"), "w") as f:
      json.dump(info, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
  logging.info("Importance weights fitted in %.1f s: %s", info["seconds"],
               info.get("diagnostics"))
  return weights


def prepare(config: ml_collections.ConfigDict, source: data.Source, workdir: str,
            global_batch: int) -> tuple[data.Source, data.WeightedSampler | None]:
  """Applies the data-side mitigation: ``(source with 'weight', None)`` or a sampler.

  Args:
    config: the experiment config.
    source: the training split.
    workdir: the run directory (importance weights are cached in it).
    global_batch: examples per step, for the sampler.

  Returns:
    The (possibly weighted) source and the sampler to draw batches with (None: the
    default permutation sampler).
  """
  name = method(config)
  if name == "importance":
    weights = importance_weights(config, source, workdir)
    return data.SubsetSource(source, columns={"weight": weights}), None
  if name == "resample":
    groups = data.read_column(source, "attr").astype(np.int32)
    target = target_distribution(config, source.spec.num_groups)
    return source, data.WeightedSampler(resample_probs(groups, target), global_batch,
                                        config.seed)
  return source, None


# --- Objective-side mitigations: the penalty and the conditional prior. --------------------


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
                      ) -> Penalty | None:
  """The penalty of ``fair.method='penalty'`` with the frozen attribute classifier, else None."""
  if method(config) != "penalty":
    return None
  classifier = attribute_classifier(config)
  if tuple(classifier.image_shape) != tuple(spec.image_shape):
    raise ConfigError(f"The attribute classifier at {classifier.path} takes images of shape "
                      f"{classifier.image_shape}, the data has {spec.image_shape}.")
  model = backbones.classifier_model(classifier.info["architecture"])
  # Host arrays: constants of the jitted step, placed wherever the mesh needs them.
  params = jax.device_get(classifier.variables)

  def probs_fn(images: jax.Array) -> jax.Array:
    logits = model.apply({"params": jax.lax.stop_gradient(params)}, images,
                         train=False)["logits"]
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  target = target_distribution(config, classifier.num_classes)
  return attribute_penalty(probs_fn, target, config.fair.penalty.divergence,
                           float(config.fair.penalty.weight))


def label_probs(config: ml_collections.ConfigDict, num_classes: int
                ) -> tuple[float, ...] | None:
  """The prior of a group-conditional generator's labels: ``fair.target`` (None: uniform)."""
  if config.model.get("condition_key") != "attr" or "fair" not in config:
    return None
  if config.fair.target is None:
    return None
  return tuple(float(p) for p in target_distribution(config, num_classes))
