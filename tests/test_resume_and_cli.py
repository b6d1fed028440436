"""The launcher in real processes: overrides and clear errors (resume: test_robust)."""

import os

from conftest import run_main

CONFIG = "experiments/dcgan_mnist.py:smoke"


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
  vae = "experiments/vae_mnist.py:smoke"  # (the cheapest model to compile)
  result = run_main(f"--config={vae}", f"--workdir={workdir}",
                    "--config.train.num_steps=2", "--config.log.every_steps=1")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert len(f.readlines()) == 2
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  result = run_main(f"--config={vae}", f"--workdir={workdir}", "--config.model.latent_dim=4")
  assert result.returncode == 2
  assert "different experiment" in result.stderr and "model.latent_dim" in result.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
