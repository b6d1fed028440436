"""Every extension point is one file that registers itself: a toy of each kind, from here.

This module defines and registers a GAN loss, a model, a dataset, an evaluator and a
fairness method, each with its own config keys, defaults and checks beside it, and nothing
else in fairgen changes. A smoke config names all five; it trains through the launcher's
own functions and is evaluated, and each toy is seen doing its part:
- the loss: its constant terms are the logged ``d_loss`` and ``g_loss``, exactly;
- the model: its parameters are the checkpoint's;
- the dataset: its option check refuses a bad value, and the eval reads its held-out split;
- the evaluator: its scalars are in the evaluation report;
- the fairness method: its ``fair`` key is validated, its ``prepare`` hook weights the
  training split, and an objective without the capability it needs refuses it.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fairgen import data
from fairgen.data import registry as data_registry
from fairgen import fairness
from fairgen import models
from fairgen import train
from fairgen.config import ConfigError, require
from fairgen.evaluation import modes
from fairgen.evaluation.registry import EVALUATORS, Entry
from fairgen.objectives import losses

from conftest import load_config, saved_arrays

SIDE = 8

# --- A GAN loss: constant terms, so the logged losses say which loss ran. -----------------


def _d_constant(real_out, fake_out):
  return 0.0 * real_out + 1.25, 0.0 * fake_out + 0.5


def _g_constant(fake_out):
  return 0.0 * fake_out + 0.25


losses.ADVERSARIAL_LOSSES.register("toy_constant")(
    losses.AdversarialLoss(_d_constant, _g_constant))

# --- A model: a dense generator and critic for small images. -----------------------------


class DenseGenerator(nn.Module):
  """Latents to images in [-1, 1] through one Dense layer."""

  image_shape: tuple

  @nn.compact
  def __call__(self, z, y, train=False):
    del y, train
    x = nn.Dense(int(np.prod(self.image_shape)), name="toy_gen_dense")(z)
    return jnp.tanh(x).reshape((z.shape[0],) + tuple(self.image_shape))


class DenseCritic(nn.Module):
  """Images to one logit each through one Dense layer."""

  @nn.compact
  def __call__(self, x, y, train=False):
    del y, train
    return nn.Dense(1, name="toy_disc_dense")(x.reshape(x.shape[0], -1))[:, 0]


@models.MODELS.register("toy_dense_gan")
def build_toy_gan(spec: data.DataSpec, latent_dim: int = 4) -> models.GanModules:
  """The toy pair for data of ``spec``."""
  return models.GanModules(DenseGenerator(tuple(spec.image_shape)), DenseCritic(),
                           latent_dim, 0)


# --- A dataset: two groups of constant images, the second of a given shade. --------------


def _check_toy_options(shade: float, **_) -> None:
  if not 0 < shade <= 1:
    raise data.DataError(f"data.options.shade must be in (0, 1], got {shade}.")


@data_registry.register("toy_groups", check=_check_toy_options, domain_options=("shade",))
def toy_groups(split: str, shade: float = 0.5) -> data.ArraySource:
  """64 training or 32 held-out 8x8 images: a quarter of group 1 (value ``shade``), the rest
  of group 0 (value -shade)."""
  n = 64 if split == "train" else 32
  attr = (np.arange(n) % 4 == 0).astype(np.int32)
  images = np.where(attr[:, None, None, None] == 1, shade, -shade) * np.ones(
      (n, SIDE, SIDE, 1), np.float32)
  spec = data.DataSpec("toy_groups", (SIDE, SIDE, 1), 2, num_groups=2)
  return data.ArraySource(spec, {"image": images.astype(np.float32),
                                 "label": attr.copy(), "attr": attr})


# --- An evaluator: the mean absolute value of the samples and of the held-out images. -----


def toy_means(ctx):
  yield "toy_fake_abs", float(np.mean(np.abs(ctx.fake_images)))
  yield "toy_real_abs", float(np.mean(np.abs(ctx.real.source.get(np.arange(4))["image"])))


EVALUATORS.register("toy_means")(Entry(toy_means))

# --- A fairness method: group 1's examples weighted by its own key, toy_weight. ----------

PREPARED = []  # What the hook saw: (number of examples, weights).


def _check_toy_section(fair: ml_collections.ConfigDict) -> None:
  require(fair.toy_weight > 0, f"fair.toy_weight must be > 0, got {fair.toy_weight}.")


def _prepare_toy(config, source, workdir, global_batch):
  del workdir, global_batch
  attr = data.read_column(source, "attr")
  weights = np.where(attr == 1, config.fair.toy_weight, 1.0).astype(np.float32)
  PREPARED.append((len(source), weights))
  return data.SubsetSource(source, columns={"weight": weights}), None


fairness.METHODS.register("toy_upweight")(fairness.Method(
    summary="group 1 weighted by fair.toy_weight", defaults={"toy_weight": 2.0},
    # A capability only the GAN objective declares, so that another objective refuses it.
    needs=("generator_penalty",), check_section=_check_toy_section, prepare=_prepare_toy))


# --- The smoke config that names all five. ------------------------------------------------


def toy_config(**overrides) -> ml_collections.ConfigDict:
  """The DCGAN smoke config with each toy in place of the built-in it extends."""
  config = load_config("dcgan_mnist", "smoke")
  config.data.name = "toy_groups"
  config.data.options = {"shade": 0.75}
  config.model = {"name": "toy_dense_gan", "latent_dim": 4}
  config.objective.update(loss="toy_constant", label_smoothing=0.0, standing_stats=0)
  config.fair = fairness.fair_section("toy_upweight")
  config.fair.toy_weight = 3.0
  config.train.batch_size = 16
  config.eval.update(metrics=("toy_means",), every_steps=config.train.num_steps,
                     best_metric="toy_fake_abs",
                     num_samples=16, batch_size=16)
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def test_a_smoke_config_of_five_toys_trains_and_evaluates(tmp_path):
  config = toy_config()
  workdir = str(tmp_path / "run")
  PREPARED.clear()
  summary = train.train_and_evaluate(config, workdir)
  assert summary["final_step"] == config.train.num_steps
  # The fairness method's hook weighted the training split by its own key.
  (n, weights), = PREPARED
  assert n == 64 and sorted(set(weights.tolist())) == [1.0, 3.0]
  # The loss: its constant terms are what the step logged.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [r for r in map(json.loads, f) if "d_loss" in r]
  assert [r["step"] for r in records] == [2, 4]
  for record in records:
    assert record["d_loss"] == pytest.approx(1.75, abs=1e-7)
    assert record["g_loss"] == pytest.approx(0.25, abs=1e-7)
  # The model: the checkpoint holds the toy nets' parameters.
  names = " ".join(saved_arrays(workdir, config.train.num_steps))
  assert "toy_gen_dense" in names and "toy_disc_dense" in names
  # The evaluator, during training and in --mode=evaluate (on the dataset's held-out split).
  with open(os.path.join(workdir, "eval", f"step_{config.train.num_steps:06d}.json")) as f:
    report = json.load(f)
  assert 0 < report["metrics"]["toy_fake_abs"] <= 1
  assert report["metrics"]["toy_real_abs"] == pytest.approx(0.75)
  out = modes.evaluate(config, workdir)
  assert out["metrics"]["toy_real_abs"] == pytest.approx(0.75)


@pytest.mark.parametrize("key, value, message", [
    ("fair.toy_weight", -1.0, "fair.toy_weight must be > 0"),
    ("data.options", {"shade": 2.0}, "data.options.shade must be in (0, 1]"),
    ("data.options", {"colour": 1}, "colour"),
    ("model.depth", 3, "depth"),
])
def test_each_toys_own_checks_refuse_bad_values(key, value, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("]", r"\]")):
    train.validate(toy_config(**{key: value}))


def test_a_method_is_refused_by_an_objective_without_its_capability():
  config = load_config("vae_mnist", "smoke")
  config.fair = fairness.fair_section("toy_upweight")
  with pytest.raises(ConfigError, match="toy_upweight.*not supported.*'vae'"):
    train.validate(config)


def test_the_toy_method_is_listed_with_its_default_key():
  assert "toy_upweight" in fairness.METHODS
  assert fairness.fair_section().toy_weight == 2.0
