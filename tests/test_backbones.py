"""The classifier backbone: accuracy target, save/load round trip and its error messages."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, subprocess_env
from fairgen import data
from fairgen.classifiers import backbones
from fairgen.classifiers import fit
from fairgen.models.classifier import Classifier


@pytest.fixture(scope="module")
def mnist():
  return data.load({"name": "mnist_5k"}, "train"), data.load({"name": "mnist_5k"}, "test")


@pytest.fixture(scope="module")
def trained(mnist):
  # A narrower, shorter run than the tool's defaults (~15 s on two CPU cores; 98.3%).
  train, test = mnist
  return fit.train_classifier(train, test, steps=600, batch_size=64, lr=3e-3, width=16,
                                    seed=0, augment=True)


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
  params, info = trained
  directory = str(tmp_path_factory.mktemp("backbone") / "classifier_mnist_5k_label")
  backbones.save_classifier(directory, params, info)
  return directory


@pytest.mark.parametrize("shape", [(28, 28, 1), (8, 8, 1), (28, 28, 3)])
def test_classifier_output_shapes(shape):
  model = Classifier(num_classes=7, width=8, feature_dim=16)
  x = jnp.zeros((3, *shape))
  variables = model.init(jax.random.key(0), x)
  out = model.apply(variables, x)
  assert out["features"].shape == (3, 16) and out["logits"].shape == (3, 7)
  out = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  assert out["logits"].shape == (3, 7)


def test_classifier_rejects_images_under_8x8():
  with pytest.raises(ValueError, match="at least 8x8"):
    Classifier(num_classes=2).init(jax.random.key(0), jnp.zeros((1, 7, 7, 1)))


def test_short_training_reaches_the_mnist_5k_accuracy_target(trained):
  _, info = trained
  assert info["test_accuracy"] >= 0.97, info
  assert info["num_test"] == 1000 and info["dataset"] == "mnist_5k"
  assert info["image_shape"] == [28, 28, 1] and info["train_steps"] == 600
  assert info["architecture"] == {"kind": "cnn", "num_classes": 10, "width": 16,
                                  "feature_dim": 128, "dropout": 0.25}
  json.dumps(info)  # It is written to backbone.json as is.


def test_training_is_deterministic_given_the_seed():
  train, test = data.load({"name": "digits"}, "train"), data.load({"name": "digits"}, "test")
  runs = [fit.train_classifier(train, test, steps=30, batch_size=32, width=8, seed=3)
          for _ in range(2)]
  for a, b in zip(*(jax.tree.leaves(params) for params, _ in runs)):
    np.testing.assert_array_equal(a, b)
  assert runs[0][1]["test_accuracy"] == runs[1][1]["test_accuracy"]


def test_round_trip_gives_identical_features_and_probs(trained, saved, mnist):
  params, info = trained
  images = mnist[1].get(np.arange(123))["image"]
  in_memory = backbones.classifier_backbone(params, info)
  loaded = backbones.load_backbone("classifier", saved)
  assert loaded.path == saved and loaded.info == info
  assert (loaded.feature_dim, loaded.num_classes) == (128, 10)
  features, probs = loaded.features_and_probs(images)
  assert features.shape == (123, 128) and probs.shape == (123, 10)
  assert features.dtype == probs.dtype == np.float32
  np.testing.assert_array_equal(features, in_memory.features(images))
  np.testing.assert_array_equal(probs, in_memory.probs(images))
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
  assert np.all(probs >= 0)
  assert loaded.describe() == {"kind": "classifier", "path": saved, "dataset": "mnist_5k",
                               "test_accuracy": info["test_accuracy"]}


def test_padded_chunks_match_one_big_chunk(trained, mnist):
  params, info = trained
  images = mnist[1].get(np.arange(50))["image"]
  whole = backbones.classifier_backbone(params, info, chunk_size=64)
  chunked = backbones.classifier_backbone(params, info, chunk_size=16)  # 16+16+16+2(pad)
  for a, b in zip(whole.features_and_probs(images), chunked.features_and_probs(images)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert whole.features(images[:0]).shape == (0, 128)


def test_wrong_image_shape_raises_naming_both_shapes(trained):
  backbone = backbones.classifier_backbone(*trained)
  with pytest.raises(ValueError, match=r"\(28, 28, 1\).*\(4, 8, 8, 1\)"):
    backbone.probs(np.zeros((4, 8, 8, 1), np.float32))
  with pytest.raises(ValueError, match=r"\(28, 28, 1\)"):
    backbone.features(np.zeros((28, 28, 1), np.float32))


def test_missing_directory_or_files_raise_a_clear_error(tmp_path, saved):
  missing = str(tmp_path / "classifier_mnist_5k_label")
  with pytest.raises(FileNotFoundError, match="tools/train_classifier.py --dataset=mnist_5k"):
    backbones.load_backbone("classifier", missing)
  os.makedirs(missing)
  with pytest.raises(backbones.BackboneNotFoundError, match="backbone.json is missing"):
    backbones.load_classifier(missing)
  with open(os.path.join(missing, "backbone.json"), "w") as f:
    f.write("{}")
  with pytest.raises(backbones.BackboneNotFoundError, match="params"):
    backbones.load_classifier(missing)


def test_save_refuses_to_overwrite_unless_asked(trained, tmp_path):
  params, info = trained
  directory = str(tmp_path / "clf")
  backbones.save_classifier(directory, params, info)
  with pytest.raises(FileExistsError, match="overwrite"):
    backbones.save_classifier(directory, params, info)
  os.makedirs(tmp_path / "other")
  (tmp_path / "other" / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError):
    backbones.save_classifier(str(tmp_path / "other"), params, info)
  info2 = dict(info, test_accuracy=0.5)
  backbones.save_classifier(directory, params, info2, overwrite=True)
  assert backbones.load_classifier(directory).info["test_accuracy"] == 0.5


def test_registry_and_default_directory(monkeypatch, tmp_path):
  assert "classifier" in backbones.BACKBONES
  monkeypatch.setenv("FAIRGEN_CACHE", str(tmp_path))
  assert backbones.default_classifier_dir("mnist_5k") == str(tmp_path / "classifier_mnist_5k_label")
  monkeypatch.delenv("FAIRGEN_CACHE")
  assert backbones.default_classifier_dir("digits", "attr") == os.path.expanduser(
      "~/.cache/fairgen/classifier_digits_attr")


def test_tool_trains_saves_and_refuses_to_overwrite(tmp_path, capsys):
  out = str(tmp_path / "digits")
  cmd = [sys.executable, "tools/train_classifier.py", "--dataset=digits", f"--out={out}",
         "--steps=40", "--width=8", "--log_every=0"]
  env = subprocess_env()
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary["out"] == out
  saved = backbones.load_classifier(out)
  assert saved.info["dataset"] == "digits"
  # The accuracy it reports is the saved classifier's, re-measured here on the test split.
  test = data.load({"name": "digits"}, "test")
  assert summary["test_accuracy"] == pytest.approx(fit.evaluate_accuracy(saved, test), abs=1e-9)
  assert summary["test_accuracy"] > 0.3  # 40 steps on 8x8 digits: well above chance (0.1)
  # The tool refuses before it trains (in-process: a second interpreter start costs seconds).
  spec = importlib.util.spec_from_file_location(
      "train_classifier_tool", os.path.join(REPO, "tools", "train_classifier.py"))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  with pytest.raises(SystemExit) as exit_info:
    tool.main(cmd[2:])
  assert exit_info.value.code == 2
  assert "--overwrite" in capsys.readouterr().err


def test_resnet_classifier_trains_saves_and_reloads(tmp_path):
  """The ResNet-18-style kind (CelebA attributes): learns the 8x8 digits well above chance,
  and its saved architecture ('kind': 'resnet') reloads to the same features; an info file
  written before 'kind' existed loads as the small CNN."""
  train, test = data.load({"name": "digits"}, "train"), data.load({"name": "digits"}, "test")
  params, info = fit.train_classifier(train, test, steps=150, width=8, arch="resnet",
                                      blocks=(1, 1, 1, 1), lr=2e-3, seed=0)
  assert info["architecture"]["kind"] == "resnet" and info["architecture"]["feature_dim"] == 64
  assert info["test_accuracy"] > 0.6  # chance: 0.1 (0.87 measured)
  directory = backbones.save_classifier(str(tmp_path / "resnet"), params, info)
  loaded = backbones.load_classifier(directory)
  images = test.arrays["image"][:20]
  features, _ = backbones.classifier_backbone(params, info).features_and_probs(images)
  np.testing.assert_array_equal(loaded.features_and_probs(images)[0], features)
  assert features.shape == (20, 64)
  assert "stage_3_0" in params
  legacy = {k: v for k, v in info["architecture"].items() if k not in ("kind", "blocks")}
  assert isinstance(backbones.classifier_model(legacy), Classifier)
  with pytest.raises(ValueError, match="resnet"):
    backbones.classifier_model({**legacy, "kind": "vgg"})


def test_a_backbone_splits_each_call_over_the_devices_it_is_given(trained, mnist):
  params, info = trained
  images = mnist[1].get(np.arange(21))["image"]
  one = backbones.classifier_backbone(params, info, chunk_size=10)
  eight = backbones.classifier_backbone(params, info, chunk_size=10, devices=8)
  assert one.chunk_size == 10 and eight.chunk_size == 16  # Rounded up to split 8 ways.
  for a, b in zip(one.features_and_probs(images), eight.features_and_probs(images)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
