"""The beta-VAE: KL annealing in the train step, and the rate-distortion sweep's outputs."""

import csv
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, load_config, subprocess_env
from fairgen import config as config_lib
from fairgen import data, experiment
from fairgen.objectives import vae


def test_the_kl_weight_rises_linearly_to_beta():
  step = lambda s: jax.numpy.asarray(s, jax.numpy.int32)
  assert float(vae.kl_weight(step(0), 4.0, 1000)) == 0.0
  assert float(vae.kl_weight(step(250), 4.0, 1000)) == pytest.approx(1.0)
  assert float(vae.kl_weight(step(5000), 4.0, 1000)) == 4.0
  assert float(vae.kl_weight(step(0), 4.0, 0)) == 4.0


def test_the_train_step_weighs_the_kl_by_the_annealed_beta():
  """beta = 4 annealed over 2 steps: at step 0 the loss is the distortion alone, at step 1
  distortion + 2 KL, from step 2 on distortion + 4 KL."""
  config = load_config("beta_vae_mnist", "beta=4,smoke")
  exp = experiment.setup(config)
  state = exp.objective.init(jax.random.key(0))
  batch = {"image": data.load(config.data, "train").get(np.arange(16))["image"]}
  step = jax.jit(exp.objective.train_step)
  for expected in (0.0, 2.0, 4.0, 4.0):
    state, m = step(state, batch, jax.random.key(1))
    assert float(m["kl_weight"]) == expected
    assert float(m["loss"]) == pytest.approx(float(m["recon"]) + expected * float(m["kl"]),
                                             rel=1e-5)
    assert float(m["kl"]) > 0
  with pytest.raises(config_lib.ConfigError, match="kl_warmup_steps must be an integer >= 0"):
    experiment.validate(load_config("beta_vae_mnist", "smoke",
                                    **{"objective.kl_warmup_steps": -5}))


def test_the_rate_distortion_sweep_writes_its_table_and_plot(tmp_path):
  cmd = [sys.executable, "experiments/repro/beta_vae_rate_distortion.py", "--quick",
         f"--out={tmp_path}", "--betas=0.25,4"]
  result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "rate_distortion.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(tmp_path / "results.csv") as f:
    rows = {float(r["beta"]): r for r in csv.DictReader(f)}
  assert set(rows) == {0.25, 4.0}
  for beta in ("0.25", "4"):
    run = tmp_path / "runs" / f"beta_{beta}"
    with open(sorted((run / "eval").glob("step_*.json"))[-1]) as f:
      ev = json.load(f)["metrics"]
    assert float(rows[float(beta)]["rate"]) == pytest.approx(ev["rate"])
    assert ev["rate"] + ev["distortion"] == pytest.approx(ev["neg_elbo"])
    assert f"| {float(beta):g} | {ev['rate']:.2f} |" in result.stdout
