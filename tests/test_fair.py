"""Fairness mitigations (fairgen/fairness/) and the fairness evaluators
(fairgen/evaluation/groups.py)."""

import importlib.util
import json
import os
import subprocess
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, TIMING_KEYS, final_state, load_config, subprocess_env
from fairgen import config as config_lib
from fairgen import data
from fairgen import fairness as fair
from fairgen.evaluation import context
from fairgen.evaluation import groups
from fairgen.evaluation import modes
from fairgen import sampling
from fairgen import experiment
from fairgen import train
from fairgen.data import bias
from fairgen.fairness import importance
from fairgen.classifiers import backbones
from fairgen.classifiers import fit

METHODS = fair.METHODS


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
  """Tiny attribute and label classifiers for the colour variant (3-channel images)."""
  root = tmp_path_factory.mktemp("classifiers")
  out = {}
  for label, subset, steps in (("attr", "balanced", 40), ("label", "all", 20)):
    options = {"attribute": "color", "subset": subset}
    train_src = data.load({"name": "biased_mnist", "options": options}, "train")
    test_src = data.load({"name": "biased_mnist", "options": options}, "test")
    params, info = fit.train_classifier(
        train_src, test_src, label_key=label, num_classes=2 if label == "attr" else None,
        steps=steps, batch_size=32, width=8, feature_dim=16)
    out[label] = backbones.save_classifier(str(root / label), params, info)
    out[f"{label}_accuracy"] = info["test_accuracy"]
  return out


def fair_config(method, classifiers, **overrides):
  return load_config("fair_mnist", f"method={method},attribute=color,smoke", **{
      "fair.classifier_dir": classifiers["attr"], "eval.backbone_dir": classifiers["label"],
      **overrides})


# --- Pieces. ---------------------------------------------------------------------------


def test_resample_probs_give_each_group_its_target_rate():
  groups = np.array([0] * 90 + [1] * 10)
  probs = fair.resample_probs(groups, np.array([0.5, 0.5]))
  np.testing.assert_allclose(probs[groups == 0].sum(), 0.5)
  np.testing.assert_allclose(probs[groups == 1].sum(), 0.5)
  probs = fair.resample_probs(groups, np.array([0.25, 0.75]))
  np.testing.assert_allclose(probs[groups == 1].sum(), 0.75)
  with pytest.raises(data.DataError, match="no examples"):
    fair.resample_probs(np.zeros(5, np.int64), np.array([0.5, 0.5]))


def test_weighted_sampler_is_a_pure_function_of_the_step():
  groups = np.array([0] * 900 + [1] * 100)
  probs = fair.resample_probs(groups, np.array([0.5, 0.5]))
  a = data.WeightedSampler(probs, 64, seed=3)
  b = data.WeightedSampler(probs, 64, seed=3)
  np.testing.assert_array_equal(a.indices(17), b.indices(17))
  assert not np.array_equal(a.indices(17), a.indices(18))
  drawn = np.concatenate([a.indices(s) for s in range(300)])
  share = np.mean(groups[drawn] == 1)
  assert abs(share - 0.5) < 0.02, share  # 19,200 draws: std 0.0036.


def test_prior_labels_follow_exact_quotas():
  labels = sampling.prior_labels(1000, 2, (0.7, 0.3))
  assert np.bincount(labels).tolist() == [700, 300]
  labels = sampling.prior_labels(10, 3, (1 / 3, 1 / 3, 1 / 3))
  assert sorted(np.bincount(labels).tolist()) == [3, 3, 4]
  np.testing.assert_array_equal(sampling.prior_labels(6, 2), [0, 1, 0, 1, 0, 1])


@pytest.mark.parametrize("divergence", ["kl", "l2"])
def test_penalty_gradient_moves_generated_groups_to_the_target(divergence):
  """Toy generator: images of brightness b + noise; the frozen classifier says group 1 if bright.

  Gradient descent on the penalty alone must move the batch-mean group distribution from
  about 0.9/0.1 toward the 0.5/0.5 target.
  """
  noise = jax.random.normal(jax.random.key(0), (256, 8, 8, 1))

  def probs_fn(images):
    logit = 4.0 * jnp.mean(images, axis=(1, 2, 3))
    return jnp.stack([jax.nn.sigmoid(-logit), jax.nn.sigmoid(logit)], axis=-1)

  penalty = fair.attribute_penalty(probs_fn, np.array([0.5, 0.5]), divergence, weight=1.0)

  def loss(b):
    return penalty(b + 0.5 * noise)[0]

  b = jnp.array(-0.55)  # sigmoid(4 * -0.55) ~ 0.1 of the batch in group 1.
  start = float(penalty(b + 0.5 * noise)[1]["gen_group_1"])
  assert start < 0.15
  grad = jax.grad(loss)(b)
  assert grad < 0  # Brighter images: more of group 1.
  # A decaying step: the L2 norm's gradient does not vanish near the optimum.
  step = jax.jit(lambda b, lr: b - lr * jax.grad(loss)(b))
  for t in range(300):
    b = step(b, 0.3 * 0.99**t)
  value, metrics = penalty(b + 0.5 * noise)
  assert abs(float(metrics["gen_group_1"]) - 0.5) < 0.02
  assert float(value) < 0.01


def test_penalty_matches_the_discrepancy_definitions():
  probs = jnp.array([[0.8, 0.2], [1.0, 0.0]])
  kl, _ = fair.attribute_penalty(lambda x: x, np.array([0.5, 0.5]), "kl")(probs)
  l2, _ = fair.attribute_penalty(lambda x: x, np.array([0.5, 0.5]), "l2", weight=2.0)(probs)
  p = np.array([0.9, 0.1])
  np.testing.assert_allclose(kl, np.sum(p * np.log(p / 0.5)), rtol=1e-5)
  np.testing.assert_allclose(l2, 2.0 * np.linalg.norm(p - 0.5), rtol=1e-5)


# --- Four intersectional groups (CelebA's Black_Hair x Male). ------------------------------


def test_four_groups_target_resampling_and_penalty():
  c = load_config("fair_mnist", "method=resample,smoke")
  c.fair.target = (0.1, 0.2, 0.3, 0.4)
  target = fair.target_distribution(c, 4)
  np.testing.assert_allclose(target, [0.1, 0.2, 0.3, 0.4])
  with pytest.raises(config_lib.ConfigError, match="4 entries; the data has 2 groups"):
    fair.target_distribution(c, 2)
  groups = np.repeat(np.arange(4), [437, 415, 63, 85])  # Choi et al.'s multi split, /60.
  probs = fair.resample_probs(groups, target)
  np.testing.assert_allclose([probs[groups == g].sum() for g in range(4)], target)
  sampler = data.WeightedSampler(probs, 100, seed=0)
  drawn = groups[np.concatenate([sampler.indices(s) for s in range(200)])]
  np.testing.assert_allclose(np.bincount(drawn, minlength=4) / len(drawn), target, atol=0.01)
  value, metrics = fair.attribute_penalty(lambda x: x, np.full(4, 0.25), "l2")(
      jnp.eye(4)[jnp.array([0, 0, 1, 3])])
  np.testing.assert_allclose(value, np.linalg.norm(np.array([0.5, 0.25, 0, 0.25]) - 0.25),
                             rtol=1e-5)
  assert float(metrics["gen_group_2"]) == 0 and float(metrics["gen_group_3"]) == 0.25


class _GroupInFirstPixel:
  """A stand-in attribute classifier of 4 groups: an image's group is its first pixel."""

  num_classes = 4

  def probs(self, images):
    return np.eye(4)[np.asarray(images)[:, 0, 0, 0].astype(int)]

  def describe(self):
    return {"path": None}


def test_fairness_evaluators_score_four_groups(tmp_path):
  c = load_config("fair_mnist", "method=baseline,smoke")
  c.fair.target, c.fair.bootstrap, c.fair.group_samples = (0.4, 0.3, 0.2, 0.1), 20, 25
  c.eval.generator = "train_data"  # Scores the given samples only (no extra draws).
  rng = np.random.default_rng(0)
  fake_groups = np.repeat(np.arange(4), [50, 30, 12, 8])
  real_attr = np.repeat(np.arange(4), 30)
  real = types.SimpleNamespace(attribute_classifier=_GroupInFirstPixel(),
                               batch={"attr": real_attr},
                               outputs=(rng.normal(size=(120, 3)), None))
  ctx = context.EvalContext(types.SimpleNamespace(config=c), None, real, 0, str(tmp_path))
  ctx.__dict__["fake_images"] = np.broadcast_to(
      fake_groups[:, None, None, None].astype(np.float32), (100, 2, 2, 1))
  ctx.__dict__["fake_outputs"] = (rng.normal(size=(100, 3)), None)
  fd = dict(groups.fairness_discrepancy(ctx))
  p, t = np.array([0.5, 0.3, 0.12, 0.08]), np.array(c.fair.target)
  np.testing.assert_allclose([fd[f"group_share_{g}"] for g in range(4)], p)
  np.testing.assert_allclose(fd["fd_l2"], np.linalg.norm(p - t))
  np.testing.assert_allclose(fd["fd_kl"], np.sum(p * np.log(p / t)))
  assert fd["fd_l2_std"] > 0
  assert os.path.exists(tmp_path / "groups_step_000000.png")
  quality = dict(groups.group_quality(ctx))
  # At most min(real count 30, fair.group_samples 25) generated samples per group count.
  assert [quality[f"n_gen_group_{g}"] for g in range(4)] == [25, 25, 12, 8]
  assert all(f"fid_group_{g}" in quality and f"recall_group_{g}" in quality
             for g in range(4))
  assert quality["fid_group_max"] == max(quality[f"fid_group_{g}"] for g in range(4))
  np.testing.assert_allclose(groups.describe(c, _GroupInFirstPixel())["target"], t)


class _FlippingClassifier:
  """Two groups: an image's group is its first pixel, flipped where its second pixel is 1."""

  num_classes = 2

  def probs(self, images):
    x = np.asarray(images)
    g = x[:, 0, 0, 0].astype(int)
    return np.eye(2)[np.where(x[:, 0, 1, 0] > 0.5, 1 - g, g)]


def _images(groups, flips):
  x = np.zeros((len(groups), 2, 2, 1), np.float32)
  x[:, 0, 0, 0], x[:, 0, 1, 0] = groups, flips
  return x


def test_cleam_corrects_the_shares_for_the_classifiers_confusions(tmp_path):
  c = load_config("fair_mnist", "method=baseline,smoke")
  c.eval.generator, c.eval.num_samples = "train_data", 1000
  # Held-out real data: the classifier is 90% right on group 0 and 95% on group 1.
  real_groups = np.repeat([0, 1], 100)
  real_flips = np.concatenate([np.arange(100) < 10, np.arange(100) < 5])
  real = types.SimpleNamespace(
      attribute_classifier=_FlippingClassifier(), batch={"attr": real_groups},
      chunks=lambda: iter([{"image": _images(real_groups, real_flips), "attr": real_groups}]))
  ctx = context.EvalContext(types.SimpleNamespace(config=c), None, real, 0, None)
  # A fair generator (500/500) with the same error rates: the classifier sees 475/525.
  fake_groups = np.repeat([0, 1], 500)
  fake_flips = np.concatenate([np.arange(500) < 50, np.arange(500) < 25])
  order = np.random.default_rng(0).permutation(1000)
  ctx.__dict__["fake_images"] = _images(fake_groups[order], fake_flips[order])
  out = dict(groups.cleam(ctx))
  assert (out["classifier_accuracy_0"], out["classifier_accuracy_1"]) == (0.9, 0.95)
  assert out["naive_share_0"] == pytest.approx(0.475)
  assert out["cleam_share_0"] == pytest.approx(0.5)  # (0.475 - 0.05) / (0.9 + 0.95 - 1)
  assert out["cleam_low_share_0"] < 0.5 < out["cleam_high_share_0"]
  assert out["naive_fd_l2"] == pytest.approx(np.sqrt(2) * 0.025)
  assert out["cleam_fd_l2"] == pytest.approx(0.0, abs=1e-9)


def test_bias_subsets_all_and_balanced():
  all_rows = bias.biased_mnist("test", subset="all")
  balanced = bias.biased_mnist("test", attribute="color", num_colors=3, subset="balanced")
  assert len(all_rows) == 1000 and all_rows.spec.num_groups == 2
  counts = np.bincount(balanced.arrays["attr"])
  assert len(set(counts.tolist())) == 1 and counts.sum() > 900
  assert not balanced.arrays["is_ref"].any()


def test_cache_tag_names_the_domain_not_the_rows():
  a = {"name": "biased_mnist", "options": {"attribute": "color", "num_colors": 3,
                                           "subset": "union", "ref_fraction": 0.1}}
  b = {"name": "biased_mnist", "options": {"attribute": "color", "num_colors": 3}}
  assert data.cache_tag(a) == data.cache_tag(b) == "biased_mnist-attribute=color-num_colors=3"
  assert data.cache_tag({"name": "mnist_5k"}) == "mnist_5k"
  # A default spelled out names the same classifier as the command that omits it.
  assert data.cache_tag({"name": "biased_mnist", "options": {
      "attribute": "digit_group", "digits": [0, 1, 2, 3, 4]}}) == "biased_mnist"


def test_config_checks():
  with pytest.raises(config_lib.ConfigError, match="Unknown method"):
    load_config("fair_mnist", "method=reweight")
  with pytest.raises(config_lib.ConfigError, match="Unknown config flag"):
    load_config("fair_mnist", "tiny")
  c = load_config("fair_mnist", "method=importance,smoke")
  c.data.options.subset = "biased"
  with pytest.raises(config_lib.ConfigError, match="subset='union'"):
    train.validate(c)
  c = load_config("fair_mnist", "method=penalty,model=vae,smoke")
  with pytest.raises(config_lib.ConfigError, match="not supported by objective.name='vae'"):
    train.validate(c)
  c = load_config("fair_mnist", "method=conditional,smoke")
  c.model.conditional = False
  with pytest.raises(config_lib.ConfigError, match="model.conditional=True"):
    train.validate(c)


def test_missing_attribute_classifier_names_the_command(tmp_path):
  c = load_config("fair_mnist", "method=penalty,smoke")
  c.fair.classifier_dir = str(tmp_path / "nowhere")
  with pytest.raises(backbones.BackboneNotFoundError,
                     match="train_classifier.py --dataset=biased_mnist --label=attr"):
    experiment.setup(c)


# --- Training with every mitigation, end to end. ----------------------------------------


def test_importance_weights_rebalance_the_groups(classifiers):
  """The density-ratio classifier reweights the 90/10 biased colour digits toward 50/50."""
  c = fair_config("importance", classifiers, **{
      "fair.ratio.steps": 150, "fair.ratio.lr": 3e-3, "fair.ratio.width": 8,
      "fair.ratio.feature_dim": 16, "data.options.biased_size": 1000})
  source = data.load(c.data, "train")
  weights, info = importance.fit_importance_weights(c, source)
  diag = info["diagnostics"]
  np.testing.assert_allclose(diag["raw_proportions"], [0.9, 0.1])
  assert diag["effective_proportions"][1] > 0.35, diag
  is_ref = source.arrays["is_ref"]
  np.testing.assert_array_equal(weights[is_ref == 1], 1.0)


# Every method trains in the Choi quick run below (one device); these two add a batch
# column or replicated constants, so they also run sharded on 8 devices, to the numbers of
# one device (resample's sampler runs as a 2-process, 8-device job in test_multiprocess.py).
@pytest.mark.parametrize("method", ["importance", "penalty"])
def test_mitigations_with_their_own_data_path_train_on_8_devices_as_on_1(
    method, classifiers, tmp_path, partitionable_rng):
  results = {}
  for n in (1, 8):
    c = fair_config(method, classifiers, **{"mesh.data": n, "eval.every_steps": 0})
    workdir = str(tmp_path / f"d{n}")
    summary = train.train_and_evaluate(c, workdir)
    assert summary["final_step"] == c.train.num_steps
    results[n] = summary["scalars"], final_state(workdir, c)[1]
  (s1, p1), (s8, p8) = results[1], results[8]
  assert np.isfinite(s8["g_loss"])
  if method == "penalty":
    assert "fair_penalty" in s8 and "gen_group_1" in s8
  for key in s1:
    if key not in TIMING_KEYS:
      np.testing.assert_allclose(s8[key], s1[key], rtol=1e-5, atol=1e-6, err_msg=key)
  for a, b in zip(p1, p8, strict=True):  # Adam's steps amplify rounding in the weights.
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
  if method == "importance":
    ratio = os.path.join(str(tmp_path / "d8"), "density_ratio")
    assert os.path.exists(os.path.join(ratio, "weights.npy"))
    with open(os.path.join(ratio, "info.json")) as f:
      assert "effective_proportions" in json.load(f)["diagnostics"]


def test_importance_resume_reuses_the_saved_weights(classifiers, workdir):
  c = fair_config("importance", classifiers, **{"eval.every_steps": 0})
  c.train.num_steps = 2
  train.train_and_evaluate(c, workdir)
  path = os.path.join(workdir, "density_ratio", "weights.npy")
  saved = np.load(path)
  np.save(path, np.full_like(saved, 2.0))  # A marker: a refit would overwrite it.
  c.train.num_steps = 4
  train.train_and_evaluate(c, workdir)
  np.testing.assert_array_equal(np.load(path), 2.0)


def test_conditional_generator_samples_the_target_prior(classifiers, workdir):
  c = fair_config("conditional", classifiers, **{"eval.every_steps": 0,
                                                  "fair.target": (0.75, 0.25)})
  exp = experiment.setup(c)
  assert exp.objective.num_classes == 2 and exp.objective.label_probs == (0.75, 0.25)
  state = experiment.init_state(exp)
  images, _ = sampling.generate_images(exp, state, jax.random.key(0), 8)
  chex.assert_shape(images, (8, 28, 28, 3))
  labels = sampling.prior_labels(400, 2, exp.objective.label_probs)
  assert np.bincount(labels).tolist() == [300, 100]


def test_fairness_evaluators_on_a_copy_of_the_biased_data(classifiers, workdir):
  """The copy-of-the-training-data reference: a 90/10 biased set scores FD-L2 = 0.566."""
  assert classifiers["attr_accuracy"] > 0.99  # Colour is easy: the FD below is exact.
  c = fair_config("baseline", classifiers, **{
      "eval.generator": "train_data", "eval.num_samples": 200, "data.options.subset": "biased",
      "eval.metrics": ("fairness_discrepancy", "group_quality", "cleam")})
  out = modes.evaluate(c, workdir)
  m = out["metrics"]
  np.testing.assert_allclose(m["fd_l2"], np.sqrt(2) * 0.4, atol=0.01)
  # An accurate classifier: CLEAM's shares are the naive ones, both near the true 10%.
  assert m["naive_share_1"] == pytest.approx(m["group_share_1"])
  np.testing.assert_allclose(m["cleam_share_1"], 0.1, atol=0.01)
  np.testing.assert_allclose(m["group_share_1"], 0.1, atol=0.01)
  assert 0 < m["fd_l2_std"] < 0.05
  assert m["n_gen_group_1"] == 20  # The 200 copies hold exactly 20 of group 1.
  assert "fid_group_0" in m and "fid_group_1" in m and "recall_group_1" in m
  assert os.path.exists(os.path.join(workdir, "eval", "groups_step_000000.png"))
  with open(out["path"]) as f:
    provenance = json.load(f)["provenance"]
  assert provenance["attribute_classifier"]["path"] == classifiers["attr"]
  assert provenance["target"] == [0.5, 0.5]


def test_trained_model_evaluates_with_fairness_metrics(classifiers, workdir):
  c = fair_config("resample", classifiers, **{"eval.every_steps": 4})
  summary = train.train_and_evaluate(c, workdir)
  ev = summary["eval"]
  # The fairness numbers of one evaluation describe the same generated groups.
  shares = np.array([ev["group_share_0"], ev["group_share_1"]])
  counts = shares * c.eval.num_samples  # hard labels of eval.num_samples samples
  np.testing.assert_allclose(counts, np.round(counts), atol=1e-6)
  np.testing.assert_allclose(ev["fd_l2"], np.linalg.norm(shares - 0.5), atol=1e-5)
  kl = np.sum(shares * np.log(np.where(shares > 0, shares, 1.0) / 0.5))  # 0 log 0 = 0
  np.testing.assert_allclose(ev["fd_kl"], kl, atol=1e-5)
  assert ev["fid"] > 0 and ev["fd_l2_std"] >= 0
  assert os.path.exists(os.path.join(workdir, "eval", "groups_step_000004.png"))


def test_choi_repro_models_flag_chooses_each_models_methods(capsys):
  """``--models`` runs each model for those of ``--methods`` it supports, or for the ones it
  names; an unknown model or a method the model lacks is one ``fairgen: error:`` line, status
  2."""
  spec = importlib.util.spec_from_file_location(
      "choi2020_mnist", os.path.join(REPO, "experiments", "repro", "choi2020_mnist.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  methods = ("baseline", "importance", "penalty")
  assert script.parse_runs("dcgan,ddpm", methods) == [
      ("dcgan", "baseline"), ("dcgan", "importance"), ("dcgan", "penalty"),
      ("ddpm", "baseline"), ("ddpm", "importance")]
  assert script.parse_runs("ddpm:importance+baseline", methods) == [
      ("ddpm", "baseline"), ("ddpm", "importance")]
  assert script.parse_runs("dcgan:resample,ddpm", ("penalty",)) == [("dcgan", "resample")]
  # Each model's methods come from its objective's capabilities: the documented default
  # (every method) gives the DCGAN no guidance, DDPM neither, EDM and flow no penalty.
  # (The built-in methods: test_extensions registers one of its own in the same process.)
  every = ("baseline", "importance", "resample", "conditional", "penalty", "guidance")
  assert [m for _, m in script.parse_runs("dcgan", every)] == [
      "baseline", "importance", "resample", "conditional", "penalty"]
  assert [m for _, m in script.parse_runs("edm", every)] == [
      "baseline", "importance", "resample", "conditional", "guidance"]
  assert [m for _, m in script.parse_runs("ddpm,flow", every)] == [
      "baseline", "importance", "resample", "conditional",
      "baseline", "importance", "resample", "conditional", "guidance"]
  for bad in ("ddpm:penalty", "gan", "dcgan:nope", "dcgan:guidance", "ddpm:guidance"):
    with pytest.raises(SystemExit) as exit_info:
      script.parse_runs(bad, methods)
    assert exit_info.value.code == 2, bad
    err = capsys.readouterr().err
    assert err.startswith("fairgen: error: ") and err.count("\n") == 1, err


# The methods the script treats specially: the baseline (it also measures the copy of the
# data), importance (its density-ratio weights) and penalty (its classifier); the others
# run the same code path (each method's training: the other tests here). DCGAN rows for
# two of them; importance runs on the DDPM row, which fits its own density ratio (the
# script's path for weights is the same for both models; one run fewer keeps it short).
REPRO_METHODS = ("baseline", "penalty")


def test_choi_repro_script_quick_and_resumable(tmp_path):
  """Also a DDPM row (its own U-Net run, importance-weighted: ``--models=...,ddpm:importance``;
  the DDPM baseline is the same run without weights, and test_diffusion trains fair DDPMs)."""
  env = subprocess_env()
  cmd = [sys.executable, "experiments/repro/choi2020_mnist.py", "--quick", f"--out={tmp_path}",
         f"--methods={','.join(REPRO_METHODS)}", "--models=dcgan,ddpm:importance"]
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "attr classifier: test accuracy" in result.stdout
  with open(tmp_path / "results.csv") as f:
    rows = f.read().splitlines()
  assert len(rows) == 1 + len(REPRO_METHODS) + 1
  table = {line.split(" | ")[1]: line for line in result.stdout.splitlines()
           if line.startswith("| 0.25 | ")}
  # The copy-of-the-data row is measured: for two groups and a uniform target,
  # FD-L2 = sqrt(2) * |share_1 - 1/2| of the copied data.
  copy_cells = table["training data (copy)"].split(" | ")
  share, fd = float(copy_cells[-2]), float(copy_cells[2])
  assert 0.0 < share < 0.5
  np.testing.assert_allclose(fd, np.sqrt(2) * abs(share - 0.5), atol=2e-3)
  # Each method's row is its own run's evaluation, and its run trained its own mechanism.
  runs = tmp_path / "runs"
  for method in REPRO_METHODS:
    run_dir = runs / f"{method}_ref0.25_seed0"
    with open(run_dir / "metrics.jsonl") as f:
      logged = [json.loads(line) for line in f]
    assert ("fair_penalty" in logged[0]) == (method == "penalty"), method
    reports = sorted((run_dir / "eval").glob("step_*.json"))
    with open(reports[-1]) as f:
      ev = json.load(f)["metrics"]
    cells = table[method].split(" | ")
    assert cells[2] == f"{ev['fd_l2']:.3f}" and cells[5] == f"{ev['fid']:.1f}", method
    assert cells[3] == f"{ev['cleam_fd_l2']:.3f}", method
  with open(runs / "ddpm_importance_ref0.25_seed0" / "config.json") as f:
    assert json.load(f)["model"]["name"] == "unet"
  assert "| 0.25 | ddpm importance | " in result.stdout
  assert "ddpm penalty" not in result.stdout and "ddpm baseline" not in result.stdout
  assert (runs / "ddpm_importance_ref0.25_seed0" / "density_ratio" / "weights.npy").exists()
  assert not (runs / "baseline_ref0.25_seed0" / "density_ratio").exists()
  # A second invocation reuses the finished runs instead of training them again; a metric
  # missing from a finished run's result (added to the script later) is evaluated again,
  # and so is a run trained to the end whose result was never saved (stopped during its
  # final evaluation), without training it again.
  result_file = runs / "baseline_ref0.25_seed0" / "repro_result.json"
  with open(result_file) as f:
    finished = json.load(f)
  with open(result_file, "w") as f:
    json.dump({k: v for k, v in finished.items() if not k.startswith("cleam")}, f)
  unsaved = runs / "penalty_ref0.25_seed0"
  with open(unsaved / "repro_result.json") as f:
    unsaved_result = json.load(f)
  os.remove(unsaved / "repro_result.json")
  logged_lines = (unsaved / "metrics.jsonl").read_text()
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  printed = [line for line in again.stdout.splitlines() if "seed 0: fd_l2" in line]
  assert len(printed) == 1 and printed[0].startswith("penalty "), again.stdout
  assert (unsaved / "metrics.jsonl").read_text() == logged_lines  # Not trained again.
  with open(unsaved / "repro_result.json") as f:
    evaluated = json.load(f)
  assert {k: v for k, v in evaluated.items() if k != "seconds"} == pytest.approx(
      {k: v for k, v in unsaved_result.items() if k != "seconds"}, nan_ok=True)
  with open(tmp_path / "results.csv") as f:
    again_rows = f.read().splitlines()
  assert [r for r in again_rows if not r.startswith("penalty,")] == [
      r for r in rows if not r.startswith("penalty,")]
  with open(result_file) as f:
    assert json.load(f) == pytest.approx(finished, nan_ok=True)


@pytest.mark.parametrize("model", ["edm", "flow"])
def test_guidance_steers_a_sampler_toward_each_samples_target_group(classifiers, model):
  """fair.method='guidance' on EDM and flow matching: the sampler draws each sample's group
  from fair.target and follows the attribute classifier toward it. With an untrained
  network (EDM's D shrinks x, flow's v is 0: unguided samples are one blur, or the noise,
  of one predicted group) the classifier puts every guided sample in its assigned group;
  unguided (scale 0), half of them. (A one-block DiT, zero at initialisation like the U-Net,
  stands in for it: the guided sampler's gradient through the U-Net compiles for minutes on
  a CPU.)"""
  from fairgen.fairness import guidance
  labels = jnp.arange(16) % 2
  matched = {}
  for scale in (0.0, 20.0):
    config = load_config("fair_mnist", f"method=guidance,model={model},attribute=color,smoke", **{
        "fair.classifier_dir": classifiers["attr"], "eval.backbone_dir": classifiers["label"],
        "fair.guidance.scale": scale, "objective.sample_steps": 10,
        "fair.target": (0.5, 0.5)})
    config.model = {"name": "dit", "patch": 7, "hidden": 32, "depth": 1, "heads": 2}
    exp = experiment.setup(config)
    assert exp.objective.num_classes == 2 and exp.objective.label_probs == (0.5, 0.5)
    state = jax.jit(exp.objective.init)(exp.init_rng)
    x = jax.jit(exp.objective.generate)(state, jax.random.key(0), labels)
    guide = guidance.sampler_guidance(config, exp.spec)
    predicted = np.argmax(np.asarray(guide.log_prob(guide.variables, x)), axis=-1)
    matched[scale] = float(np.mean(predicted == np.asarray(labels)))
  assert matched[0.0] == 0.5 and matched[20.0] == 1.0, matched
