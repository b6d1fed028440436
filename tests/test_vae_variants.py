"""The VAE's variants: the conditional VAE (labels or groups into encoder and decoder), and
the beta-VAE's KL annealing and rate-distortion sweep."""

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
from fairgen.metrics import likelihood
from fairgen.objectives import vae


def _cvae(**overrides):
  config = load_config("vae_mnist", "smoke", **{"model.conditional": True, **overrides})
  exp = experiment.setup(config)
  return config, exp, jax.jit(exp.objective.init)(jax.random.key(0))


def test_the_conditional_vae_encodes_and_decodes_with_the_label():
  config, exp, state = _cvae()
  model = experiment.build_model(config, exp.spec)
  assert exp.objective.num_classes == 10 and exp.objective.condition_key == "label"
  params = {"params": state["params"]}
  z = jax.random.normal(jax.random.key(1), (4, model.latent_dim))
  x = data.load(config.data, "train").get(np.arange(4))["image"]
  zeros, threes = np.zeros(4, np.int32), np.full(4, 3, np.int32)
  for method, arg in ((model.decode, z), (model.encode, x)):
    a = jax.tree.leaves(model.apply(params, arg, zeros, method=method))
    b = jax.tree.leaves(model.apply(params, arg, threes, method=method))
    assert not np.allclose(a[0], b[0])
  # decode, the objective's sampler, passes the labels through.
  assert not np.allclose(exp.objective.decode(state, z, zeros),
                         exp.objective.decode(state, z, threes))
  # An unconditional VAE has no label input: its samples ignore the labels.
  plain = experiment.setup(load_config("vae_mnist", "smoke"))
  plain_state = jax.jit(plain.objective.init)(jax.random.key(0))
  np.testing.assert_array_equal(plain.objective.decode(plain_state, z, zeros),
                                plain.objective.decode(plain_state, z, threes))


@pytest.mark.parametrize("dp", [False, True])
def test_the_conditional_vae_trains_and_evaluates_on_its_label_column(dp):
  """The step reads batch[condition_key] (also by DP-SGD), and the likelihood evaluator
  reads the source's labels: other labels, another update and another ELBO."""
  overrides = {"privacy.noise_multiplier": 0.0} if dp else {}
  config = load_config("dp_vae_mnist" if dp else "vae_mnist", "smoke",
                       **{"model.conditional": True, **overrides})
  exp = experiment.setup(config)
  state = jax.jit(exp.objective.init)(jax.random.key(0))
  source = data.load(config.data, "train")
  b = config.train.batch_size
  batch = source.get(np.arange(b))
  batch = {"image": batch["image"], "label": batch["label"].astype(np.int32)}
  if dp:
    batch["mask"] = np.ones(b, np.float32)
  other = {**batch, "label": (batch["label"] + 1) % 10}
  step = jax.jit(exp.objective.train_step)
  a, _ = step(state, batch, jax.random.key(1))
  c, _ = step(state, other, jax.random.key(1))
  assert not np.allclose(jax.tree.leaves(a["params"])[0], jax.tree.leaves(c["params"])[0])
  if dp:
    return
  model = experiment.build_model(config, exp.spec)

  class Relabelled:
    def __init__(self, shift):
      self.shift = shift

    def __len__(self):
      return 32

    def get(self, idx):
      out = source.get(idx)
      return {"image": out["image"], "label": (out["label"] + self.shift) % 10}

  run = lambda shift: likelihood.evaluate_likelihood(model, a["params"], Relabelled(shift),
                                                     num_samples=2, batch_size=16, seed=0)
  assert run(0)["neg_elbo"] != pytest.approx(run(1)["neg_elbo"], rel=1e-4)


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
  state = jax.jit(exp.objective.init)(jax.random.key(0))
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
