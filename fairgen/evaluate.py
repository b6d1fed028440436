"""Evaluators as plug-ins, the evaluation runner, and ``--mode=evaluate``.

An evaluator is a function ``(ctx: EvalContext) -> iterable of (name, value)``, registered in
``EVALUATORS`` and listed in ``config.eval.metrics``. The context generates the samples,
loads the real held-out images and the feature backbone once, and caches features, so FID,
KID, precision/recall and IS share one pass. The same ``Evaluator`` runs periodically during
training (``eval.every_steps``) and in ``--mode=evaluate``, which writes
``WORKDIR/eval/step_NNNNNN.json``.

``eval.generator='train_data'`` evaluates training images in place of generated ones: the
"copy of the training data" upper bound that a generator's numbers should be read against.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np
from absl import logging

from fairgen import data
from fairgen import fair
from fairgen import fair_eval
from fairgen import objectives
from fairgen import sampling
from fairgen import tabular_eval
from fairgen.metrics import backbones
from fairgen.metrics import fairness
from fairgen.metrics import likelihood
from fairgen.metrics import quality
from fairgen.registry import Registry

Scalars = Iterable[tuple[str, float]]
EVALUATORS: Registry[Callable[["EvalContext"], Scalars]] = Registry("evaluator")
GENERATORS = ("model", "train_data")


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
  def batch(self) -> dict[str, np.ndarray]:
    # A seeded random subset, in random order: dataset files are often sorted by class.
    n = min(len(self.source), self.config.eval.num_samples)
    idx = np.random.default_rng(self.config.eval.seed).permutation(len(self.source))[:n]
    return self.source.get(idx)

  @property
  def images(self) -> np.ndarray:
    return self.batch["image"]

  @property
  def backbone(self) -> backbones.Backbone:
    if self._backbone is None:
      cfg = self.config.eval
      data_cfg = self.config.data
      path = cfg.backbone_dir or backbones.default_classifier_dir(data.cache_tag(data_cfg))
      extra = {"subset": "all"} if "subset" in data_cfg.options else None
      self._backbone = backbones.load_backbone_or_explain(
          cfg.backbone, path, backbones.train_command(data_cfg, "label", extra))
    return self._backbone

  @functools.cached_property
  def attribute_classifier(self) -> backbones.Backbone:
    """The frozen classifier that assigns samples to groups (``fair.attribute_classifier``)."""
    return fair.attribute_classifier(self.config)

  @functools.cached_property
  def outputs(self) -> tuple[np.ndarray, np.ndarray]:
    return self.backbone.features_and_probs(self.images)


class EvalContext:
  """What the evaluators of one evaluation share; everything is computed on first use.

  ``out_dir``: where evaluators may write files (charts), or None to write none.
  """

  def __init__(self, exp: Any, state: Any, real: RealData, step: int,
               out_dir: str | None = None):
    self.exp, self.state, self.real, self.step = exp, state, real, step
    self.config = exp.config
    self.cfg = exp.config.eval
    self.out_dir = out_dir

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
    return self.real.backbone.features_and_probs(self.fake_images)


@EVALUATORS.register("fid")
def fid(ctx: EvalContext) -> Scalars:
  """Fréchet distance between backbone features of generated and real held-out images."""
  yield "fid", quality.fid_from_features(ctx.real.outputs[0], ctx.fake_outputs[0])


@EVALUATORS.register("kid")
def kid(ctx: EvalContext) -> Scalars:
  """Kernel distance (unbiased MMD^2, cubic polynomial kernel) over random subsets."""
  mean, std = quality.kernel_inception_distance(
      ctx.real.outputs[0], ctx.fake_outputs[0], num_subsets=ctx.cfg.kid_subsets,
      subset_size=ctx.cfg.kid_subset_size, seed=ctx.cfg.seed)
  yield "kid", mean
  yield "kid_std", std


@EVALUATORS.register("is")
def inception_score(ctx: EvalContext) -> Scalars:
  """Inception Score with the backbone's classifier."""
  mean, std = quality.inception_score(ctx.fake_outputs[1], num_splits=ctx.cfg.is_splits)
  yield "is", mean
  yield "is_std", std


@EVALUATORS.register("prdc")
def prdc(ctx: EvalContext) -> Scalars:
  """k-NN precision/recall (Kynkäänniemi 2019) and density/coverage (Naeem 2020)."""
  values = quality.prdc(ctx.real.outputs[0], ctx.fake_outputs[0], nearest_k=ctx.cfg.prdc_k)
  for name in ("precision", "recall", "density", "coverage"):
    yield name, values[name]


@EVALUATORS.register("likelihood")
def vae_likelihood(ctx: EvalContext) -> Scalars:
  """Test negative ELBO and IWAE NLL (nats per example) and bits/dim, for VAEs."""
  if ctx.config.objective.name != "vae":
    raise EvalError("The 'likelihood' evaluator needs a VAE (objective.name='vae').")
  model = objectives.build_model(ctx.config, ctx.exp.spec)
  params = jax.device_get(ctx.state["params"])
  values = likelihood.evaluate_likelihood(
      model, params, ctx.real.source, num_samples=ctx.cfg.iwae_k,
      batch_size=ctx.cfg.batch_size, seed=ctx.cfg.seed,
      max_examples=ctx.cfg.likelihood_examples or None)
  for name in ("neg_elbo", "nll_iwae", "bits_per_dim"):
    yield name, values[name]


@EVALUATORS.register("classification_fairness")
def classification_fairness(ctx: EvalContext) -> Scalars:
  """Accuracy and group-fairness of a classifier's decisions (P(y=1) > 0.5) on the eval split.

  AIF360 sign conventions (unprivileged minus privileged; attr 1 is privileged), see
  ``fairgen/metrics/fairness.py``.
  """
  predict = ctx.exp.objective.predict
  if predict is None:
    raise EvalError(f"The 'classification_fairness' evaluator needs an objective that "
                    f"trains a classifier; {ctx.config.objective.name!r} does not.")
  source = ctx.real.source
  fn = jax.jit(predict)
  probs, labels, attrs = [], [], []
  for start in range(0, len(source), ctx.cfg.batch_size):
    batch = source.get(np.arange(start, min(start + ctx.cfg.batch_size, len(source))))
    probs.append(np.asarray(fn(ctx.state, {k: batch[k] for k in ("features", "attr")})))
    labels.append(batch["label"])
    attrs.append(batch["attr"])
  y_pred = (np.concatenate(probs) > 0.5).astype(np.int32)
  report = fairness.classification_report(np.concatenate(labels), y_pred,
                                          np.concatenate(attrs))
  yield from report.items()


EVALUATORS.register("vfae_probe")(tabular_eval.vfae_probe)
EVALUATORS.register("tstr")(tabular_eval.tstr)
EVALUATORS.register("fairness_discrepancy")(fair_eval.fairness_discrepancy)
EVALUATORS.register("group_quality")(fair_eval.group_quality)
_FAIRNESS = ("fairness_discrepancy", "group_quality")


def _needs_backbone(names: Iterable[str]) -> bool:
  return any(n in ("fid", "kid", "is", "prdc", "group_quality") for n in names)


class Evaluator:
  """Runs ``config.eval.metrics`` on train states; real-data features are computed once."""

  def __init__(self, exp: Any, out_dir: str | None = None):
    self.exp = exp
    self.out_dir = out_dir
    self.cfg = exp.config.eval
    if self.cfg.generator not in GENERATORS:
      raise EvalError(f"eval.generator must be one of {GENERATORS}, got {self.cfg.generator!r}.")
    self.evaluators = [(name, EVALUATORS.get(name)) for name in self.cfg.metrics]
    self.real = RealData(exp.config)

  def check(self) -> None:
    """Loads what the evaluators need now, so a missing backbone fails before training."""
    if _needs_backbone(self.cfg.metrics):
      self.real.backbone  # pylint: disable=pointless-statement
    if any(n in _FAIRNESS for n in self.cfg.metrics):
      # Loads the attribute classifier and checks fair.target against its groups.
      fair_eval.describe(self.exp.config, self.real.attribute_classifier)

  def __call__(self, state: Any, step: int) -> dict[str, float]:
    ctx = EvalContext(self.exp, state, self.real, step, self.out_dir)
    results: dict[str, float] = {}
    for name, fn in self.evaluators:
      start = time.perf_counter()
      for key, value in fn(ctx):
        results[key] = float(value)
      logging.info("Evaluator %s took %.1f s.", name, time.perf_counter() - start)
    return results

  def provenance(self) -> dict[str, Any]:
    """Which backbone, data and sample count produced the numbers."""
    out = {"num_samples": self.cfg.num_samples, "generator": self.cfg.generator,
           "real_split": self.exp.config.data.eval_split, "seed": self.cfg.seed}
    if _needs_backbone(self.cfg.metrics):
      out["backbone"] = self.real.backbone.describe()
      out["num_real"] = len(self.real.images)
    if "likelihood" in self.cfg.metrics:
      out["iwae_k"] = self.cfg.iwae_k
    if any(n in _FAIRNESS for n in self.cfg.metrics):
      out.update(fair_eval.describe(self.exp.config, self.real.attribute_classifier))
    return out


def format_table(results: dict[str, float]) -> str:
  """A two-column text table of metric values."""
  width = max((len(k) for k in results), default=6)
  return "\n".join([f"{'metric':<{width}}  value", "-" * (width + 14)] +
                   [f"{k:<{width}}  {v:.6g}" for k, v in results.items()])


def write_report(path: str, step: int, checkpoint: str, results: dict[str, float],
                 provenance: dict[str, Any]) -> None:
  """Writes one evaluation as JSON (atomically)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"step": step, "checkpoint": checkpoint, "metrics": results,
               "provenance": provenance, "time": time.time()}, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
