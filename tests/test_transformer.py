"""The autoregressive pixel transformer (``fairgen/models/transformer.py``) and its objective.

- The attention is causal: changing pixel j leaves the logits of pixels <= j unchanged.
- The KV-cache sampler's step logits equal a full forward pass over what it sampled, and its
  pixels are the inverse CDF of those logits; temperature 0 and top-1 give the greedy image.
- The NLL is the sum of the pixels' cross-entropies (and D ln 2 for a uniform model); an
  importance weight on one example equals training on that example alone.
- One step end to end, with the likelihood evaluator and ``--mode=evaluate``/``sample``; the
  same run on 8 devices (training and sharded sampling) as on 1; exact resume.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import final_state, load_config
from fairgen import data
from fairgen import experiment
from fairgen import sampling
from fairgen import train
from fairgen.evaluation import modes
from fairgen.models import transformer
from fairgen.objectives import autoregressive
from test_behaviour_loop import _assert_resume_is_exact

SHAPE = (6, 6, 1)  # 36 pixels: with window 8 the local attention pads its last block.


def _model(window=0, num_classes=0, levels=2, dropout=0.0):
  return transformer.PixelTransformer(SHAPE, levels=levels, num_layers=2, num_heads=2,
                                      embed_dim=16, mlp_dim=32, dropout=dropout,
                                      window=window, num_classes=num_classes)


def _params(model, seed=0):
  tokens = jnp.zeros((1, model.length), jnp.int32)
  labels = jnp.zeros((1,), jnp.int32) if model.num_classes else None
  return jax.jit(model.init)(jax.random.key(seed), tokens, labels)["params"]


def _apply(model):
  """``model.apply`` jitted (eager Flax ops compile one small program each)."""
  return jax.jit(lambda params, tokens, labels=None: model.apply({"params": params}, tokens,
                                                                   labels))


@pytest.mark.parametrize("window", [0, 8])
def test_attention_is_causal(window):
  model = _model(window)
  params = _params(model)
  tokens = jax.random.bernoulli(jax.random.key(1), 0.5, (2, model.length)).astype(jnp.int32)
  apply = _apply(model)
  logits = apply(params, tokens)
  for j in (0, 7, 20, 35):
    changed = tokens.at[:, j].set(1 - tokens[:, j])
    other = apply(params, changed)
    # Pixel i's logits see pixels < i only: up to j nothing moves, after j something does.
    np.testing.assert_allclose(other[:, :j + 1], logits[:, :j + 1], atol=1e-6)
    if j + 1 < model.length:
      assert np.abs(other[:, j + 1:] - logits[:, j + 1:]).max() > 1e-4


def test_local_attention_sees_its_block_and_the_one_before():
  """One layer, window 8: token 9 is the input of position 10 (block 1), which positions
  10..23 (blocks 1 and 2) attend to, and those of blocks 3 and 4 (24..35) do not."""
  model = transformer.PixelTransformer(SHAPE, num_layers=1, num_heads=2, embed_dim=16,
                                       mlp_dim=32, window=8)
  params = _params(model)
  tokens = jnp.zeros((1, model.length), jnp.int32)
  apply = _apply(model)
  diff = np.abs(apply(params, tokens.at[:, 9].set(1)) - apply(params, tokens))[0]
  assert diff[:10].max() < 1e-6 and diff[24:].max() < 1e-6
  assert diff[10:24].min() > 1e-6


@pytest.mark.parametrize("window,num_classes,levels", [(0, 0, 2), (8, 3, 4)])
def test_cached_sampler_matches_full_recomputation(window, num_classes, levels):
  model = _model(window, num_classes, levels)
  params = _params(model)
  u = jax.random.uniform(jax.random.key(2), (3, model.length))
  labels = jnp.array([0, 2, 1]) if num_classes else None
  tokens, step_logits = jax.jit(lambda p, u: transformer.sample(model, p, u, labels))(params, u)
  apply = _apply(model)
  full = apply(params, tokens, labels)
  np.testing.assert_allclose(step_logits, full, atol=2e-5)
  np.testing.assert_array_equal(transformer.inverse_cdf(full, u), tokens)
  assert len(np.unique(np.asarray(tokens))) == levels  # Not a constant image.
  if num_classes:  # The label is the start token: another label, other logits.
    other = apply(params, tokens, jnp.array([1, 0, 2]))
    assert np.abs(other - full).max() > 1e-4
  # Greedy: temperature 0 and top-1 both take the most likely level at every pixel.
  for temperature, top_k in ((0.0, 0), (1.0, 1)):
    greedy, _ = jax.jit(lambda p, u: transformer.sample(model, p, u, labels, temperature,
                                                         top_k))(params, u)
    np.testing.assert_array_equal(jnp.argmax(apply(params, greedy, labels), -1), greedy)


def test_inverse_cdf_follows_temperature_and_top_k():
  """Against a NumPy reference: the level whose CDF interval holds u."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(500, 5)).astype(np.float32) * 2
  u = rng.uniform(size=500).astype(np.float32)
  for temperature, top_k in ((1.0, 0), (0.5, 0), (2.0, 3)):
    z = logits / temperature
    if top_k:
      z = np.where(logits >= np.sort(logits, -1)[:, -top_k:][:, :1], z, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    cdf = np.cumsum(p / p.sum(-1, keepdims=True), -1)
    expected = (cdf < u[:, None]).sum(-1)
    got = np.asarray(transformer.inverse_cdf(jnp.asarray(logits), jnp.asarray(u),
                                             temperature, top_k))
    assert np.mean(got == expected) > 0.995  # Float ties at interval edges aside.
    if top_k:
      rank = (logits > logits[np.arange(500), got][:, None]).sum(-1)
      assert rank.max() < top_k


def test_nll_is_the_sum_of_pixel_cross_entropies():
  model = _model()
  params = _params(model)
  images = jax.random.uniform(jax.random.key(3), (4,) + SHAPE, minval=-1, maxval=1)
  loss = jax.jit(lambda p, x: autoregressive.per_example_loss(model, p, x))
  nll = np.asarray(loss(params, images))
  bits = (np.asarray(images).reshape(4, -1) > 0).astype(np.int32)  # Binarised like the VAE.
  logits = np.asarray(_apply(model)(params, jnp.asarray(bits)), np.float64)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.take_along_axis(log_p, bits[..., None], -1)[..., 0].sum(-1)
  np.testing.assert_allclose(nll, expected, rtol=1e-5)
  # A model that predicts nothing (zero logits) costs exactly ln 2 nats per pixel.
  zero_head = jax.tree.map(jnp.zeros_like, params["head"])
  uniform = loss({**params, "head": zero_head}, images)
  np.testing.assert_allclose(uniform, model.length * math.log(2.0), rtol=1e-6)


def test_importance_weight_on_one_example_equals_training_on_it():
  model = _model()
  tx = optax.sgd(1e-2)  # Adam's first step is about sign(g): it would hide a scale error.
  state = jax.jit(lambda key: autoregressive.init(model, tx, key))(jax.random.key(0))
  images = jax.random.uniform(jax.random.key(4), (4,) + SHAPE, minval=-1, maxval=1)
  step = jax.jit(lambda s, b: autoregressive.train_step(s, b, jax.random.key(5), model=model,
                                                        tx=tx))
  weighted, m = step(state, {"image": images, "weight": jnp.array([0.0, 0.0, 3.0, 0.0])})
  # The same shapes (one compilation): example 2 four times, equally weighted.
  alone, m1 = step(state, {"image": jnp.repeat(images[2:3], 4, 0), "weight": jnp.ones(4)})
  for a, b in zip(jax.tree.leaves(weighted["params"]), jax.tree.leaves(alone["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m["bits_per_dim"], m["nll"] / (model.length * math.log(2)))


def test_one_step_end_to_end_with_likelihood(workdir):
  config = load_config("ar_mnist", "smoke", **{"train.num_steps": 1, "eval.every_steps": 1})
  summary = train.train_and_evaluate(config, workdir)
  assert summary["final_step"] == 1 and np.isfinite(summary["scalars"]["loss"])
  in_loop = summary["eval"]
  # The exact NLL of the first eval.likelihood_examples test digits, in nats per image.
  exp = experiment.setup(config)
  state, _ = experiment.restore_checkpoint(exp, workdir)
  test = data.load(config.data, config.data.eval_split)
  images = test.get(np.arange(config.eval.likelihood_examples))["image"]
  direct = exp.objective.nll(state, {"image": jnp.asarray(images, jnp.float32)}, None, 1)
  np.testing.assert_allclose(in_loop["nll"], np.mean(direct["nll"]), rtol=1e-5)
  np.testing.assert_allclose(in_loop["bits_per_dim"], in_loop["nll"] / (784 * math.log(2)))
  out = modes.evaluate(config, workdir)
  assert out["metrics"]["nll"] == pytest.approx(in_loop["nll"], rel=1e-6)
  config.sample.num = 8
  files = modes.sample(config, workdir)
  grid = next(f for f in files if f.endswith("grid.npz"))
  with np.load(grid) as npz:
    assert npz["latents"].shape == (8, 784)
    assert set(np.unique(npz["images"])) <= {-1.0, 1.0}  # Binary pixels.
  assert os.path.getsize(grid[:-len("npz")] + "png") > 0


def test_eight_devices_match_one(tmp_path, partitionable_rng):
  """Training (dropout on, batch split over the data axis) and the sharded sampler."""
  results = {}
  for n in (1, 8):
    config = load_config("ar_mnist", "smoke", **{"mesh.data": n, "train.num_steps": 2,
                                                "log.sample_every_steps": 1000})
    workdir = str(tmp_path / f"d{n}")
    scalars = train.train_and_evaluate(config, workdir)["scalars"]
    exp = experiment.setup(config)
    state, _ = experiment.restore_checkpoint(exp, workdir)
    images, _ = sampling.generate_images(exp, state, jax.random.key(7), 8)
    results[n] = scalars, final_state(workdir, config)[1], images
  (s1, p1, i1), (s8, p8, i8) = results[1], results[8]
  for key in ("loss", "nll", "bits_per_dim", "grad_norm"):
    np.testing.assert_allclose(s8[key], s1[key], rtol=1e-5, err_msg=key)
  for a, b in zip(p1, p8, strict=True):  # Adam's moments of gradients summed over 784 pixels.
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(i8, i1)


def test_resume_is_exact(tmp_path):
  _assert_resume_is_exact(load_config("ar_mnist", "smoke"), tmp_path, 2)
