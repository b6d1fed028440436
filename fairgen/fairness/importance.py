"""Importance weighting (Choi et al. 2020): per-example weights from a density-ratio classifier.

The classifier (``density_ratio.fit_density_ratio``) tells the reference set from the biased
set; its odds estimate ``w(x) = p_ref(x) / p_bias(x)``, flattened to ``w ** fair.alpha`` and
optionally clipped. The weights are fitted once per run and cached in
``WORKDIR/density_ratio/`` so that a resumed run reuses exactly the weights it started with.

In a DP run (a ``privacy`` section) the classifier sees the same private data as the
generative model, so it trains by DP-SGD too (``ratio_privacy``), and each weight is a
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
from fairgen import privacy
from fairgen import storage
from fairgen.classifiers import backbones
from fairgen.fairness import density_ratio
from fairgen.models.classifier import Classifier

RATIO_DIR = "density_ratio"


def _ratio_model(cfg: Any) -> Classifier:
  return backbones.classifier_model({"num_classes": 2, "width": cfg.width,
                                     "feature_dim": cfg.feature_dim, "dropout": cfg.dropout})


def ratio_privacy(config: ml_collections.ConfigDict, num_examples: int
                  ) -> privacy.DpSettings | None:
  """The DP-SGD settings of the density-ratio classifier: None unless the config has a
  privacy section and uses importance weighting. Its clip is ``privacy.clip_norm``, its noise
  ``fair.ratio.noise_multiplier``, its Poisson batches ``fair.ratio.batch_size`` examples on
  average (padded by ``privacy.padded_batch_size``) from all ``num_examples``."""
  if "privacy" not in config or "fair" not in config or config.fair.method != "importance":
    return None
  p = {**privacy.DEFAULTS, **config.privacy.to_dict()}  # A section may give some keys only.
  ratio = config.fair.ratio
  expected = int(ratio.batch_size)
  section = {"clip_norm": p["clip_norm"], "noise_multiplier": ratio.noise_multiplier,
             "expected_batch_size": expected, "delta": p["delta"],
             "accountant": p["accountant"]}
  return privacy.resolve_section(section, num_examples, privacy.padded_batch_size(expected),
                                 int(ratio.steps), prefix="fair.ratio.")


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
      privacy=ratio_privacy(config, len(source)))
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
