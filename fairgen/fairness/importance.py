"""Importance weighting (Choi et al. 2020): per-example weights from a density-ratio classifier.

The classifier (``density_ratio.fit_density_ratio``) tells the reference set from the biased
set; its odds estimate ``w(x) = p_ref(x) / p_bias(x)``, flattened to ``w ** fair.alpha`` and
optionally clipped. The weights are fitted once per run and cached in
``WORKDIR/density_ratio/`` so that a resumed run reuses exactly the weights it started with.

In a DP run (a ``privacy`` section) the classifier sees the same private data as the
generative model, so it trains by DP-SGD too (``density_ratio.ratio_privacy``), and each weight is a
function of its own example alone (clipped, not normalised over the set): the weights are
post-processing of a private classifier, and the run's epsilon composes both. The cached
weights (one per training example) and their diagnostics are, like the training data and
metrics, not for release: they stay in the workdir.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from fairgen import data
from fairgen import storage
from fairgen.classifiers import backbones
from fairgen.config import require
from fairgen.fairness import density_ratio
from fairgen.fairness.registry import METHODS, Method
from fairgen.models.classifier import Classifier

RATIO_DIR = "density_ratio"


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
      seed=int(fair.ratio.seed), augment_shift=int(fair.ratio.augment_shift),
      privacy=density_ratio.ratio_privacy(config, len(source)))
  log_odds = density_ratio.classifier_log_odds(model, params, images)
  weights = density_ratio.importance_weights(log_odds, is_ref, float(fair.alpha),
                                             float(fair.clip) or None)
  if source.spec.num_groups:
    groups = data.read_column(source, "attr").astype(np.int32)
    info["diagnostics"] = density_ratio.weight_diagnostics(weights, groups, is_ref,
                                                           source.spec.num_groups)
  return weights, info


def cached_weights(config: ml_collections.ConfigDict, source: data.Source,
                       workdir: str) -> np.ndarray:
  """The run's importance weights: read from ``WORKDIR/density_ratio/``, else fitted there.

  The weights are saved once (``weights.npy`` + ``info.json``, written atomically), so a
  resumed run reuses exactly the weights it started with.
  """
  directory = os.path.join(workdir, RATIO_DIR)
  path = os.path.join(directory, "weights.npy")
  if storage.exists(path):
    weights = storage.load_npy(path)
    if weights.shape != (len(source),):
      raise data.DataError(
          f"{path} holds {weights.shape} weights, the training split has {len(source)} "
          f"examples: the data changed since this workdir was started. Use a new workdir.")
    return weights
  start = time.perf_counter()
  weights, info = fit_importance_weights(config, source)
  info["seconds"] = round(time.perf_counter() - start, 2)
  if jax.process_index() == 0:
    storage.write_atomic(os.path.join(directory, "info.json"),
                         json.dumps(info, indent=2, sort_keys=True))
    storage.save_npy(path, weights)  # Last: its presence means the fit is complete.
  logging.info("Importance weights fitted in %.1f s: %s", info["seconds"],
               info.get("diagnostics"))
  return weights


DEFAULTS = {
    # w**alpha; clip > 0 clips w to [1/clip, clip] (0: no clipping).
    "alpha": 1.0,
    "clip": 0.0,
    # The density-ratio classifier (fairgen/fairness/density_ratio.py). With a privacy
    # section it trains by DP-SGD (privacy.clip_norm, this noise multiplier, Poisson
    # batches of batch_size on average) and its epsilon is part of the run's.
    "ratio": dict(steps=1000, batch_size=64, lr=1e-3, width=16, feature_dim=64,
                  dropout=0.25, augment_shift=2, seed=0, noise_multiplier=3.0),
}


def check_section(fair: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for an impossible ``fair.alpha``, ``fair.clip`` or ``fair.ratio``."""
  require(fair.alpha >= 0, f"fair.alpha must be >= 0, got {fair.alpha}.")
  require(fair.clip == 0 or fair.clip >= 1, "fair.clip must be 0 (off) or >= 1.")
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


def check(config: ml_collections.ConfigDict) -> None:
  """Needs both sets (``subset='union'``); with privacy, bounded weights (``fair.clip``)."""
  require(config.data.options.get("subset") == "union",
          "fair.method='importance' needs both sets: data.options.subset='union'.")
  if "privacy" in config:
    require(config.fair.clip > 0, "fair.method='importance' with privacy needs fair.clip > 0: "
            "the weights must be bounded for each example's contribution to stay within "
            "privacy.clip_norm.")


def weight_bound(config: ml_collections.ConfigDict) -> float:
  """The largest weight: ``fair.clip`` (weights are clipped to [1/clip, clip]); 0 means
  unbounded: inf."""
  return float(config.fair.clip) if config.fair.clip else float("inf")


def private_prior(config: ml_collections.ConfigDict, num_examples: int
                  ) -> tuple[tuple[float, float, int, int], ...]:
  """The DP density-ratio classifier's mechanism, spent before the run's first step."""
  ratio = density_ratio.ratio_privacy(config, num_examples)
  if ratio is None:
    return ()
  return ((ratio.noise_multiplier, ratio.sampling_rate, ratio.num_steps, ratio.batch_size),)


def prepare(config: ml_collections.ConfigDict, source: data.Source, workdir: str,
            global_batch: int) -> tuple[data.Source, None]:
  """The source with a ``weight`` column (the cached importance weights)."""
  del global_batch  # The loader's own sampler draws the batches.
  weights = cached_weights(config, source, workdir)
  return data.SubsetSource(source, columns={"weight": weights}), None


METHODS.register("importance")(Method(
    summary="Choi et al. 2020: density-ratio weights on each biased example's real-data loss",
    defaults=DEFAULTS, check_section=check_section, check=check, prepare=prepare,
    weight_bound=weight_bound, private_prior=private_prior))
