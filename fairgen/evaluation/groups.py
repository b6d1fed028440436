"""Fairness evaluators of generative models: fairness discrepancy and per-group quality.

Both use the frozen *attribute classifier* (``fairness.attribute_classifier``: trained
by ``tools/train_classifier.py --label=attr`` on the balanced data; loaded once per run,
with the real data, as ``ctx.real.attribute_classifier``) to assign each generated
sample to a group, and ``fair.target`` (uniform by default) as the target distribution.

- ``fairness_discrepancy``: ``fd_l2``, ``fd_l1``, ``fd_kl`` between the generated group
  distribution (hard labels over ``eval.num_samples`` samples) and the target, each with a
  bootstrap standard deviation (``<key>_std``, ``fair.bootstrap`` resamples of the
  samples), plus the generated share of every group (``group_share_<g>``). Writes the group
  proportion bar chart ``groups_step_NNNNNN.png`` where the evaluation has an output folder.
- ``group_quality``: for every group ``g``, FID, precision and recall of the generated
  samples classified as ``g`` against the real held-out samples of group ``g``, so a
  method that is fair but degrades or collapses one group shows it. Every group is scored
  on the same number of samples, ``min(fair.group_samples, real samples of g)``, drawing
  more generated samples (up to 20 rounds of ``eval.num_samples``) until the rarest group
  has that many. A group the generator (almost) never produces gets ``n_gen_group_<g>``
  and no quality numbers.
- ``cleam``: the generated group shares and FD corrected for the attribute classifier's
  errors (CLEAM, ``fairgen.metrics.cleam``), beside the naive ones, each share with its 95%
  interval over ``eval.cleam_batches`` batches of the samples. The classifier's confusion
  matrix is estimated on the real held-out examples (their ``attr`` labels), and its
  per-group accuracies are reported as ``classifier_accuracy_<g>``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import numpy as np

from fairgen import fairness
from fairgen import sampling
from fairgen.classifiers import backbones
from fairgen.evaluation.context import EvalContext, EvalError, Scalars
from fairgen.evaluation.registry import EVALUATORS, Entry
from fairgen.metrics import cleam as cleam_lib
from fairgen.metrics import fairness_discrepancy as fd_lib
from fairgen.metrics import quality

MAX_ROUNDS = 20


def _fair_value(config: Any, key: str, default: Any) -> Any:
  return config.fair.get(key, default) if "fair" in config else default


class _Groups:
  """The attribute classifier's view of one evaluation's samples (cached per context)."""

  def __init__(self, ctx: EvalContext):
    self.ctx = ctx
    self.classifier = ctx.real.attribute_classifier
    self.num_groups = self.classifier.num_classes
    self.target = fairness.target_distribution(ctx.config, self.num_groups)

  def predict(self, images: np.ndarray) -> np.ndarray:
    return np.argmax(self.classifier.probs(images), axis=-1).astype(np.int32)

  @functools.cached_property
  def fake(self) -> np.ndarray:
    return self.predict(self.ctx.fake_images)


def _groups(ctx: EvalContext) -> _Groups:
  """The context's ``_Groups``, made once and shared by both evaluators."""
  return ctx.shared("groups", lambda: _Groups(ctx))


def fairness_discrepancy(ctx: EvalContext) -> Scalars:
  """FD-L2/L1/KL of the generated groups from the target, with bootstrap spreads."""
  groups = _groups(ctx)
  preds, g = groups.fake, groups.num_groups
  dist = fd_lib.group_distribution(preds, g)
  values = fd_lib.discrepancy(dist, groups.target)
  resamples = int(_fair_value(ctx.config, "bootstrap", 200))
  for key, value in values.items():
    yield key, value
    if resamples >= 2:
      _, std, _ = fd_lib.bootstrap(
          lambda p, key=key: fd_lib.discrepancy(fd_lib.group_distribution(p, g),
                                                groups.target)[key],
          preds, num_resamples=resamples, seed=ctx.cfg.seed)
      yield f"{key}_std", std
  for k in range(g):
    yield f"group_share_{k}", float(dist[k])
  if ctx.out_dir and jax.process_index() == 0:
    fd_lib.group_proportions_chart(
        dist, groups.target, os.path.join(ctx.out_dir, f"groups_step_{ctx.step:06d}.png"))


def _generated_features_by_group(ctx: EvalContext, groups: _Groups, need: np.ndarray
                                 ) -> list[np.ndarray]:
  """Backbone features of generated samples split by predicted group.

  The evaluation's samples (whose features ``ctx.fake_outputs`` already holds) come first;
  more are drawn until each group ``g`` has ``need[g]``. Returns at most ``need[g]`` rows
  per group.
  """
  features, preds = [ctx.fake_outputs[0]], [groups.fake]
  counts = np.bincount(groups.fake, minlength=groups.num_groups)
  rounds = 1
  while (ctx.cfg.generator == "model" and np.any(counts < need) and rounds < MAX_ROUNDS):
    extra, _ = sampling.generate_images(
        ctx.exp, ctx.state, jax.random.fold_in(jax.random.key(ctx.cfg.seed), rounds),
        ctx.cfg.num_samples, truncation=ctx.cfg.truncation, batch_size=ctx.cfg.batch_size)
    p = groups.predict(extra)
    features.append(ctx.real.backbone.features(extra))
    preds.append(p)
    counts += np.bincount(p, minlength=groups.num_groups)
    rounds += 1
  features, preds = np.concatenate(features), np.concatenate(preds)
  return [features[preds == k][:need[k]] for k in range(groups.num_groups)]


def group_quality(ctx: EvalContext) -> Scalars:
  """Per-group FID, precision and recall: generated group g against real group g."""
  groups = _groups(ctx)
  real_attr = np.asarray(ctx.real.batch["attr"], np.int32)
  real_feats = ctx.real.outputs[0]
  per_group = int(_fair_value(ctx.config, "group_samples", 500))
  real_counts = np.bincount(real_attr, minlength=groups.num_groups)
  need = np.minimum(real_counts, per_group)
  fakes = _generated_features_by_group(ctx, groups, need)
  k = ctx.cfg.prdc_k
  fids = []
  for g in range(groups.num_groups):
    n = min(len(fakes[g]), int(need[g]))
    yield f"n_gen_group_{g}", float(len(fakes[g]))
    if n < max(k + 1, 2) or real_counts[g] < k + 1:
      continue  # Too few samples of this group for any of the three numbers.
    real_g = real_feats[real_attr == g][:n]
    fake_g = fakes[g][:n]
    fid = quality.fid_from_features(real_g, fake_g)
    fids.append(fid)
    values = quality.prdc(real_g, fake_g, nearest_k=k)
    yield f"fid_group_{g}", fid
    yield f"precision_group_{g}", values["precision"]
    yield f"recall_group_{g}", values["recall"]
  if len(fids) == groups.num_groups:
    yield "fid_group_max", max(fids)


def cleam(ctx: EvalContext) -> Scalars:
  """Naive and CLEAM-corrected group shares (with 95% intervals) and fairness discrepancies."""
  groups = _groups(ctx)
  k = groups.num_groups
  true, predicted = [], []
  for chunk in ctx.real.chunks():  # One pass: each chunk's labels and predictions.
    true.append(np.asarray(chunk["attr"], np.int64))
    predicted.append(groups.predict(chunk["image"]))
  true, predicted = np.concatenate(true), np.concatenate(predicted)
  try:
    confusion = cleam_lib.confusion_matrix(true, predicted, k)
    out = cleam_lib.estimate(
        cleam_lib.batch_proportions(groups.fake, k, ctx.cfg.cleam_batches), confusion)
  except ValueError as e:
    raise EvalError(f"cleam: {e}") from None
  for g in range(k):
    yield f"classifier_accuracy_{g}", confusion[g, g]
    for key in ("naive", "naive_low", "naive_high", "cleam", "cleam_low", "cleam_high"):
      yield f"{key}_share_{g}", out[key][g]
  for name, values in (("naive", fd_lib.discrepancy(out["naive"], groups.target)),
                       ("cleam", cleam_lib.corrected_discrepancy(out["cleam"], groups.target))):
    for key, value in values.items():
      yield f"{name}_{key}", value


def describe(config: Any, classifier: backbones.Backbone) -> dict[str, Any]:
  """Provenance of the fairness numbers: the attribute classifier and the target."""
  return {"attribute_classifier": classifier.describe(),
          "target": fairness.target_distribution(config, classifier.num_classes).tolist()}


EVALUATORS.register("fairness_discrepancy")(Entry(fairness_discrepancy,
                                                  needs_attribute_classifier=True))
EVALUATORS.register("group_quality")(Entry(group_quality, needs_backbone=True,
                                           needs_attribute_classifier=True))
EVALUATORS.register("cleam")(Entry(cleam, needs_attribute_classifier=True))
