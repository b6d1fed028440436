"""Adversarial debiasing: the projection, AIF360's Adult, the loop, and the repro script."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from conftest import REPO, load_config
from fairgen import data, train
from fairgen.objectives import debias


def test_projection_removes_the_adversary_direction():
  rng = np.random.default_rng(0)
  g_pred, g_adv = (jnp.asarray(rng.normal(size=(7, 3)), jnp.float32) for _ in range(2))
  alpha = 0.1
  g = debias.project_out(g_pred, g_adv, alpha)
  # What is left besides -alpha * g_adv is orthogonal to g_adv...
  np.testing.assert_allclose(jnp.sum((g + alpha * g_adv) * g_adv), 0.0, atol=1e-5)
  # ... and equals g_pred minus its component along g_adv (numpy reference).
  u = np.asarray(g_adv).ravel() / np.linalg.norm(np.asarray(g_adv))
  ref = np.asarray(g_pred).ravel() - np.dot(np.asarray(g_pred).ravel(), u) * u
  np.testing.assert_allclose(np.asarray(g + alpha * g_adv).ravel(), ref, rtol=1e-5, atol=1e-6)


def test_aif360_adult_matches_the_demo_shapes():
  train_split = data.load({"name": "adult_aif360"}, "train")
  test_split = data.load({"name": "adult_aif360"}, "test")
  assert len(train_split) + len(test_split) == 48842
  assert len(train_split) == 34189 and train_split.spec.feature_dim == 18  # as in the demo
  feats = train_split.arrays["features"]
  np.testing.assert_array_equal(feats[:, :7].sum(1), 1)  # age decade one-hot
  np.testing.assert_array_equal(feats[:, 7:16].sum(1), 1)  # education years one-hot
  np.testing.assert_array_equal(feats[:, -1], train_split.arrays["attr"])  # sex kept
  other = data.load({"name": "adult_aif360", "options": {"split_seed": 1}}, "train")
  assert not np.array_equal(other.arrays["label"], train_split.arrays["label"])


def test_debiasing_smoke_trains_and_evaluates_fairness(workdir, max_traces):
  for variant in ("smoke", "plain"):
    config = load_config("adult_debias", variant)
    if variant == "plain":
      config.train.num_steps, config.eval.every_steps = 6, 6
      config.train.batch_size, config.log.every_steps = 32, 3
    max_traces(1)
    summary = train.train_and_evaluate(config, os.path.join(workdir, variant))
    ev = summary["eval"]
    for key in ("accuracy", "balanced_accuracy", "statistical_parity_difference",
                "disparate_impact", "equal_opportunity_difference",
                "average_odds_difference", "equalized_odds_difference"):
      assert key in ev
    assert 0.5 < ev["accuracy"] <= 1.0
    assert ("adv_loss" in summary["scalars"]) == (variant == "smoke")


def test_debiasing_on_eight_devices_matches_one(tmp_path):
  scalars = {}
  for n in (1, 8):
    config = load_config("adult_debias", "smoke", **{"mesh.data": n})
    scalars[n] = train.train_and_evaluate(config, str(tmp_path / f"d{n}"))["scalars"]
  for key in ("pred_loss", "adv_loss"):
    np.testing.assert_allclose(scalars[8][key], scalars[1][key], rtol=1e-5)


def test_repro_script_quick(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "experiments/repro/aif360_adversarial_debiasing.py", "--quick",
       f"--out={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "debiased (AIF360, published) | 0.792" in result.stdout
  assert "plain (fairgen, 2 seeds)" in result.stdout
  assert os.path.exists(tmp_path / "results.csv")
