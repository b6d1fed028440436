"""The Python API: ``fairgen.train``, ``fairgen.load`` and a loaded ``Run``.

``Run.sample`` must draw ``--mode=sample``'s images bit for bit (same checkpoint and seed),
and ``Run.evaluate`` must return what ``--mode=evaluate`` writes; a workdir without a
checkpoint is one clear error.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import fairgen
from fairgen import checkpoint
from fairgen import config as config_lib
from fairgen.evaluation import modes

from conftest import load_config


def _npz(workdir: str, step: int, name: str = "grid") -> dict:
  with np.load(os.path.join(workdir, "sample", f"step_{step:06d}", f"{name}.npz")) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def dcgan_run(tmp_path_factory):
  """A 4-step DCGAN smoke run, trained through ``fairgen.train``."""
  workdir = str(tmp_path_factory.mktemp("api") / "dcgan")
  config = load_config("dcgan_mnist", "smoke")
  summary = fairgen.train(config, workdir)
  assert summary["final_step"] == config.train.num_steps
  return config, workdir


def test_load_gives_the_config_and_the_committed_steps(dcgan_run):
  config, workdir = dcgan_run
  run = fairgen.load(workdir)
  assert run.steps == [2, 4]
  assert run.config.model.name == "dcgan" and run.config.train.num_steps == 4
  assert run.config.eval.metrics == config.eval.metrics  # Tuples, as in the config.


@pytest.mark.parametrize("step", [None, 2])
def test_sample_draws_the_images_of_mode_sample_bit_for_bit(dcgan_run, step):
  config, workdir = dcgan_run
  config = config.copy_and_resolve_references()
  config.sample.update(num=12, seed=7, checkpoint="latest" if step is None else str(step))
  modes.sample(config, workdir)
  written = _npz(workdir, step or 4)
  images = fairgen.load(workdir).sample(12, seed=7, step=step)
  assert images.dtype == np.float32 and images.shape == (12, 28, 28, 1)
  np.testing.assert_array_equal(images, written["images"])
  assert -1.0 <= images.min() and images.max() <= 1.0  # The data's range.
  assert not np.array_equal(images, fairgen.load(workdir).sample(12, seed=8, step=step))


def test_evaluate_returns_what_mode_evaluate_writes(dcgan_run):
  _, workdir = dcgan_run
  metrics = fairgen.load(workdir).evaluate(metrics=("memorisation",), num_samples=32,
                                           audit_examples=32)
  with open(os.path.join(workdir, "eval", "step_000004.json")) as f:
    report = json.load(f)
  assert metrics == report["metrics"] and "near_copy_fraction" in metrics


def test_a_workdir_without_a_checkpoint_is_one_clear_error(tmp_path):
  with pytest.raises(checkpoint.WorkdirError, match="no config.json: it is not a fairgen"):
    fairgen.load(str(tmp_path))
  config = load_config("dcgan_mnist", "smoke")
  checkpoint.check_and_write_config(str(tmp_path), config)
  with pytest.raises(checkpoint.WorkdirError, match="no committed checkpoint yet"):
    fairgen.load(str(tmp_path))


def test_a_group_conditional_model_samples_the_groups_it_is_given(tmp_path):
  workdir = str(tmp_path / "conditional")
  config = load_config("fair_mnist", "method=conditional,smoke",
                       **{"eval.every_steps": 0})
  fairgen.train(config, workdir)
  run = fairgen.load(workdir)
  ones, zeros = run.sample(8, groups=[1] * 8), run.sample(8, groups=[0] * 8)
  assert not np.array_equal(ones, zeros)
  config.sample.update(num=8, seed=0)
  modes.sample(config, workdir)
  np.testing.assert_array_equal(run.sample(8), _npz(workdir, 4)["images"])
  with pytest.raises(ValueError, match="takes groups, not labels"):
    run.sample(8, labels=[0] * 8)
  with pytest.raises(ValueError, match="one entry per sample"):
    run.sample(8, groups=[0, 1])


def test_load_config_is_what_the_launchers_config_flag_loads():
  spec = os.path.join("experiments", "fair_mnist.py")
  given = fairgen.load_config(f"{spec}:method=importance,smoke")
  assert given.to_dict() == config_lib.load_config_file(spec, "method=importance,smoke").to_dict()
  assert given.fair.method == "importance" and given.train.num_steps == 4
  assert fairgen.load_config(spec).train.num_steps == 2000
  with pytest.raises(config_lib.ConfigError, match="does not exist"):
    fairgen.load_config("experiments/no_such_file.py")
  with pytest.raises(config_lib.ConfigError, match="method"):
    fairgen.load_config(f"{spec}:method=nonsense")
