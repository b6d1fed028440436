"""What the evaluators of one evaluation share: the real data, the samples and the errors.

An evaluator is a function ``(ctx: EvalContext) -> iterable of (name, value)``. The context
generates the samples, loads the real held-out data and the feature backbone once, and
caches features, so FID, KID, precision/recall and IS share one pass.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Iterator

import jax
import ml_collections
import numpy as np

from fairgen import data
from fairgen import experiment
from fairgen import fairness
from fairgen import sampling
from fairgen.classifiers import backbones
from fairgen.evaluation import reference_stats
from fairgen.metrics import quality

Scalars = Iterable[tuple[str, float]]


class EvalError(ValueError):
  """An evaluation cannot run as configured; the message says what to change."""


class RealData:
  """Held-out real images and their backbone outputs, loaded once per run."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self._backbone = None

  @functools.cached_property
  def source(self) -> data.Source:
    return data.load_eval(self.config.data)

  @functools.cached_property
  def indices(self) -> np.ndarray:
    """The evaluated examples: a seeded random subset of ``eval.num_samples``, in random
    order (dataset files are often sorted by class)."""
    n = min(len(self.source), self.config.eval.num_samples)
    return np.random.default_rng(self.config.eval.seed).permutation(len(self.source))[:n]

  def chunks(self) -> Iterator[dict[str, np.ndarray]]:
    """The evaluated examples, ``eval.batch_size`` at a time (memory bounded by a chunk)."""
    size = self.config.eval.batch_size
    for start in range(0, len(self.indices), size):
      yield self.source.get(self.indices[start:start + size])

  @functools.cached_property
  def batch(self) -> dict[str, np.ndarray]:
    """Every field of the evaluated examples except the images (labels, attributes)."""
    parts = [{k: v for k, v in chunk.items() if k != "image"} for chunk in self.chunks()]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  @property
  def backbone(self) -> backbones.Backbone:
    if self._backbone is None:
      cfg = self.config.eval
      data_cfg = self.config.data
      if cfg.backbone == "inception_v3":
        try:
          self._backbone = backbones.load_backbone(
              cfg.backbone, cfg.inception_weights or backbones.default_inception_path(),
              resize=cfg.resize, quantize=cfg.quantize, devices=self.config.mesh.data)
        except ValueError as e:  # A file that is not the converted weights.
          raise EvalError(f"eval.inception_weights: {e}") from None
        return self._backbone
      path = cfg.backbone_dir or backbones.default_classifier_dir(data.cache_tag(data_cfg))
      extra = {"subset": "all"} if "subset" in data_cfg.options else None
      self._backbone = backbones.load_backbone_or_explain(
          cfg.backbone, path, backbones.train_command(data_cfg, "label", extra),
          devices=self.config.mesh.data)
    return self._backbone

  @functools.cached_property
  def reference(self) -> reference_stats.ReferenceStats | None:
    """``eval.reference_stats`` loaded and checked against the backbone, or None."""
    path = self.config.eval.reference_stats
    if not path:
      return None
    try:
      stats = reference_stats.load(path, self.backbone.feature_dim)
      reference_stats.check_backbone(stats, self.backbone.describe())
    except (FileNotFoundError, ValueError) as e:
      raise EvalError(f"eval.reference_stats: {e}") from None
    return stats

  def moments(self) -> tuple[np.ndarray, np.ndarray]:
    """FID's real-data Gaussian: from the statistics file where given, else from features."""
    if self.reference is not None:
      return self.reference.mu, self.reference.sigma
    stats = quality.FeatureStats()
    stats.update(self.outputs[0])
    return stats.mean(), stats.cov()

  @functools.cached_property
  def attribute_classifier(self) -> backbones.Backbone:
    """The frozen classifier that assigns samples to groups (``fairness.attribute_classifier``)."""
    return fairness.attribute_classifier(self.config)

  @functools.cached_property
  def outputs(self) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features and probabilities of the evaluated examples, streamed in chunks."""
    return _concat(self.backbone.features_and_probs(c["image"]) for c in self.chunks())


class EvalContext:
  """What the evaluators of one evaluation share; everything is computed on first use.

  ``out_dir``: where evaluators may write files (charts), or None to write none.
  """

  def __init__(self, exp: experiment.Experiment, state: Any, real: RealData, step: int,
               out_dir: str | None = None):
    self.exp, self.state, self.real, self.step = exp, state, real, step
    self.config = exp.config
    self.cfg = exp.config.eval
    self.out_dir = out_dir
    self._shared: dict[str, Any] = {}

  def shared(self, key: str, make: Any) -> Any:
    """A value several evaluators use, made by ``make()`` on first use in this evaluation."""
    if key not in self._shared:
      self._shared[key] = make()
    return self._shared[key]

  @functools.cached_property
  def fake_images(self) -> np.ndarray:
    n = self.cfg.num_samples
    if self.cfg.generator == "train_data":
      train = data.load(self.config.data, self.config.data.split)
      # Random order matters: IS splits consecutive samples, and files are class-sorted.
      idx = np.random.default_rng(self.cfg.seed + 1).permutation(len(train))[:n]
      return train.get(idx)["image"]
    images, _ = sampling.generate_images(
        self.exp, self.state, jax.random.key(self.cfg.seed), n, truncation=self.cfg.truncation,
        batch_size=self.cfg.batch_size)
    return images

  @functools.cached_property
  def fake_outputs(self) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features and probabilities of the samples. Generated samples stream through
    the backbone ``eval.batch_size`` at a time unless ``fake_images`` holds them already."""
    backbone = self.real.backbone
    if self.cfg.generator == "train_data" or "fake_images" in self.__dict__:
      return backbone.features_and_probs(self.fake_images)
    return _concat(backbone.features_and_probs(images) for images in sampling.iterate_images(
        self.exp, self.state, jax.random.key(self.cfg.seed), self.cfg.num_samples,
        truncation=self.cfg.truncation, batch_size=self.cfg.batch_size))


def _concat(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
  features, probs = zip(*pairs)
  return np.concatenate(features), np.concatenate(probs)
