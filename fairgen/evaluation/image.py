"""Image-quality and likelihood evaluators: FID, KID, IS, precision/recall/density/coverage.

FID, KID and PRDC compare backbone features of generated samples with those of the real
held-out images; IS uses the backbone's class probabilities (``fairgen.classifiers``).
``likelihood`` gives a VAE's test negative ELBO and IWAE bound. ``tstr_images``: train on
synthetic, test on real (the utility measure of DP generative models).
"""

from __future__ import annotations

import jax
import numpy as np

from fairgen import data
from fairgen import experiment
from fairgen import parallel
from fairgen import sampling
from fairgen.classifiers import fit
from fairgen.evaluation.context import EvalContext, EvalError, Scalars
from fairgen.evaluation.registry import EVALUATORS, Entry
from fairgen.metrics import likelihood
from fairgen.metrics import quality
from fairgen.models.vae import VAE


def fid(ctx: EvalContext) -> Scalars:
  """Fréchet distance between backbone features of generated and real held-out images
  (or the Gaussian of ``eval.reference_stats``)."""
  fake = quality.FeatureStats()
  fake.update(ctx.fake_outputs[0])
  yield "fid", quality.frechet_distance(*ctx.real.moments(), fake.mean(), fake.cov())


def kid(ctx: EvalContext) -> Scalars:
  """Kernel distance (unbiased MMD^2, cubic polynomial kernel) over random subsets."""
  mean, std = quality.kernel_inception_distance(
      ctx.real.outputs[0], ctx.fake_outputs[0], num_subsets=ctx.cfg.kid_subsets,
      subset_size=ctx.cfg.kid_subset_size, seed=ctx.cfg.seed)
  yield "kid", mean
  yield "kid_std", std


def inception_score(ctx: EvalContext) -> Scalars:
  """Inception Score with the backbone's classifier."""
  mean, std = quality.inception_score(ctx.fake_outputs[1], num_splits=ctx.cfg.is_splits)
  yield "is", mean
  yield "is_std", std


def prdc(ctx: EvalContext) -> Scalars:
  """k-NN precision/recall (Kynkäänniemi 2019) and density/coverage (Naeem 2020)."""
  values = quality.prdc(ctx.real.outputs[0], ctx.fake_outputs[0], nearest_k=ctx.cfg.prdc_k)
  for name in ("precision", "recall", "density", "coverage"):
    yield name, values[name]


def vae_likelihood(ctx: EvalContext) -> Scalars:
  """Test likelihood, nats per example and bits/dim: a VAE's negative ELBO, its distortion
  and rate terms and its IWAE bound; for other likelihood models (``Objective.nll``:
  diffusion's variational bound, an autoregressive model's exact NLL) their own terms."""
  model = experiment.build_model(ctx.config, ctx.exp.spec)
  objective = ctx.exp.objective
  if not isinstance(model, VAE):
    if objective.nll is None:
      raise EvalError(f"The 'likelihood' evaluator needs a likelihood model (a VAE, DDPM "
                      f"or autoregressive model); model.name={ctx.config.model.name!r} is "
                      f"not one.")
    state = parallel.to_host(ctx.state)  # Also when sharded (mesh.fsdp).
    columns = ("image", objective.condition_key) if objective.num_classes else ("image",)
    values = likelihood.evaluate_nll(
        lambda state, batch, keys: objective.nll(state, batch, keys, ctx.cfg.iwae_k),
        state, ctx.real.source, columns=columns, batch_size=ctx.cfg.batch_size,
        seed=ctx.cfg.seed, max_examples=ctx.cfg.likelihood_examples or None)
    for name, value in values.items():
      if name != "num_examples":
        yield name, value
    return
  params = parallel.to_host(ctx.state["params"])  # Also when sharded (mesh.fsdp).
  values = likelihood.evaluate_likelihood(
      model, params, ctx.real.source, num_samples=ctx.cfg.iwae_k,
      batch_size=ctx.cfg.batch_size, seed=ctx.cfg.seed,
      max_examples=ctx.cfg.likelihood_examples or None)
  for name in ("neg_elbo", "distortion", "rate", "nll_iwae", "bits_per_dim"):
    yield name, values[name]


def tstr_images(ctx: EvalContext) -> Scalars:
  """Accuracy on the real held-out images of a CNN classifier trained on ``eval.num_samples``
  synthetic ones (``eval.tstr_steps`` Adam steps, ``fit.train_classifier``'s defaults).

  The labels are the generator's own for a class-conditional model (balanced classes);
  otherwise the eval backbone's predictions (pseudo-labels, ``tstr_pseudo_labelled`` = 1).
  With ``eval.generator='train_data'`` the classifier trains on real training images with
  their labels: the train-on-real reference.
  """
  spec, n = ctx.exp.spec, int(ctx.cfg.num_samples)
  objective, pseudo = ctx.exp.objective, 0.0
  if ctx.cfg.generator == "train_data":
    train = data.load(ctx.config.data, ctx.config.data.split)
    idx = np.random.default_rng(ctx.cfg.seed + 1).permutation(len(train))[:n]
    rows = train.get(idx)
    images, labels = rows["image"], rows["label"]
  elif objective.num_classes and objective.condition_key == "label":
    labels = (np.arange(n) % objective.num_classes).astype(np.int32)
    images, _ = sampling.generate_images(ctx.exp, ctx.state, jax.random.key(ctx.cfg.seed), n,
                                         labels=labels, batch_size=ctx.cfg.batch_size)
  else:
    images, labels, pseudo = ctx.fake_images, np.argmax(ctx.fake_outputs[1], axis=1), 1.0
  synthetic = data.ArraySource(spec, {"image": np.asarray(images, np.float32),
                                      "label": np.asarray(labels, np.int32)})
  _, info = fit.train_classifier(synthetic, ctx.real.source, num_classes=spec.num_classes,
                                 steps=int(ctx.cfg.get("tstr_steps", 1000)), seed=ctx.cfg.seed)
  yield "tstr_accuracy", info["test_accuracy"]
  yield "tstr_pseudo_labelled", pseudo


EVALUATORS.register("fid")(Entry(fid, needs_backbone=True))
EVALUATORS.register("kid")(Entry(kid, needs_backbone=True))
EVALUATORS.register("is")(Entry(inception_score, needs_backbone=True))
EVALUATORS.register("prdc")(Entry(prdc, needs_backbone=True))
EVALUATORS.register("likelihood")(Entry(vae_likelihood))
EVALUATORS.register("tstr_images")(Entry(tstr_images, needs_backbone=True))
