"""Tests for fairgen.metrics.likelihood: ELBO, IWAE and the dataset evaluation loop."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fairgen import data
from fairgen.metrics import likelihood
from fairgen.models.vae import VAE

# Probabilistic PCA: x = W z + b + sigma * noise, z ~ N(0, I), D = 4 pixels, L = 2 latents.
_PPCA_SHAPE = (2, 2, 1)
_PPCA_SIGMA = 0.5
_PPCA_BIAS = np.array([0.1, -0.2, 0.3, 0.0])


def _ppca_weights() -> np.ndarray:
  """W [D, L] with orthogonal columns, so the exact posterior is diagonal."""
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 2)))
  return q * np.array([1.5, 0.8])


def _ppca_params(mean_scale: float = 1.0, mean_shift: float = 0.0,
                 var_scale: float = 1.0) -> dict:
  """Linear VAE params; with the defaults the encoder is the exact PPCA posterior.

  The exact posterior is N(M^-1 W^T (x - b), sigma^2 M^-1) with M = W^T W + sigma^2 I,
  diagonal here. The arguments perturb it into an approximate posterior.
  """
  w, b, sigma = _ppca_weights(), _PPCA_BIAS, _PPCA_SIGMA
  m_diag = np.diag(w.T @ w) + sigma**2
  enc_kernel = np.zeros((4, 4))
  enc_kernel[:, :2] = mean_scale * w / m_diag
  enc_bias = np.zeros(4)
  enc_bias[:2] = mean_scale * (-b @ w / m_diag) + mean_shift
  enc_bias[2:] = np.log(var_scale * sigma**2 / m_diag)
  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
  return {"decoder": {"Dense_0": {"kernel": f32(w.T), "bias": f32(b)}},
          "encoder": {"Dense_0": {"kernel": f32(enc_kernel), "bias": f32(enc_bias)}},
          "log_scale": f32([math.log(sigma)])}


@functools.lru_cache(maxsize=None)
def _ppca_model_and_data(num: int = 1024) -> tuple[VAE, np.ndarray, np.ndarray]:
  """The linear-Gaussian VAE, samples from it [num, 2, 2, 1] and their exact log p(x)."""
  model = VAE(image_shape=_PPCA_SHAPE, latent_dim=2, arch="mlp", hidden=(),
              likelihood="gaussian")
  template = model.init({"params": jax.random.key(0), "latent": jax.random.key(1)},
                        jnp.zeros((1,) + _PPCA_SHAPE))["params"]
  assert (jax.tree.structure(template)
          == jax.tree.structure(_ppca_params()))  # The override matches the real tree.
  w, b, sigma = _ppca_weights(), _PPCA_BIAS, _PPCA_SIGMA
  rng = np.random.default_rng(1)
  x = rng.normal(size=(num, 2)) @ w.T + b + sigma * rng.normal(size=(num, 4))
  exact = stats.multivariate_normal(b, w @ w.T + sigma**2 * np.eye(4)).logpdf(x)
  return model, x.reshape((num,) + _PPCA_SHAPE).astype(np.float32), exact


def _iwae_fn(model, num_samples, chunk=likelihood.DEFAULT_CHUNK):
  return jax.jit(functools.partial(likelihood.iwae_log_likelihood, model,
                                   num_samples=num_samples, chunk=chunk))


def test_iwae_converges_to_exact_ppca_log_likelihood():
  model, x, exact = _ppca_model_and_data()
  params = _ppca_params(mean_scale=0.8, mean_shift=0.2, var_scale=2.0)
  gaps = {}
  for k in (1, 10, 100, 2000):
    bound = np.asarray(_iwae_fn(model, k, chunk=500)(params, x, jax.random.key(k)))
    gaps[k] = float(np.mean(exact - bound))
  # A meaningful test: the approximate posterior leaves a clear gap at K = 1.
  assert gaps[1] > 0.1, gaps
  assert gaps[1] > gaps[10] > gaps[100] > gaps[2000] - 1e-3, gaps
  assert abs(gaps[2000]) < 0.02, gaps
  # A lower bound in expectation: never clearly above the exact value.
  for k in (1, 10):
    assert gaps[k] > -0.01, gaps


def test_exact_ppca_posterior_makes_every_bound_tight():
  model, x, exact = _ppca_model_and_data()
  params = _ppca_params()
  # All importance weights equal p(x): any K and chunking (3 full chunks + remainder 1).
  for k, chunk in ((1, 1), (10, 3)):
    bound = np.asarray(_iwae_fn(model, k, chunk)(params, x, jax.random.key(0)))
    np.testing.assert_allclose(bound, exact, atol=2e-4)
  # The analytic-KL ELBO is tight in expectation (its log p(x | z) term still varies).
  elbo_fn = jax.jit(functools.partial(likelihood.elbo, model))
  elbos = np.stack([np.asarray(elbo_fn(params, x, jax.random.key(s))) for s in range(8)])
  assert abs(float(np.mean(elbos) - np.mean(exact))) < 0.05


@functools.lru_cache(maxsize=None)
def _bernoulli_model_and_digits():
  model = VAE(image_shape=(8, 8, 1), latent_dim=8, arch="mlp", hidden=(64,),
              likelihood="bernoulli")
  params = model.init({"params": jax.random.key(0), "latent": jax.random.key(1)},
                      jnp.zeros((1, 8, 8, 1)))["params"]
  source = data.load({"name": "digits"}, "test")
  images = source.get(np.arange(len(source)))["image"]
  return model, params, source, images


def test_bernoulli_iwae_k1_matches_elbo_and_larger_k_is_tighter():
  model, params, _, x = _bernoulli_model_and_digits()
  keys = jax.random.split(jax.random.key(3), 16)
  elbo_fn = jax.jit(jax.vmap(functools.partial(likelihood.elbo, model),
                             in_axes=(None, None, 0)))
  iwae1_fn = jax.jit(jax.vmap(_iwae_fn(model, 1), in_axes=(None, None, 0)))
  elbos = np.asarray(elbo_fn(params, x, keys), np.float64)  # [S, N]
  iwae1 = np.asarray(iwae1_fn(params, x, keys), np.float64)
  assert np.all(np.isfinite(elbos)) and np.all(np.isfinite(iwae1))
  diff = iwae1 - elbos
  stderr = np.std(diff) / math.sqrt(diff.size)
  assert abs(np.mean(diff)) < 4 * stderr + 1e-3, (np.mean(diff), stderr)

  iwae16 = np.asarray(_iwae_fn(model, 16, chunk=5)(params, x, jax.random.key(4)))
  neg_elbo, nll = -np.mean(elbos), -np.mean(iwae16)
  assert nll < neg_elbo, (nll, neg_elbo)
  assert nll < -np.mean(iwae1)


def test_evaluate_likelihood_is_batch_size_invariant_and_consistent():
  model, params, source, _ = _bernoulli_model_and_digits()
  evaluate = functools.partial(likelihood.evaluate_likelihood, model, params, source,
                               num_samples=8, seed=5, max_examples=50, chunk=3)
  partial_batches = evaluate(batch_size=16)  # 3 full batches + 2 real, 14 padded examples.
  all_at_once = evaluate(batch_size=50)
  for result in (partial_batches, all_at_once):
    assert result["num_examples"] == 50 and result["iwae_k"] == 8
    assert all(np.isfinite(result[k]) for k in ("neg_elbo", "nll_iwae", "bits_per_dim"))
    assert result["bits_per_dim"] == pytest.approx(
        result["nll_iwae"] / (8 * 8 * 1 * math.log(2)))
    for key in ("neg_elbo", "nll_iwae"):
      assert result[key] == pytest.approx(all_at_once[key], rel=1e-5)
  assert all_at_once["nll_iwae"] < all_at_once["neg_elbo"]


class _Images:
  """The least a source is: ``len`` and ``get(indices)['image']``."""

  def __init__(self, images):
    self.images = images

  def __len__(self):
    return len(self.images)

  def get(self, indices):
    return {"image": self.images[indices]}


def test_rate_and_distortion_split_the_elbo():
  """Rate is the mean analytic KL of the (here exact, closed-form) PPCA posterior, computed
  in NumPy; distortion is the rest of the negative ELBO."""
  model, x, _ = _ppca_model_and_data()
  source = _Images(x[:200])
  out = likelihood.evaluate_likelihood(model, _ppca_params(), source, num_samples=2,
                                       batch_size=64, seed=0)
  w, b, sigma = _ppca_weights(), _PPCA_BIAS, _PPCA_SIGMA
  m_diag = np.diag(w.T @ w) + sigma**2
  mean = (x[:200].reshape(200, 4) - b) @ w / m_diag
  var = sigma**2 / m_diag
  kl = 0.5 * np.sum(var + mean**2 - 1.0 - np.log(var), axis=1)
  assert out["rate"] == pytest.approx(kl.mean(), rel=1e-5)
  assert out["distortion"] + out["rate"] == pytest.approx(out["neg_elbo"], rel=1e-9)
  assert out["distortion"] != pytest.approx(out["rate"], rel=0.1)


def test_evaluate_likelihood_rejects_bad_arguments():
  model, params, source, _ = _bernoulli_model_and_digits()
  with pytest.raises(ValueError, match="batch_size"):
    likelihood.evaluate_likelihood(model, params, source, num_samples=2, batch_size=0,
                                   seed=0)
  with pytest.raises(ValueError, match="num_samples"):
    likelihood.evaluate_likelihood(model, params, source, num_samples=0, batch_size=4,
                                   seed=0)
