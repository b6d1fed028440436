"""Image-quality and likelihood evaluators: FID, KID, IS, precision/recall/density/coverage.

FID, KID and PRDC compare backbone features of generated samples with those of the real
held-out images; IS uses the backbone's class probabilities (``fairgen.classifiers``).
``likelihood`` gives a VAE's test negative ELBO and IWAE bound.
"""

from __future__ import annotations

from fairgen import experiment
from fairgen import parallel
from fairgen.evaluation.context import EvalContext, EvalError, Scalars
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
  """Test negative ELBO and IWAE NLL (nats per example) and bits/dim, for VAEs."""
  model = experiment.build_model(ctx.config, ctx.exp.spec)
  if not isinstance(model, VAE):
    raise EvalError(f"The 'likelihood' evaluator needs a VAE model; model.name="
                    f"{ctx.config.model.name!r} is not one.")
  params = parallel.to_host(ctx.state["params"])  # Also when sharded (mesh.fsdp).
  values = likelihood.evaluate_likelihood(
      model, params, ctx.real.source, num_samples=ctx.cfg.iwae_k,
      batch_size=ctx.cfg.batch_size, seed=ctx.cfg.seed,
      max_examples=ctx.cfg.likelihood_examples or None)
  for name in ("neg_elbo", "nll_iwae", "bits_per_dim"):
    yield name, values[name]
