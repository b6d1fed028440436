"""The privacy audits: AUC and advantage against scikit-learn, nearest-neighbour distances
against brute force, near copies, the evaluators wired to a model's own scores, and the
one-run audit (its bound against the theorem, and ``--mode=audit`` catching a DP-SGD
without noise while staying below epsilon with it)."""

import dataclasses
import json
import math
import subprocess
import sys
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.spatial import distance
from sklearn import metrics as skm

from conftest import REPO, load_config, run_main, subprocess_env
from fairgen import audit, data, experiment, train
from fairgen.classifiers import backbones, fit
from fairgen.evaluation import modes, runner
from fairgen.evaluation.context import EvalContext, RealData
from fairgen.metrics import privacy_audit
from fairgen.privacy import dpsgd


def test_auc_and_advantage_match_scikit_learn_with_ties():
  rng = np.random.default_rng(0)
  members = np.round(rng.normal(0.3, 1, 300), 1)  # Rounded: many ties.
  nonmembers = np.round(rng.normal(0, 1, 200), 1)
  y = np.r_[np.ones(300), np.zeros(200)]
  scores = np.r_[members, nonmembers]
  assert privacy_audit.roc_auc(members, nonmembers) == pytest.approx(
      skm.roc_auc_score(y, scores), abs=1e-12)
  fpr, tpr, _ = skm.roc_curve(y, scores)
  assert privacy_audit.attack_advantage(members, nonmembers) == pytest.approx(
      np.max(tpr - fpr), abs=1e-12)
  assert privacy_audit.roc_auc(nonmembers, members) == pytest.approx(
      1 - privacy_audit.roc_auc(members, nonmembers))


def test_nearest_distances_and_near_copies():
  rng = np.random.default_rng(1)
  train_x = rng.normal(size=(300, 7, 7))
  queries = rng.normal(size=(50, 7, 7))
  d = privacy_audit.nearest_distances(queries, train_x, chunk=16)
  ref = distance.cdist(queries.reshape(50, -1), train_x.reshape(300, -1)).min(axis=1)
  np.testing.assert_allclose(d, ref, rtol=1e-9)
  heldout_d = privacy_audit.nearest_distances(rng.normal(size=(400, 7, 7)), train_x)
  copies = train_x[:40] + 1e-3 * rng.normal(size=(40, 7, 7))
  assert privacy_audit.near_copy_fraction(
      privacy_audit.nearest_distances(copies, train_x), heldout_d) == 1.0
  fresh = privacy_audit.nearest_distances(rng.normal(size=(2000, 7, 7)), train_x)
  assert privacy_audit.near_copy_fraction(fresh, heldout_d, 0.05) == pytest.approx(0.05,
                                                                                 abs=0.025)


def test_membership_evaluator_scores_members_against_held_out_digits(workdir):
  """With an oracle score (minus the distance to the nearest training image), every member
  outscores every non-member: the evaluator draws members from the training split and
  non-members from the held-out split, and higher means member. The VAE's own score is
  its ELBO."""
  config = load_config("vae_mnist", "smoke", **{"eval.metrics": ("membership",),
                                                "eval.audit_examples": 200})
  train.train_and_evaluate(config, workdir)
  exp = experiment.setup(config, for_training=False)
  state, _ = experiment.restore_checkpoint(exp, workdir)
  real = RealData(config)
  train_images = jnp.asarray(data.load(config.data, "train").get(np.arange(4000))["image"])

  def oracle(state, images, labels):
    del state, labels
    flat = train_images.reshape(len(train_images), -1)
    x = images.reshape(len(images), -1)
    d2 = jnp.sum(x ** 2, 1)[:, None] - 2 * x @ flat.T + jnp.sum(flat ** 2, 1)[None]
    return -jnp.min(d2, axis=1)

  oracle_exp = dataclasses.replace(exp, objective=dataclasses.replace(
      exp.objective, member_score=oracle))
  out = runner.Evaluator(oracle_exp, real=real)(state, 4)
  assert out["membership_auc"] > 0.99 and out["membership_advantage"] > 0.95
  own = dict(runner.audit.membership(EvalContext(exp, state, real, 4)))
  assert 0.3 < own["membership_auc"] < 0.7  # 4 steps: no membership signal yet.
  report = modes.evaluate(config, workdir)["metrics"]
  assert report["membership_auc"] == pytest.approx(own["membership_auc"])


def test_memorisation_evaluator_finds_copied_training_images(workdir):
  """The training images themselves (eval.generator='train_data') are all near copies;
  a 4-step model's samples are none."""
  config = load_config("vae_mnist", "smoke", **{"eval.metrics": ("memorisation",),
                                                "eval.num_samples": 300,
                                                "eval.audit_examples": 300})
  train.train_and_evaluate(config, workdir)
  model = modes.evaluate(config, workdir)["metrics"]
  assert model["near_copy_fraction"] < 0.02
  assert model["nn_dist_ratio"] > 1.0
  config.eval.generator = "train_data"
  copies = modes.evaluate(config, workdir)["metrics"]
  assert copies["near_copy_fraction"] == 1.0 and copies["nn_dist_samples"] < 1e-4


def test_dp_fairness_repro_quick(tmp_path):
  """The privacy x fairness table: four runs (baseline and importance, without and with DP),
  each row its own run's final evaluation, epsilon only where DP was on; the DP importance
  run's weights come from a DP density-ratio classifier whose epsilon the run's includes."""
  cmd = [sys.executable, "experiments/repro/dp_fairness_mnist.py", "--quick",
         f"--out={tmp_path}"]
  result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {tuple(line.split(" | ")[:2]): line.split(" | ") for line in result.stdout.splitlines()
          if line.startswith("| baseline") or line.startswith("| importance")}
  assert len(rows) == 4
  for method in ("baseline", "importance"):
    for dp in ("no", "yes"):
      run = tmp_path / "runs" / f"{method}_{'eps10' if dp == 'yes' else 'nondp'}_seed0"
      with open(sorted((run / "eval").glob("step_*.json"))[-1]) as f:
        ev = json.load(f)["metrics"]
      cells = rows[(f"| {method}", dp)]
      assert cells[4] == f"{ev['fd_l2']:.3f}"
      assert (cells[2] == "–") == (dp == "no") == ("epsilon" not in ev)
      if dp == "yes":
        assert cells[2] == f"{ev['epsilon']:.3f}"
        with open(run / "privacy.json") as f:
          record = json.load(f)
        assert record["weight_bound"] == (5.0 if method == "importance" else 1.0)
        # Under DP the importance weights come from a DP classifier, part of the epsilon.
        assert len(record["prior"]) == (method == "importance")
        assert (run / "density_ratio").exists() == (method == "importance")


def test_tstr_images_trains_on_samples_and_tests_on_real_digits(workdir, tmp_path):
  """A class-conditional generator's samples carry its labels; 4 steps of training give
  noise, on which a classifier learns nothing, while the same classifier trained on as many
  real training digits (eval.generator='train_data') reads the held-out digits."""
  backbone = str(tmp_path / "backbone")
  params, info = fit.train_classifier(
      data.load({"name": "mnist_5k"}, "train"), data.load({"name": "mnist_5k"}, "test"),
      steps=20, batch_size=32, width=8, feature_dim=16, augment=False)
  backbones.save_classifier(backbone, params, info, overwrite=True)
  config = load_config("dp_dcgan_mnist", "conditional,smoke", **{
      "eval.metrics": ("tstr_images",), "eval.num_samples": 300, "eval.tstr_steps": 60,
      "eval.backbone_dir": backbone})
  train.train_and_evaluate(config, workdir)
  model = modes.evaluate(config, workdir)["metrics"]
  assert model["tstr_pseudo_labelled"] == 0.0
  config.eval.generator = "train_data"
  real = modes.evaluate(config, workdir)["metrics"]
  assert real["tstr_accuracy"] > 0.7, real
  assert model["tstr_accuracy"] < real["tstr_accuracy"] - 0.3, (model, real)


# --- The one-run audit (Steinke, Nasr & Jagielski 2023). ----------------------------------


def _p_value_exact(m, r, v, eps, delta):
  """Their Theorem 5.2's p-value, evaluated independently: exact binomial terms as
  fractions (math.comb), only the final sums in floating point."""
  q = Fraction(math.exp(eps)) / (1 + Fraction(math.exp(eps)))
  pmf = [math.comb(r, k) * q ** k * (1 - q) ** (r - k) for k in range(r + 1)]
  beta = sum(pmf[v:])
  alpha = max((sum(pmf[v - i:v]) / i for i in range(1, v + 1)), default=Fraction(0))
  return min(float(beta + 2 * m * Fraction(delta) * alpha), 1.0)


@pytest.mark.parametrize("m,r,v,eps,delta", [(100, 40, 36, 1.5, 0.0), (100, 40, 36, 1.5, 1e-3),
                                             (1000, 60, 55, 2.0, 1e-5), (50, 50, 30, 0.3, 0.01),
                                             (200, 10, 10, 4.0, 1e-5)])
def test_the_one_run_p_value_is_the_theorems(m, r, v, eps, delta):
  assert privacy_audit.one_run_p_value(m, r, v, eps, delta) == pytest.approx(
      _p_value_exact(m, r, v, eps, delta), rel=1e-9)


def test_the_one_run_bound_inverts_the_p_value_and_is_valid():
  """All r guesses right with delta = 0: ``q^r = beta`` in closed form (1,000 of 1,000 at 95%:
  epsilon >= 5.809). The bound is where the p-value crosses the significance. And validity
  over the auditor's whole outcome distribution: for the extremal epsilon-DP mechanism
  (randomized response: each guess right with probability ``e^eps / (1 + e^eps)``), the
  probability that the bound exceeds the true epsilon is at most the significance."""
  for r in (10, 100, 1000):
    q = 0.05 ** (1 / r)
    assert privacy_audit.one_run_epsilon(r, r, r, 0.0) == pytest.approx(
        math.log(q / (1 - q)), rel=1e-9)
  assert privacy_audit.one_run_epsilon(1000, 1000, 1000, 0.0) == pytest.approx(5.809, abs=1e-3)
  eps = privacy_audit.one_run_epsilon(1000, 300, 240, 1e-5)
  assert privacy_audit.one_run_p_value(1000, 300, 240, eps, 1e-5) < 0.05
  assert privacy_audit.one_run_p_value(1000, 300, 240, eps + 1e-6, 1e-5) >= 0.05
  for true_eps, r in ((0.5, 200), (1.0, 200), (2.0, 60)):
    q = 1 / (1 + math.exp(-true_eps))
    exceeds = sum(stats.binom.pmf(v, r, q) for v in range(r + 1)
                  if privacy_audit.one_run_epsilon(r, r, v, 0.0) > true_eps)
    assert exceeds <= 0.05, (true_eps, exceeds)


def test_the_auditors_guesses_use_every_rule_and_pay_for_the_choice():
  """Perfectly separated scores: every guess right, with the most guesses a rule can make
  (a rule guessing more than the included 473 "in" must miss); random scores: no bound."""
  rng = np.random.default_rng(0)
  included = rng.random(1000) < 0.5
  found = privacy_audit.one_run_audit(included + rng.normal(0, 0.01, 1000), included, 1e-5)
  assert found["rules"] == 12 and included.sum() == 473
  assert found["correct"] == found["guesses"] == 400  # 200 "in" and 200 "out".
  # Paid for at 95% / 12 rules: below the bound of that rule alone.
  assert found["epsilon_lb"] == pytest.approx(
      privacy_audit.one_run_epsilon(1000, 400, 400, 1e-5, 0.05 / 12), rel=1e-9)
  assert found["epsilon_lb"] < privacy_audit.one_run_epsilon(1000, 400, 400, 1e-5) - 0.3
  assert privacy_audit.one_run_audit(rng.normal(size=1000), included, 1e-5)["epsilon_lb"] == 0
  # Wrong-signed scores are guessed wrong, never rewarded.
  assert privacy_audit.one_run_audit(-included.astype(float), included, 1e-5)["epsilon_lb"] == 0


def _audit_config(seed=0):
  """A DP VAE on the 8x8 digits whose noise is solved for epsilon = 1 over 40 steps; each of
  200 white-box canaries is drawn 2.5 times on average (q = 96 / N, N = 1,438 + canaries)."""
  return load_config("dp_vae_mnist", "smoke", **{
      "data.name": "digits", "train.num_steps": 40, "train.batch_size": 128,
      "train.checkpoint_every_steps": 40, "log.every_steps": 40,
      "privacy.expected_batch_size": 96, "privacy.noise_multiplier": -1.0,
      "privacy.target_epsilon": 1.0, "audit.canaries": 200, "audit.seed": seed})


def test_the_audit_catches_a_dp_sgd_that_adds_no_noise(tmp_path, monkeypatch):
  """The mechanism's noise switched off in the product code while the accountant still
  claims epsilon = 1: the white-box canaries show it (measured: bound 1.89 > 1)."""
  monkeypatch.setattr(dpsgd, "noise_like", lambda tree, key, std: jax.tree.map(
      jnp.zeros_like, tree))
  report = audit.run(_audit_config(), str(tmp_path))
  found = report["metrics"]
  assert found["epsilon"] == pytest.approx(1.0, rel=1e-3)
  assert found["audit_white_box_epsilon_lb"] > 1.0, found
  with open(report["path"]) as f:
    written = json.load(f)
  assert written["metrics"] == found and written["checkpoint"] == "audit"
  assert written["provenance"]["privacy"]["noise_multiplier"] > 0  # What was claimed.


@pytest.mark.parametrize("seed", [0, 1])
def test_the_audit_stays_below_the_accountants_epsilon(seed, tmp_path):
  report = audit.run(_audit_config(seed), str(tmp_path))["metrics"]
  assert report["epsilon"] == pytest.approx(1.0, rel=1e-3)
  for kind in ("white_box", "black_box"):
    assert report[f"audit_{kind}_canaries"] == 200
    assert report[f"audit_{kind}_epsilon_lb"] <= report["epsilon"], report


def test_the_audit_mode_refuses_a_config_without_privacy(tmp_path):
  result = run_main("--config=experiments/vae_mnist.py:smoke", f"--workdir={tmp_path}",
                    "--mode=audit")
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("fairgen: error:")]
  assert len(lines) == 1 and "no privacy section" in lines[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
