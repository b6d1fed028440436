"""Privacy audits of a trained model: membership inference and memorisation.

- ``membership``: a threshold attack on ``Objective.member_score`` (the discriminator's
  logit, the VAE's ELBO) of ``eval.audit_examples`` training members against as many
  held-out non-members (the eval split). Reports ``membership_auc`` (0.5: chance) and
  ``membership_advantage`` (max TPR - FPR). DP should bring both towards chance.
- ``memorisation``: pixel-space nearest-neighbour distances of ``eval.num_samples``
  samples to the training images, against those of ``eval.audit_examples`` held-out real
  images. Reports ``near_copy_fraction`` (samples closer to a training image than 99% of
  held-out images are to theirs; fresh data: about 0.01), the median distances
  ``nn_dist_samples`` and ``nn_dist_heldout``, and their ratio ``nn_dist_ratio``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fairgen import data
from fairgen.evaluation.context import EvalContext, EvalError, Scalars
from fairgen.evaluation.registry import EVALUATORS, Entry
from fairgen.metrics import privacy_audit


def _train_source(ctx: EvalContext) -> data.Source:
  return ctx.shared("train_source", lambda: data.load(ctx.config.data, ctx.config.data.split))


def _subset(source: data.Source, num: int, seed: int) -> dict[str, np.ndarray]:
  idx = np.sort(np.random.default_rng(seed).permutation(len(source))[:num])
  return source.get(idx)


def _scores(ctx: EvalContext, score: Any, examples: dict[str, np.ndarray]) -> np.ndarray:
  """``score(state, images, labels)`` (jitted once by the caller) of ``examples``."""
  objective = ctx.exp.objective
  fn = functools.partial(score, ctx.state)
  key = objective.condition_key if objective.num_classes else "label"
  out = []
  for start in range(0, len(examples["image"]), ctx.cfg.batch_size):
    part = slice(start, start + ctx.cfg.batch_size)
    labels = jnp.asarray(examples[key][part], jnp.int32)
    out.append(np.asarray(fn(jnp.asarray(examples["image"][part]), labels)))
  return np.concatenate(out)


def membership(ctx: EvalContext) -> Scalars:
  """Membership-inference AUC and advantage (see the module docstring)."""
  if ctx.exp.objective.member_score is None or ctx.state is None:
    raise EvalError("The 'membership' evaluator needs a trained model whose objective has a "
                    "membership score (the 'gan' and 'vae' objectives).")
  train, heldout = _train_source(ctx), ctx.real.source
  n = min(ctx.cfg.get("audit_examples", 1000), len(train), len(heldout))
  # The state is an argument, not a constant baked in: both sets share one compilation.
  score = jax.jit(ctx.exp.objective.member_score)
  members = _scores(ctx, score, _subset(train, n, ctx.cfg.seed + 11))
  nonmembers = _scores(ctx, score, _subset(heldout, n, ctx.cfg.seed + 12))
  yield "membership_auc", privacy_audit.roc_auc(members, nonmembers)
  yield "membership_advantage", privacy_audit.attack_advantage(members, nonmembers)


def memorisation(ctx: EvalContext) -> Scalars:
  """Near copies of training images among the samples (see the module docstring)."""
  train_images = ctx.shared("train_images", lambda: _train_source(ctx).get(
      np.arange(len(_train_source(ctx))))["image"])
  heldout = _subset(ctx.real.source, min(ctx.cfg.get("audit_examples", 1000), len(ctx.real.source)),
                    ctx.cfg.seed + 12)["image"]
  sample_d = privacy_audit.nearest_distances(ctx.fake_images, train_images)
  heldout_d = privacy_audit.nearest_distances(heldout, train_images)
  yield "near_copy_fraction", privacy_audit.near_copy_fraction(sample_d, heldout_d)
  yield "nn_dist_samples", float(np.median(sample_d))
  yield "nn_dist_heldout", float(np.median(heldout_d))
  yield "nn_dist_ratio", float(np.median(sample_d) / max(np.median(heldout_d), 1e-12))


EVALUATORS.register("membership")(Entry(membership))
EVALUATORS.register("memorisation")(Entry(memorisation))
