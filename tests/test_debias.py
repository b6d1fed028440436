"""Adversarial debiasing: the projection, AIF360's Adult, the loop, and the repro script."""

import csv
import glob
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from conftest import REPO, load_config, subprocess_env
from fairgen import data, experiment, train
from fairgen.metrics import fairness
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


def _hand_report(y, y_hat, a):
  """AIF360's definitions, written out: unprivileged (attr 0) minus privileged (attr 1)."""
  pos = lambda g: y_hat[a == g].mean()
  tpr = lambda g: y_hat[(a == g) & (y == 1)].mean()
  fpr = lambda g: y_hat[(a == g) & (y == 0)].mean()
  return {"accuracy": (y == y_hat).mean(),
          "statistical_parity_difference": pos(0) - pos(1),
          "disparate_impact": pos(0) / pos(1),
          "equal_opportunity_difference": tpr(0) - tpr(1),
          "average_odds_difference": ((fpr(0) - fpr(1)) + (tpr(0) - tpr(1))) / 2}


def test_debiasing_trains_and_its_eval_reports_the_models_own_decisions(workdir, max_traces):
  """The eval JSON equals the metrics recomputed by hand from the final checkpoint's outputs."""
  for variant in ("smoke", "plain"):
    config = load_config("adult_debias", variant)
    if variant == "plain":
      config.train.num_steps, config.eval.every_steps = 6, 6
      config.train.batch_size, config.log.every_steps = 32, 3
      # UCI Adult with its 10 sex x race intersections as k-way audit groups.
      config.data.name = "adult"
      config.data.options = {"sensitive": "sex", "audit_groups": ("sex", "race")}
    max_traces(1)
    run_dir = os.path.join(workdir, variant)
    summary = train.train_and_evaluate(config, run_dir)
    ev = summary["eval"]
    assert ("adv_loss" in summary["scalars"]) == (variant == "smoke")
    # Recompute the test-split decisions from the checkpoint, outside the evaluator.
    split = data.load_eval(config.data)
    exp = experiment.setup(config, split.spec, for_training=False)
    state, step = experiment.restore_checkpoint(exp, run_dir)
    assert step == config.train.num_steps
    arrays = split.arrays
    probs = np.asarray(exp.objective.predict(
        state, {"features": arrays["features"], "attr": arrays["attr"]}))
    y_hat = (probs > 0.5).astype(np.int32)
    assert 0 < y_hat.mean() < 1  # both decisions occur, so every rate below is defined
    hand = _hand_report(arrays["label"], y_hat, arrays["attr"])
    for key, value in hand.items():
      np.testing.assert_allclose(ev[key], value, rtol=1e-6, atol=1e-6, err_msg=key)
    assert any(k.startswith("groups_") for k in ev) == (variant == "plain")
    if variant == "plain":
      spec = split.spec
      assert spec.audit_groups[spec.audit_privileged] == ("Male", "White")
      k_way = fairness.multigroup_report(arrays["label"], y_hat, arrays["groups"],
                                         len(spec.audit_groups), spec.audit_privileged)
      assert len(k_way) > 60
      for key, value in k_way.items():
        np.testing.assert_allclose(ev[f"groups_{key}"], value, rtol=1e-6, err_msg=key)


def test_debiasing_on_eight_devices_matches_one(tmp_path):
  scalars = {}
  for n in (1, 8):
    config = load_config("adult_debias", "smoke", **{"mesh.data": n})
    scalars[n] = train.train_and_evaluate(config, str(tmp_path / f"d{n}"))["scalars"]
  for key in ("pred_loss", "adv_loss"):
    np.testing.assert_allclose(scalars[8][key], scalars[1][key], rtol=1e-5)


def test_repro_script_quick_prints_what_its_runs_measured(tmp_path):
  """Each table row is the mean over seeds of the runs' own eval JSONs, beside the paper's."""
  env = subprocess_env()
  result = subprocess.run(
      [sys.executable, "experiments/repro/aif360_adversarial_debiasing.py", "--quick",
       f"--out={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| debiased (AIF360, published) | 0.792 | -0.095 | -0.091 | -0.054 |" in result.stdout
  keys = ("accuracy", "statistical_parity_difference", "equal_opportunity_difference",
          "average_odds_difference")
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["method"], r["seed"]) for r in rows] == [
      ("plain", "0"), ("plain", "1"), ("debiased", "0"), ("debiased", "1")]
  for method in ("plain", "debiased"):
    measured = []
    for seed in (0, 1):
      reports = glob.glob(str(tmp_path / f"{method}_seed{seed}" / "eval" / "step_*.json"))
      with open(max(reports)) as f:
        metrics = json.load(f)["metrics"]
      row = next(r for r in rows if r["method"] == method and r["seed"] == str(seed))
      np.testing.assert_allclose([float(row[k]) for k in keys], [metrics[k] for k in keys],
                                 rtol=1e-6)
      measured.append([metrics[k] for k in keys])
    mean, std = np.mean(measured, 0), np.std(measured, 0)
    cells = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(mean, std))
    assert f"| {method} (fairgen, 2 seeds) | {cells} |" in result.stdout
  # The two seeds are different runs (split and initialisation), not one run printed twice.
  assert rows[0]["accuracy"] != rows[1]["accuracy"]
