"""Evaluation end to end: periodic evaluation, best checkpoint, evaluate and sample modes."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import load_config, run_main
from fairgen import checkpoint, data, experiment, sampling, train
from fairgen.evaluation import modes
from fairgen.classifiers import backbones
from fairgen.classifiers import fit

EVAL_OVERRIDES = {"eval.num_samples": 64, "eval.batch_size": 32, "eval.kid_subsets": 5,
                  "eval.kid_subset_size": 32, "eval.is_splits": 2}


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
  """A tiny mnist_5k classifier (a few steps: its accuracy is not the point here)."""
  directory = str(tmp_path_factory.mktemp("backbone"))
  params, info = fit.train_classifier(
      data.load({"name": "mnist_5k"}, "train"), data.load({"name": "mnist_5k"}, "test"),
      steps=20, batch_size=32, width=8, feature_dim=16, augment=False)
  backbones.save_classifier(directory, params, info, overwrite=True)
  return directory


def _gan_config(backbone_dir, **extra):
  return load_config("dcgan_mnist", "smoke", **{**EVAL_OVERRIDES,
                                                "eval.backbone_dir": backbone_dir, **extra})


def test_periodic_evaluation_logs_metrics_and_keeps_the_best(backbone_dir, workdir):
  config = _gan_config(backbone_dir, **{"eval.every_steps": 2})
  summary = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if "eval/fid" in r]
  assert [r["step"] for r in evals] == [2, 4]
  for r in evals:  # The log carries what each evaluation's JSON report holds.
    with open(os.path.join(workdir, "eval", f"step_{r['step']:06d}.json")) as f:
      report = json.load(f)["metrics"]
    for key in ("fid", "kid", "precision", "recall", "density", "coverage", "is"):
      assert r[f"eval/{key}"] == pytest.approx(report[key], rel=1e-6), key
  assert evals[0]["eval/fid"] != evals[1]["eval/fid"]  # two states, two measurements
  best = checkpoint.read_best(workdir)
  fids = {r["step"]: r["eval/fid"] for r in evals}
  assert best["step"] == min(fids, key=fids.get) and best["value"] == pytest.approx(min(fids.values()))
  assert os.listdir(os.path.join(workdir, "best")) == [str(best["step"])]
  assert summary["eval"]["fid"] == pytest.approx(fids[4])


def test_missing_backbone_fails_before_training(tmp_path, workdir):
  config = _gan_config(str(tmp_path / "none"), **{"eval.every_steps": 2})
  with pytest.raises(backbones.BackboneNotFoundError, match="train_classifier.py"):
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "2"))


def test_evaluate_and_sample_modes_in_a_new_process(backbone_dir, workdir):
  in_loop = train.train_and_evaluate(_gan_config(backbone_dir, **{"eval.every_steps": 4}),
                                     workdir)["eval"]
  ckpt_before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  flags = ["--config=experiments/dcgan_mnist.py:smoke", f"--workdir={workdir}",
           f"--config.eval.backbone_dir={backbone_dir}"] + [
               f"--config.{k}={v}" for k, v in EVAL_OVERRIDES.items()]
  result = run_main(*flags, "--mode=evaluate")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "eval", "step_000004.json")) as f:
    report = json.load(f)
  assert report["step"] == 4 and report["provenance"]["backbone"]["path"] == backbone_dir
  # The same checkpoint, evaluated again in a new process, measures the same numbers.
  for key in ("fid", "kid", "precision", "recall", "is"):
    assert report["metrics"][key] == pytest.approx(in_loop[key], rel=1e-4, abs=1e-6), key
  assert "fid" in result.stdout and "precision" in result.stdout

  result = run_main(*flags, "--mode=sample", "--config.sample.num=16")
  assert result.returncode == 0, result.stderr[-3000:]
  out = os.path.join(workdir, "sample", "step_000004")
  for name in ("grid", "interpolation"):
    assert os.path.getsize(os.path.join(out, f"{name}.png")) > 0
    with np.load(os.path.join(out, f"{name}.npz")) as npz:
      assert np.all(np.isfinite(npz["images"]))
      assert np.std(npz["images"], axis=0).mean() > 1e-3  # different latents, different images
  with np.load(os.path.join(out, "grid.npz")) as npz:
    assert npz["images"].shape == (16, 28, 28, 1) and npz["latents"].shape == (16, 16)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ckpt_before


def test_sampling_is_seeded_and_truncation_bounds_latents(backbone_dir, workdir):
  config = _gan_config(backbone_dir)
  train.train_and_evaluate(config, workdir)
  exp = experiment.setup(config)
  state, _ = experiment.restore_checkpoint(exp, workdir)
  a, za = sampling.generate_images(exp, state, jax.random.key(3), 10, truncation=0.5)
  b, zb = sampling.generate_images(exp, state, jax.random.key(3), 10, truncation=0.5)
  np.testing.assert_array_equal(a, b)
  assert np.abs(za).max() <= 0.5
  # Streaming (evaluation's path, memory bounded by a chunk) gives the same samples in order.
  whole, _ = sampling.generate_images(exp, state, jax.random.key(4), 70, batch_size=32)
  chunks = list(sampling.iterate_images(exp, state, jax.random.key(4), 70, batch_size=32))
  assert [len(c) for c in chunks] == [32, 32, 6]
  np.testing.assert_allclose(np.concatenate(chunks), whole, atol=1e-6)


def test_conditional_model_writes_a_per_class_grid(backbone_dir, workdir):
  config = _gan_config(backbone_dir, **{"model.conditional": True})
  train.train_and_evaluate(config, workdir)
  config.sample.num = 20
  files = modes.sample(config, workdir)
  per_class = [f for f in files if f.endswith("per_class.npz")]
  assert per_class
  with np.load(per_class[0]) as npz:
    assert sorted(set(npz["labels"].tolist())) == list(range(10))


def test_best_checkpoint_and_train_data_reference(backbone_dir, workdir):
  config = _gan_config(backbone_dir, **{"eval.every_steps": 2})
  train.train_and_evaluate(config, workdir)
  config.eval.checkpoint = "best"
  out = modes.evaluate(config, workdir)
  assert out["step"] == checkpoint.read_best(workdir)["step"]
  config.eval.generator = "train_data"
  reference = modes.evaluate(config, workdir)
  # Real training digits are far closer to real test digits than a 4-step GAN's samples.
  assert reference["metrics"]["fid"] < out["metrics"]["fid"]
  assert os.path.exists(os.path.join(workdir, "eval", "reference_train_data.json"))


def test_vae_likelihood_evaluator(workdir):
  config = load_config("vae_mnist", "smoke", **{"eval.metrics": ("likelihood",),
                                                "eval.iwae_k": 8, "eval.batch_size": 50,
                                                "eval.likelihood_examples": 100})
  train.train_and_evaluate(config, workdir)
  out = modes.evaluate(config, workdir)["metrics"]
  assert out["nll_iwae"] <= out["neg_elbo"] + 1.0
  assert out["bits_per_dim"] == pytest.approx(out["nll_iwae"] / (784 * np.log(2)), rel=1e-5)


def test_unknown_evaluator_is_a_config_error():
  from fairgen import config as config_lib
  config = load_config("dcgan_mnist", "smoke", **{"eval.metrics": ("fid", "fud")})
  with pytest.raises(config_lib.ConfigError, match="fud"):
    train.validate(config)


def test_fid_from_a_statistics_file_equals_fid_from_features(backbone_dir, workdir, tmp_path):
  config = _gan_config(backbone_dir, **{"eval.metrics": ("fid", "kid")})
  train.train_and_evaluate(config, workdir)
  stats = str(tmp_path / "mnist_5k_test.npz")
  out = run_main("--config=experiments/dcgan_mnist.py:smoke", f"--out={stats}",
                 f"--config.eval.backbone_dir={backbone_dir}", "--num=64",
                 script="tools/fid_stats.py")
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout.strip().splitlines()[-1])["num_samples"] == 64
  direct = modes.evaluate(config, workdir)["metrics"]
  config.eval.reference_stats = stats
  from_file = modes.evaluate(config, workdir)
  # The same 64 test images (eval.seed's order), summarised by the tool or in the evaluation.
  assert from_file["metrics"]["fid"] == pytest.approx(direct["fid"], rel=1e-9)
  assert from_file["metrics"]["kid"] == pytest.approx(direct["kid"], rel=1e-9)
  recorded = from_file["provenance"]["reference_stats"]
  assert recorded["num_samples"] == 64 and recorded["provenance"]["split"] == "test"
  # pytorch-fid's layout alone (a published file) is accepted as it is.
  with np.load(stats) as npz:
    np.savez(tmp_path / "published.npz", mu=npz["mu"], sigma=npz["sigma"])
  config.eval.reference_stats = str(tmp_path / "published.npz")
  assert modes.evaluate(config, workdir)["metrics"]["fid"] == pytest.approx(direct["fid"])


def test_a_statistics_file_of_another_backbone_is_refused(backbone_dir, workdir, tmp_path):
  from fairgen.evaluation import context, reference_stats
  config = _gan_config(backbone_dir, **{"eval.metrics": ("fid",)})
  train.train_and_evaluate(config, workdir)
  dim = backbones.load_backbone("classifier", backbone_dir).feature_dim
  other = {"kind": "inception_v3", "weights_sha256": "ab" * 32, "resize": "bilinear",
           "quantize": True}
  cases = {"other.npz": (np.zeros(dim), np.eye(dim), {"backbone": other}, "another backbone"),
           "wide.npz": (np.zeros(dim + 1), np.eye(dim + 1), {}, f"{dim + 1}-d features")}
  for name, (mu, sigma, provenance, message) in cases.items():
    reference_stats.save(str(tmp_path / name), mu, sigma, 10, provenance)
    config.eval.reference_stats = str(tmp_path / name)
    with pytest.raises(context.EvalError, match=message):
      modes.evaluate(config, workdir)


def test_another_evaluation_setup_never_mixes_with_the_recorded_best(backbone_dir, workdir):
  config = _gan_config(backbone_dir, **{"eval.every_steps": 2, "eval.metrics": ("fid",)})
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, checkpoint.BEST_FILE)) as f:
    before = f.read()
  assert json.loads(before)["provenance"]["num_samples"] == 64
  config.train.num_steps = 6
  config.eval.num_samples = 48  # FIDs of 48 and 64 samples are not comparable.
  with pytest.raises(checkpoint.WorkdirError, match="num_real, num_samples differ"):
    train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, checkpoint.BEST_FILE)) as f:
    assert f.read() == before
  # --mode=evaluate with the other setup writes beside the earlier report, not over it.
  first = os.path.join(workdir, "eval", "step_000004.json")
  with open(first) as f:
    earlier = f.read()
  out = modes.evaluate(config, workdir)
  assert out["path"] != first and out["path"].startswith(first[:-len(".json")] + "-")
  with open(first) as f:
    assert f.read() == earlier
