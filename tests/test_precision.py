"""Mixed precision (``model.dtype=bfloat16``): bf16 computation, float32 state and losses."""

import json

import jax
import numpy as np
import pytest

from conftest import load_config
from fairgen import data, experiment, robust, train

# Every model, in the smoke config of an experiment that uses it.
MODEL_CONFIGS = ["dcgan_mnist", "vae_mnist", "vfae_adult", "fair_tabgan_adult", "adult_debias"]


def _matmul_dtypes(jaxpr):
  """Input dtypes of every dot and convolution in ``jaxpr`` and its sub-jaxprs."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      out.append(str(eqn.invars[0].aval.dtype))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out.extend(_matmul_dtypes(inner))
  return out


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_bfloat16_models_compute_in_bf16_with_float32_state(name):
  shapes = {}
  for dtype in ("float32", "bfloat16"):
    config = load_config(name, "smoke", **{"model.dtype": dtype})
    source = data.load(config.data, config.data.split)
    exp = experiment.setup(config, source.spec)
    shapes[dtype] = jax.tree.map(lambda x: (x.shape, x.dtype), exp.abstract_state)
    batch = source.get(np.arange(exp.global_batch))
    step = robust.guard_step(exp.objective.train_step)
    jaxpr = jax.make_jaxpr(step)(exp.abstract_state, batch, exp.step_rng)
    dtypes = _matmul_dtypes(jaxpr.jaxpr)
    metrics = jax.eval_shape(step, exp.abstract_state, batch, exp.step_rng)[1]
    assert all(m.dtype == np.float32 for m in jax.tree.leaves(metrics)), metrics
    if dtype == "float32":
      assert dtypes and set(dtypes) == {"float32"}, dtypes
    else:  # The networks' products are bf16; the few float32 ones are the losses' own.
      assert dtypes.count("bfloat16") > dtypes.count("float32"), dtypes
  # Parameters and optimizer state stay float32: the same state, leaf for leaf.
  assert shapes["bfloat16"] == shapes["float32"]


def test_bfloat16_training_stays_close_to_float32(tmp_path):
  """8 VAE steps: the losses agree to 1e-3 relative, and differ (bf16 was used).

  bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3) and XLA accumulates its products
  in float32; the negative ELBO sums 784 per-pixel terms and averages 16 examples, so the
  rounding errors partly cancel (measured: at most 9e-5 relative over 8 steps, and 1.3e-3
  for the DCGAN's smaller losses). 1e-3 leaves 10x margin; a model that ignored
  ``model.dtype`` gives identical losses and fails the second check.
  """
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = load_config("vae_mnist", "smoke", **{"model.dtype": dtype, "train.num_steps": 8,
                                                  "log.every_steps": 1,
                                                  "train.checkpoint_every_steps": 8})
    train.train_and_evaluate(config, str(tmp_path / dtype))
    with open(tmp_path / dtype / "metrics.jsonl") as f:
      losses[dtype] = np.array([json.loads(line)["loss"] for line in f])
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=1e-3)
  # Two float32 runs agree exactly; bf16 rounding shows (measured: 8e-5 relative).
  assert np.max(np.abs(losses["bfloat16"] - losses["float32"])) > 1e-6 * losses["float32"][0]


def test_an_unknown_dtype_is_a_config_error():
  config = load_config("vae_mnist", "smoke", **{"model.dtype": "float16"})
  with pytest.raises(ValueError, match="model.dtype must be one of float32, bfloat16"):
    experiment.validate(config)
