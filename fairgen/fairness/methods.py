"""The ``fair`` config section, target distributions, resampling and the data-side dispatch.

See ``fairgen/fairness/__init__.py`` for the methods.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from fairgen import data
from fairgen.classifiers import backbones
from fairgen.config import ConfigError, require
from fairgen.fairness import importance

METHODS = ("baseline", "importance", "resample", "conditional", "penalty")
DIVERGENCES = ("kl", "l2")


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
      # importance: the density-ratio classifier (fairgen/fairness/density_ratio.py).
      # With a privacy section it trains by DP-SGD (privacy.clip_norm, this noise
      # multiplier, Poisson batches of batch_size on average) and its epsilon is part of
      # the run's.
      ratio=dict(steps=1000, batch_size=64, lr=1e-3, width=16, feature_dim=64, dropout=0.25,
                 augment_shift=2, seed=0, noise_multiplier=3.0),
      # penalty: L_G + weight * divergence(mean predicted groups, target).
      penalty=dict(weight=1.0, divergence="kl"),
      # Evaluation: bootstrap resamples of the fairness discrepancy, and generated samples
      # per group for per-group FID/precision/recall.
      bootstrap=200,
      group_samples=500,
  ))


def make_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks the ``fair`` section and the fairness evaluation of ``c`` for a smoke variant."""
  c.fair.ratio.update(steps=4, batch_size=16, width=4, feature_dim=8)
  c.fair.bootstrap = 10
  c.fair.group_samples = 20
  c.eval.update(num_samples=64, batch_size=32, kid_subset_size=32)
  return c


def validate(config: ml_collections.ConfigDict, objective: Any) -> None:
  """Raises ConfigError for an impossible ``fair`` section.

  Args:
    config: the experiment config (its ``fair``, ``model`` and ``data`` sections).
    objective: the objective's registry entry; its ``fair_methods`` are the methods it
      supports.
  """
  fair = config.fair
  require(fair.method in METHODS,
          f"Unknown fair.method={fair.method!r}; valid methods: {', '.join(METHODS)}.")
  require(fair.alpha >= 0, f"fair.alpha must be >= 0, got {fair.alpha}.")
  require(fair.clip == 0 or fair.clip >= 1, "fair.clip must be 0 (off) or >= 1.")
  require(fair.penalty.divergence in DIVERGENCES,
          f"fair.penalty.divergence must be one of {DIVERGENCES}, got "
          f"{fair.penalty.divergence!r}.")
  require(fair.penalty.weight >= 0, f"fair.penalty.weight must be >= 0, got "
          f"{fair.penalty.weight}.")
  require(fair.bootstrap >= 0, f"fair.bootstrap must be >= 0, got {fair.bootstrap}.")
  require(fair.group_samples >= 1, f"fair.group_samples must be >= 1, got "
          f"{fair.group_samples}.")
  ratio = fair.ratio
  for key in ("steps", "width", "feature_dim"):
    require(ratio[key] >= 1, f"fair.ratio.{key} must be >= 1, got {ratio[key]}.")
  require(ratio.batch_size >= 2 and ratio.batch_size % 2 == 0,
          f"fair.ratio.batch_size must be even and >= 2, got {ratio.batch_size}.")
  require(ratio.lr > 0, f"fair.ratio.lr must be > 0, got {ratio.lr}.")
  require(0 <= ratio.dropout < 1, f"fair.ratio.dropout must be in [0, 1), got {ratio.dropout}.")
  require(ratio.noise_multiplier >= 0,
          f"fair.ratio.noise_multiplier must be >= 0, got {ratio.noise_multiplier}.")
  require(ratio.augment_shift >= 0,
          f"fair.ratio.augment_shift must be >= 0, got {ratio.augment_shift}.")
  if fair.target is not None:
    t = np.asarray(fair.target, np.float64)
    require(t.ndim == 1 and np.all(t >= 0) and np.isclose(t.sum(), 1.0),
            f"fair.target must be a probability per group, got {fair.target}.")
  method = fair.method
  require(method in objective.fair_methods,
          f"fair.method={method!r} is not supported by objective.name="
          f"{config.objective.name!r}; it supports: {', '.join(objective.fair_methods)}.")
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


def weight_bound(config: ml_collections.ConfigDict) -> float:
  """The largest importance weight a batch can carry: ``fair.clip`` for the importance
  method (weights are clipped to [1/clip, clip]; 0 means unbounded: inf), 1 otherwise."""
  if method(config) != "importance":
    return 1.0
  return float(config.fair.clip) if config.fair.clip else float("inf")


def private_prior(config: ml_collections.ConfigDict, num_examples: int
                  ) -> tuple[tuple[float, float, int, int], ...]:
  """What a DP run spends on its data before its first step: the DP density-ratio classifier
  of importance weighting (``fairgen.privacy.DpSettings.prior``), or nothing."""
  ratio = importance.ratio_privacy(config, num_examples)
  if ratio is None:
    return ()
  return ((ratio.noise_multiplier, ratio.sampling_rate, ratio.num_steps, ratio.batch_size),)


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
    weights = importance.cached_weights(config, source, workdir)
    return data.SubsetSource(source, columns={"weight": weights}), None
  if name == "resample":
    groups = data.read_column(source, "attr").astype(np.int32)
    target = target_distribution(config, source.spec.num_groups)
    return source, data.WeightedSampler(resample_probs(groups, target), global_batch,
                                        config.seed)
  return source, None


def label_probs(config: ml_collections.ConfigDict, num_classes: int
                ) -> tuple[float, ...] | None:
  """The prior of a group-conditional generator's labels: ``fair.target`` (None: uniform)."""
  if config.model.get("condition_key") != "attr" or "fair" not in config:
    return None
  if config.fair.target is None:
    return None
  return tuple(float(p) for p in target_distribution(config, num_classes))
