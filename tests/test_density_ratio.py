"""Density-ratio estimation: closed-form Gaussian ratio, weights, diagnostics, determinism."""

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairgen.classifiers import fit
from fairgen.fairness import density_ratio as dr
from fairgen.models.classifier import Classifier

MU = np.array([1.0, 0.5])


class MLP(nn.Module):
  """Dense 32 -> ReLU -> Dense 32 -> ReLU -> Dense(outputs)."""

  outputs: int = 2

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Dense(32)(x))
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(self.outputs)(x)


def _true_log_ratio(x):
  # log N(x; 0, I) - log N(x; MU, I).
  return -x @ MU + MU @ MU / 2


@pytest.fixture(scope="module")
def gaussian_fit():
  # Unequal set sizes (1:2): balanced batches must make the odds the ratio with no prior
  # correction, else every log-odds would be off by log 2 = 0.69 nats.
  rng = np.random.default_rng(0)
  x_ref = rng.normal(size=(4000, 2))
  x_bias = rng.normal(size=(8000, 2)) + MU
  params, info = dr.fit_density_ratio(x_ref, x_bias, MLP(), steps=1500, batch_size=128,
                                      lr=1e-3, seed=0)
  return params, info


def test_log_odds_match_the_closed_form_gaussian_ratio(gaussian_fit):
  params, info = gaussian_fit
  rng = np.random.default_rng(1)
  held_out = np.concatenate([rng.normal(size=(5000, 2)), rng.normal(size=(5000, 2)) + MU])
  # The high-density region of both distributions; the ratio is unconstrained far out.
  held_out = held_out[np.linalg.norm(held_out - MU / 2, axis=1) < 2]
  log_odds = dr.classifier_log_odds(MLP(), params, held_out)
  true = _true_log_ratio(held_out)
  mae = float(np.mean(np.abs(log_odds - true)))
  corr = float(np.corrcoef(log_odds, true)[0, 1])
  # Measured: MAE 0.056 nats, correlation 0.998 (six data/fit seeds: MAE 0.043-0.064,
  # correlation >= 0.997).
  assert mae < 0.15, (mae, info)
  assert corr > 0.99, (corr, info)
  # The Bayes balanced accuracy here is Phi(|MU| / 2) = 0.713.
  assert 0.68 < info["balanced_train_accuracy"] < 0.76, info


def test_weighted_biased_samples_recover_reference_means(gaussian_fit):
  params, _ = gaussian_fit
  x_bias = np.random.default_rng(2).normal(size=(20000, 2)) + MU
  weights = dr.importance_weights(dr.classifier_log_odds(MLP(), params, x_bias),
                                  np.zeros(len(x_bias), np.int32))
  assert abs(x_bias[:, 0].mean() - 1.0) < 0.05  # Unweighted: the biased mean, MU[0].
  weighted = np.sum(weights[:, None] * x_bias, axis=0) / np.sum(weights)
  # E_ref[x] = 0 from biased samples. Measured (-0.050, -0.023); six data/fit seeds stay
  # within 0.06 of 0 (Monte Carlo error alone is ~0.014 at an ESS of ~5,000).
  np.testing.assert_allclose(weighted, 0.0, atol=0.1)


def test_classifier_log_odds_chunks_and_pads_like_one_call():
  model = MLP()
  x = np.random.default_rng(0).normal(size=(20, 2)).astype(np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  logits = model.apply({"params": params}, x)
  chunked = dr.classifier_log_odds(model, params, x, batch_size=7)
  assert chunked.shape == (20,) and chunked.dtype == np.float32
  np.testing.assert_allclose(chunked, logits[:, 1] - logits[:, 0], rtol=1e-5, atol=1e-6)
  assert dr.classifier_log_odds(model, params, x[:0]).shape == (0,)


def test_importance_weights():
  log_odds = np.array([0.3, -1.0, 2.0, np.log(4.0), 5.0])
  is_ref = np.array([1, 0, 1, 0, 0])
  w = dr.importance_weights(log_odds, is_ref)
  assert w.dtype == np.float32
  np.testing.assert_array_equal(w[[0, 2]], 1.0)  # Reference rows: exactly 1.
  np.testing.assert_allclose(w[[1, 3, 4]], np.exp([-1.0, np.log(4.0), 5.0]), rtol=1e-6)
  np.testing.assert_array_equal(dr.importance_weights(log_odds, is_ref, alpha=0.0), 1.0)
  np.testing.assert_allclose(dr.importance_weights(log_odds, is_ref, alpha=0.5),
                             np.where(is_ref, 1.0, np.sqrt(np.exp(log_odds))), rtol=1e-6)
  clipped = dr.importance_weights(log_odds, is_ref, clip=2.0)
  np.testing.assert_allclose(clipped, [1.0, 0.5, 1.0, 2.0, 2.0])
  np.testing.assert_array_equal(dr.importance_weights(log_odds, is_ref.astype(bool)), w)


@pytest.mark.parametrize("log_odds, is_ref, kwargs, match", [
    ([0.0, 1.0], [0], {}, "shape"),
    ([0.0, 1.0], [0, 2], {}, "only 0"),
    ([0.0, np.nan], [0, 0], {}, "non-finite"),
    ([0.0, np.inf], [0, 1], {}, "non-finite"),
    ([0.0, 1.0], [0, 0], {"alpha": -0.5}, "alpha"),
    ([0.0, 1.0], [0, 0], {"alpha": np.nan}, "alpha"),
    ([0.0, 1.0], [0, 0], {"clip": 0.5}, "clip"),
    ([[0.0, 1.0]], [0, 0], {}, "1-D"),
    ([0.0, 100.0], [0, 0], {}, "overflow"),
])
def test_importance_weights_rejects_bad_inputs(log_odds, is_ref, kwargs, match):
  with pytest.raises(ValueError, match=match):
    dr.importance_weights(np.array(log_odds), np.array(is_ref), **kwargs)


def test_weight_diagnostics_90_10_reweighted_to_50_50():
  groups = np.array([0] * 90 + [1] * 10 + [0] * 10 + [1] * 10)
  is_ref = np.array([0] * 100 + [1] * 20)
  weights = np.array([5 / 9] * 90 + [5.0] * 10 + [1.0] * 20, np.float32)
  diag = dr.weight_diagnostics(weights, groups, is_ref, num_groups=2)
  json.dumps(diag, allow_nan=False)
  assert diag["n_bias"] == 100 and diag["n_ref"] == 20
  np.testing.assert_allclose(diag["raw_proportions"], [0.9, 0.1])
  np.testing.assert_allclose(diag["effective_proportions"], [0.5, 0.5], rtol=1e-6)
  np.testing.assert_allclose(diag["mean_weight"], [5 / 9, 5.0], rtol=1e-6)
  np.testing.assert_allclose(diag["ref_proportions"], [0.5, 0.5])
  # (sum w)^2 / sum w^2 = 100^2 / (90 * 25/81 + 10 * 25) = 36.
  np.testing.assert_allclose(diag["ess"], 36.0, rtol=1e-5)
  np.testing.assert_allclose(diag["ess_fraction"], 0.36, rtol=1e-5)
  # A group with no biased examples has no mean weight; unweighted is the raw make-up.
  diag = dr.weight_diagnostics(np.ones(4), np.array([0, 0, 1, 2]), np.array([0, 0, 0, 1]), 3)
  assert diag["mean_weight"] == [1.0, 1.0, None]
  assert diag["effective_proportions"] == diag["raw_proportions"]
  json.dumps(diag, allow_nan=False)
  with pytest.raises(ValueError, match="num_groups"):
    dr.weight_diagnostics(np.ones(2), np.array([0, 2]), np.array([0, 0]), 2)
  with pytest.raises(ValueError, match="no biased"):
    dr.weight_diagnostics(np.ones(2), np.array([0, 1]), np.array([1, 1]), 2)


def test_index_stream_wraps_through_whole_permutations():
  stream = dr._IndexStream(3, np.random.default_rng(0))
  drawn = np.concatenate([stream.take(4) for _ in range(3)])  # 4 epochs of 3.
  for epoch in drawn.reshape(4, 3):
    assert sorted(epoch) == [0, 1, 2]


def test_fit_is_deterministic_and_traced_once(monkeypatch):
  # Sets smaller than half a batch wrap within a batch.
  rng = np.random.default_rng(0)
  x_ref, x_bias = rng.normal(size=(5, 2)), rng.normal(size=(40, 2))
  # The shared fit routine of every auxiliary classifier (fairgen.classifiers.fit).
  monkeypatch.setattr(fit, "classification_step",
                      chex.assert_max_traces(fit.classification_step, n=1))
  fits = []
  for seed in (3, 3, 4):
    chex.clear_trace_counter()  # Each fit jits its own step: once per fit, not per step.
    fits.append(dr.fit_density_ratio(x_ref, x_bias, MLP(), steps=5, batch_size=16, seed=seed))
  (a, info), (b, _), (c, _) = fits
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert isinstance(leaf_a, np.ndarray)
    np.testing.assert_array_equal(leaf_a, leaf_b)
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))
  json.dumps(info, allow_nan=False)
  assert (info["steps"], info["n_ref"], info["n_bias"], info["seed"]) == (5, 5, 40, 3)
  assert info["hyperparameters"]["batch_size"] == 16


def test_fit_rejects_bad_arguments():
  x = np.zeros((10, 2))
  with pytest.raises(ValueError, match="even"):
    dr.fit_density_ratio(x, x, MLP(), steps=1, batch_size=7)
  with pytest.raises(ValueError, match="same shape"):
    dr.fit_density_ratio(x, np.zeros((10, 3)), MLP(), steps=1)
  with pytest.raises(ValueError, match="NHWC"):
    dr.fit_density_ratio(x, x, MLP(), steps=1, augment_shift=1)
  with pytest.raises(ValueError, match=r"\[N, 2\] logits"):
    dr.fit_density_ratio(x, x, MLP(outputs=3), steps=1, batch_size=4)


def test_image_classifier_with_augmentation_runs():
  rng = np.random.default_rng(0)
  x_ref = rng.uniform(-1, 1, size=(12, 8, 8, 1)).astype(np.float32)
  x_bias = rng.uniform(-1, 1, size=(30, 8, 8, 1)).astype(np.float32)
  model = Classifier(num_classes=2, width=8, feature_dim=16)
  params, info = dr.fit_density_ratio(x_ref, x_bias, model, steps=3, batch_size=8,
                                      augment_shift=1, seed=0)
  expected = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  chex.assert_trees_all_equal_shapes(params, expected)
  log_odds = dr.classifier_log_odds(model, params, np.concatenate([x_ref, x_bias]),
                                    batch_size=16)
  assert log_odds.shape == (42,) and np.all(np.isfinite(log_odds))
  assert info["hyperparameters"]["augment_shift"] == 1
  weights = dr.importance_weights(log_odds, np.r_[np.ones(12), np.zeros(30)], clip=10.0)
  assert weights.shape == (42,) and np.all(weights[:12] == 1.0)
