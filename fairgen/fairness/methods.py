"""The ``fair`` config section, target distributions, and the calls into the chosen method.

The methods themselves are one file each (``baseline``, ``importance``, ``resample``,
``conditional``, ``penalty``), registered in ``fairgen.fairness.registry.METHODS``; this
module calls the configured method's hooks and never names one.
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections
import numpy as np

from fairgen import data
from fairgen.classifiers import backbones
from fairgen.config import ConfigError, require
from fairgen.fairness import registry
from fairgen.fairness.registry import METHODS

def fair_section(method: str = "baseline") -> ml_collections.ConfigDict:
  """The ``fair`` config section: the common keys and every registered method's own."""
  section = dict(
      method=method,
      # Target group distribution; None: uniform over the dataset's groups.
      target=ml_collections.config_dict.placeholder(tuple),
      # The frozen attribute classifier of the penalty and the fairness evaluators
      # (default: $FAIRGEN_CACHE/classifier_<data cache tag>_attr).
      classifier_dir=ml_collections.config_dict.placeholder(str),
      # Evaluation: bootstrap resamples of the fairness discrepancy, and generated samples
      # per group for per-group FID/precision/recall.
      bootstrap=200,
      group_samples=500,
  )
  for name in METHODS:
    section.update(copy.deepcopy(dict(METHODS.get(name).defaults)))
  return ml_collections.ConfigDict(section)


def make_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks the ``fair`` section and the fairness evaluation of ``c`` for a smoke variant."""
  c.fair.ratio.update(steps=4, batch_size=16, width=4, feature_dim=8)
  c.fair.bootstrap = 10
  c.fair.group_samples = 20
  c.eval.update(num_samples=64, batch_size=32, kid_subset_size=32)
  return c


def validate(config: ml_collections.ConfigDict, capabilities: tuple[str, ...],
             objective_name: str) -> None:
  """Raises ConfigError for an impossible ``fair`` section.

  Args:
    config: the experiment config (its ``fair``, ``model``, ``data`` and ``privacy``
      sections).
    capabilities: what the objective declares (``registry.CAPABILITIES``); a method that
      needs more is refused.
    objective_name: for the error message.
  """
  fair = config.fair
  require(fair.method in METHODS,
          f"Unknown fair.method={fair.method!r}; valid methods: {', '.join(METHODS)}.")
  require(fair.bootstrap >= 0, f"fair.bootstrap must be >= 0, got {fair.bootstrap}.")
  require(fair.group_samples >= 1, f"fair.group_samples must be >= 1, got "
          f"{fair.group_samples}.")
  for name in METHODS:
    METHODS.get(name).check_section(fair)
  if fair.target is not None:
    t = np.asarray(fair.target, np.float64)
    require(t.ndim == 1 and np.all(t >= 0) and np.isclose(t.sum(), 1.0),
            f"fair.target must be a probability per group, got {fair.target}.")
  names = registry.supported(capabilities)
  require(fair.method in names,
          f"fair.method={fair.method!r} is not supported by objective.name="
          f"{objective_name!r}; it supports: {', '.join(names)}.")
  METHODS.get(fair.method).check(config)


def method(config: ml_collections.ConfigDict) -> str:
  """The config's mitigation ('baseline' when it has no ``fair`` section)."""
  return config.fair.method if "fair" in config else "baseline"


def _chosen(config: ml_collections.ConfigDict) -> registry.Method:
  """The registered ``Method`` of the config."""
  return METHODS.get(method(config))


def weight_bound(config: ml_collections.ConfigDict) -> float:
  """The largest importance weight a batch can carry (the method's ``weight_bound``; 1 for
  a method without per-example weights)."""
  hook = _chosen(config).weight_bound
  return 1.0 if hook is None else hook(config)


def private_prior(config: ml_collections.ConfigDict, num_examples: int
                  ) -> tuple[tuple[float, float, int, int], ...]:
  """What a DP run spends on its data before its first step (the method's
  ``private_prior``, e.g. importance weighting's DP density-ratio classifier), or nothing."""
  hook = _chosen(config).private_prior
  return () if hook is None else hook(config, num_examples)


def generator_penalty(config: ml_collections.ConfigDict, spec: data.DataSpec) -> Any:
  """The method's extra generator loss term (a ``GeneratorPenalty``), or None."""
  hook = _chosen(config).penalty
  return None if hook is None else hook(config, spec)


def sampler_guidance(config: ml_collections.ConfigDict, spec: data.DataSpec) -> Any:
  """The method's guidance of a sampler toward the target groups (a ``GroupGuidance``), or
  None."""
  hook = _chosen(config).guidance
  return None if hook is None else hook(config, spec)


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


def prepare(config: ml_collections.ConfigDict, source: data.Source, workdir: str,
            global_batch: int) -> tuple[data.Source, data.WeightedSampler | None]:
  """Applies the method's data-side change (its ``prepare`` hook).

  Args:
    config: the experiment config.
    source: the training split.
    workdir: the run directory (e.g. importance weights are cached in it).
    global_batch: examples per step, for a sampler.

  Returns:
    The (possibly weighted) source and the sampler to draw batches with (None: the
    default permutation sampler).
  """
  hook = _chosen(config).prepare
  return (source, None) if hook is None else hook(config, source, workdir, global_batch)


def label_probs(config: ml_collections.ConfigDict, num_classes: int
                ) -> tuple[float, ...] | None:
  """The prior of a group-conditional generator's labels, or of the groups a guided sampler
  steers toward: ``fair.target`` (None: uniform)."""
  if "fair" not in config or (config.model.get("condition_key") != "attr"
                              and _chosen(config).guidance is None):
    return None
  if config.fair.target is None:
    return None
  return tuple(float(p) for p in target_distribution(config, num_classes))
