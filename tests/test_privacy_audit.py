"""The privacy audits: AUC and advantage against scikit-learn, nearest-neighbour distances
against brute force, near copies, and the evaluators wired to a model's own scores."""

import dataclasses
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import distance
from sklearn import metrics as skm

from conftest import REPO, load_config, subprocess_env
from fairgen import data, experiment, train
from fairgen.classifiers import backbones, fit
from fairgen.evaluation import modes, runner
from fairgen.evaluation.context import EvalContext, RealData
from fairgen.metrics import privacy_audit


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
