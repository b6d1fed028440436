"""DP-SGD for classifiers: the attribute/backbone classifiers' fit, adversarial debiasing
(both networks, clipped jointly), and the density-ratio classifier of importance weighting,
whose epsilon a DP run composes with its own."""

import functools
import importlib.util
import math
import os

import dp_accounting
import jax
import numpy as np
import pytest
from dp_accounting import pld

from conftest import REPO, load_config
from fairgen import data, experiment, privacy
from fairgen.classifiers import fit
from fairgen.fairness import density_ratio, importance
from fairgen.models.classifier import Classifier
from fairgen.privacy import accounting


def _settings(batch, n, steps=1, **kw):
  base = dict(clip_norm=1e6, noise_multiplier=0.0, expected_batch_size=batch,
              batch_size=batch, num_examples=n, draws_per_step=1, num_steps=steps, delta=1e-5)
  return privacy.DpSettings(**{**base, **kw})


def _close_trees(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def test_a_private_classifier_step_without_noise_or_clipping_is_the_plain_step():
  """sigma = 0, an unreachable clip, a full batch and E = B: DP-SGD's gradient is the
  batch mean, so the private step must land on the plain step's state."""
  model = Classifier(num_classes=10, width=4, feature_dim=8, dropout=0.0)
  optimizer = fit.optax.sgd(0.5)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 8).astype(np.int32)
  state = fit.init_state(model, optimizer, jax.random.key(0), images[:1])
  # Jitted, as in training: one program per step, not one per operation and shape.
  plain, _ = jax.jit(functools.partial(fit.classification_step, model=model,
                                       optimizer=optimizer, max_shift=0))(
      state, images, labels, jax.random.key(1))
  dp = _settings(8, 100)
  ones = np.ones(8, np.float32)
  private, metrics = jax.jit(functools.partial(
      fit.private_classification_step, model=model, optimizer=optimizer, max_shift=0,
      privacy=dp))(state, images, labels, ones, ones, jax.random.key(1))
  _close_trees(plain["params"], private["params"], rtol=1e-4, atol=1e-6)
  assert not np.allclose(np.asarray(jax.tree.leaves(state["params"])[0]),
                         np.asarray(jax.tree.leaves(plain["params"])[0]))
  assert metrics["mask"].shape == (8,) and float(metrics["clipped_fraction"]) == 0.0


def test_a_dp_classifier_is_noised_and_reports_its_epsilon():
  """Clipping alone leaves the 8x8 digits learnable; sigma = 20 drowns them (accuracy at
  chance), and the epsilon in ``info`` is dp-accounting's for the run's Poisson batches."""
  train, test = data.load({"name": "digits"}, "train"), data.load({"name": "digits"}, "test")
  runs = {}
  for sigma in (0.0, 20.0):
    _, runs[sigma] = fit.train_classifier(
        train, test, steps=60, width=8, batch_size=64, lr=3e-3,
        privacy={"noise_multiplier": sigma, "expected_batch_size": 48})
  assert runs[0.0]["test_accuracy"] > 0.45  # 0.62 measured; chance 0.1
  assert runs[20.0]["test_accuracy"] < 0.25  # 0.10 measured
  assert math.isinf(runs[0.0]["privacy"]["epsilon"])
  record = runs[20.0]["privacy"]
  n = len(train)
  assert record["num_examples"] == n and record["batch_size"] == 64
  acc = pld.PLDAccountant(value_discretization_interval=accounting.PLD_INTERVAL)
  acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.TruncatedSubsampledGaussianDpEvent(
      dataset_size=n, sampling_probability=48 / n, truncated_batch_size=64,
      noise_multiplier=20.0), 60))
  assert record["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_the_classifier_tool_trains_privately_and_refuses_bad_dp_flags(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location(
      "train_classifier_tool", os.path.join(REPO, "tools", "train_classifier.py"))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  base = ["--dataset=digits", "--steps=5", "--width=4", "--log_every=0", "--batch_size=32"]
  for flags, message in ((["--dp_clip_norm=0", "--dp_noise_multiplier=1"],
                          "--dp_clip_norm must be > 0"),
                         (["--dp_expected_batch_size=16"], "needs --dp_target_epsilon"),
                         (["--dp_noise_multiplier=1", "--dp_expected_batch_size=40"],
                          "--dp_expected_batch_size must be an integer in [1, batch size=32]")):
    with pytest.raises(SystemExit) as exit_info:
      tool.main(base + flags + [f"--out={tmp_path / 'bad'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fairgen: error: ") and message in err and "\n" not in err
  summary = tool.main(base + ["--dp_noise_multiplier=2", "--dp_expected_batch_size=16",
                              f"--out={tmp_path / 'dp'}"])
  assert summary["privacy"]["noise_multiplier"] == 2.0
  assert 0 < summary["privacy"]["epsilon"] < 1  # 5 steps at q = 16/1438, sigma 2
  assert "DP-SGD: epsilon" in capsys.readouterr().out


def _debias_exp(config_name, arg, **overrides):
  config = load_config(config_name, arg, **{"model.dropout": 0.0, **overrides})
  return experiment.setup(config)


@pytest.mark.parametrize("arg", ["smoke", "plain,smoke"])
def test_private_adversarial_debiasing_without_noise_or_clipping_is_the_plain_step(arg):
  """Both networks by DP-SGD: with sigma = 0, an unreachable clip and E = B, the joint
  per-example gradients (the predictor's under each loss, the adversary's) must reproduce
  the plain step's projected update exactly."""
  plain_exp = _debias_exp("adult_debias", "plain" if arg.startswith("plain") else None,
                          **{"train.batch_size": 32})
  dp_exp = _debias_exp("dp_adult_debias", arg, **{
      "privacy.noise_multiplier": 0.0, "privacy.clip_norm": 1e6,
      "privacy.expected_batch_size": 32, "train.batch_size": 32})
  assert dp_exp.privacy.expected_batch_size == 32
  source = data.load(dp_exp.config.data, "train")
  batch = source.get(np.arange(100, 132))
  batch = {k: batch[k] for k in ("features", "label", "attr")}
  state = jax.jit(plain_exp.objective.init)(jax.random.key(0))
  want, _ = jax.jit(plain_exp.objective.train_step)(state, batch, jax.random.key(3))
  got, metrics = jax.jit(dp_exp.objective.train_step)(
      state, {**batch, "mask": np.ones(32, np.float32)}, jax.random.key(3))
  _close_trees(want, got, rtol=2e-4, atol=1e-6)
  assert float(metrics["batch_examples"]) == 32
  if arg == "smoke":  # The adversary moved: its gradient reached the update.
    assert not np.allclose(jax.tree.leaves(state["adv"]["params"])[0],
                           jax.tree.leaves(got["adv"]["params"])[0])


def test_dp_debiasing_clips_the_three_gradients_as_one_vector():
  """With a small clip every example's joint gradient norm is reported above it, and the
  update's predictor gradient is bounded by the clip (here noise-free, E = B)."""
  exp = _debias_exp("dp_adult_debias", "smoke", **{
      "privacy.noise_multiplier": 0.0, "privacy.clip_norm": 0.05,
      "privacy.expected_batch_size": 32, "train.batch_size": 32})
  source = data.load(exp.config.data, "train")
  batch = source.get(np.arange(32))
  batch = {k: batch[k] for k in ("features", "label", "attr")}
  state = jax.jit(exp.objective.init)(jax.random.key(0))
  _, metrics = jax.jit(exp.objective.train_step)(
      state, {**batch, "mask": np.ones(32, np.float32)}, jax.random.key(3))
  assert float(metrics["clipped_fraction"]) == 1.0
  assert float(metrics["example_grad_norm"]) > 0.05
  # The mean of vectors of norm <= C has norm <= C; the projection only removes a part.
  assert float(metrics["pred_grad_norm"]) <= 0.05 + 1e-6


def test_the_density_ratio_classifier_trains_privately_and_its_epsilon_is_the_runs():
  """A DP importance-weighted run: the density-ratio classifier is trained by DP-SGD on the
  same examples, and the run's epsilon composes that mechanism with its own draws, in one
  accountant; a target epsilon is the budget of both."""
  config = load_config("fair_mnist", "method=importance,smoke")
  config.fair.clip = 5.0
  config.train.batch_size = 16
  config.privacy = privacy.section(expected_batch_size=12, target_epsilon=8.0)
  exp = experiment.setup(config)
  dp = exp.privacy
  n = dp.num_examples
  ratio = density_ratio.ratio_privacy(config, n)
  assert dp.prior == ((3.0, ratio.sampling_rate, config.fair.ratio.steps, ratio.batch_size),)
  assert privacy.epsilon(dp, 0) == pytest.approx(privacy.epsilon(ratio, ratio.num_steps))
  assert privacy.epsilon(dp, 0) > 0
  # The whole run spends its target, and more than its own draws alone would.
  assert privacy.epsilon(dp, dp.num_steps) == pytest.approx(8.0, rel=2e-3)
  alone = privacy.DpSettings(**{**{f: getattr(dp, f) for f in (
      "clip_norm", "noise_multiplier", "expected_batch_size", "batch_size", "num_examples",
      "draws_per_step", "num_steps", "delta")}})
  assert privacy.epsilon(alone, dp.num_steps) < 8.0 - 1e-3
  # dp-accounting, called directly on the composition.
  acc = pld.PLDAccountant(value_discretization_interval=accounting.PLD_INTERVAL)
  event = lambda s, q, b, t: dp_accounting.SelfComposedDpEvent(
      dp_accounting.TruncatedSubsampledGaussianDpEvent(
          dataset_size=n, sampling_probability=q, truncated_batch_size=b,
          noise_multiplier=s), t)
  acc.compose(dp_accounting.ComposedDpEvent([
      event(3.0, ratio.sampling_rate, ratio.batch_size, ratio.num_steps),
      event(dp.noise_multiplier, dp.sampling_rate, dp.batch_size, dp.num_steps)]))
  assert privacy.epsilon(dp, dp.num_steps) == pytest.approx(acc.get_epsilon(dp.delta),
                                                           rel=1e-9)
  # The fit itself trains by DP-SGD on the union and records the mechanism.
  source = data.load(config.data, "train")
  weights, info = importance.fit_importance_weights(config, source)
  assert info["privacy"]["num_examples"] == len(source) == n
  assert info["privacy"]["epsilon"] == pytest.approx(privacy.epsilon(dp, 0))
  assert info["hyperparameters"]["batches"] == "poisson, class-scaled"
  assert weights.min() >= 1 / 5 - 1e-6 and weights.max() <= 5 + 1e-6
  # A budget the classifier alone spends is refused.
  config.fair.ratio.noise_multiplier = 0.3
  config.fair.ratio.steps = 400
  with pytest.raises(Exception, match="cannot be met"):
    experiment.setup(config)


def test_a_dp_density_ratio_fit_refuses_settings_for_other_data():
  x = np.zeros((10, 3), np.float32)
  with pytest.raises(ValueError, match="DP settings are for 30 examples"):
    density_ratio.fit_density_ratio(x, x, Classifier(num_classes=2), steps=2,
                                    privacy=_settings(8, 30, steps=2))
