"""The launcher in real processes: exact resume, overrides, and clear errors."""

import os

import numpy as np

from conftest import final_state, load_config, run_main

CONFIG = "experiments/dcgan_mnist.py:smoke"


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
  split, straight = str(tmp_path / "split"), str(tmp_path / "straight")
  for workdir, steps, resumes in ((split, 3, False), (split, 6, True), (straight, 6, False)):
    result = run_main(f"--config={CONFIG}", f"--workdir={workdir}",
                      f"--config.train.num_steps={steps}",
                      "--config.train.checkpoint_every_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("Resumed from" in result.stderr) == resumes
  config = load_config("dcgan_mnist", "smoke")
  step_a, a = final_state(split, config)
  step_b, b = final_state(straight, config)
  assert step_a == step_b == 6
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_unknown_override_key_is_one_clear_line(tmp_path):
  result = run_main(f"--config={CONFIG}", f"--workdir={tmp_path}", "--config.train.bogus=3")
  assert result.returncode == 2
  assert "unknown config key 'bogus'" in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(os.path.join(tmp_path, "config.json"))


def test_ill_typed_and_impossible_values_fail_before_training(tmp_path):
  result = run_main(f"--config={CONFIG}", f"--workdir={tmp_path}",
                    "--config.train.num_steps=many")
  assert result.returncode == 2 and "num_steps" in result.stderr
  result = run_main(f"--config={CONFIG}", f"--workdir={tmp_path}",
                    "--config.optim.gen.lr=-1.0")
  assert result.returncode == 2 and "optim.gen.lr must be > 0" in result.stderr
  assert "Traceback" not in result.stderr
  result = run_main(f"--config={CONFIG}", f"--workdir={tmp_path}", "--config.data.name=mnsit")
  assert result.returncode == 2 and "valid names" in result.stderr and "mnist_5k" in result.stderr


def test_override_sets_the_number_of_steps_and_a_changed_experiment_is_refused(tmp_path):
  workdir = str(tmp_path / "w")
  result = run_main(f"--config={CONFIG}", f"--workdir={workdir}",
                    "--config.train.num_steps=2", "--config.log.every_steps=1")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert len(f.readlines()) == 2
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  result = run_main(f"--config={CONFIG}", f"--workdir={workdir}", "--config.model.width=0.25")
  assert result.returncode == 2
  assert "different experiment" in result.stderr and "model.width" in result.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
