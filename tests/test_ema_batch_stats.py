"""The generator EMA with batch-norm statistics of its own (``objective.ema_batch_stats``)."""

import types

import jax
import numpy as np

from fairgen.objectives import gan
from test_behaviour_loop import _GAN_OPTIM, _tiny_gan


def test_the_ema_generator_keeps_batch_statistics_of_its_own():
  """The tiny G is Dense -> BatchNorm(momentum 0.9) -> tanh. Each step, the EMA's running
  mean and variance move 10% towards the batch statistics of the *updated EMA's* Dense
  outputs on that step's generator latents; sampling uses them with the EMA weights."""
  shape, rows = (4, 4, 1), 8
  nets = _tiny_gan(shape)
  settings = {**gan.DEFAULTS, "ema_decay": 0.5, "ema_batch_stats": True}
  obj = gan.build(nets, types.SimpleNamespace(image_shape=shape), settings, _GAN_OPTIM)
  state = jax.jit(obj.init)(jax.random.key(0))
  step = jax.jit(obj.train_step)
  adapter = gan.adapter(nets)
  mean, var = (np.asarray(state["ema_stats"]["batch_stats"]["BatchNorm_0"][k], np.float64)
               for k in ("mean", "var"))
  rng = np.random.default_rng(0)
  for t in range(4):
    batch = {"image": rng.uniform(-1, 1, (rows,) + shape).astype(np.float32),
             "label": np.zeros(rows, np.int32)}
    state, _ = step(state, batch, jax.random.key(1))
    # The generator update's latents (the step's key, folded with the step, then n_disc).
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(1), t), 1)
    z = np.asarray(jax.random.normal(adapter.g_keys(key)["latent"], (rows, nets.latent_dim)),
                   np.float64)
    dense = state["ema"]["Dense_0"]
    h = z @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"], np.float64)
    mean = 0.9 * mean + 0.1 * h.mean(0)
    var = 0.9 * var + 0.1 * h.var(0)
    ema_stats = state["ema_stats"]["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(ema_stats["mean"], mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ema_stats["var"], var, rtol=1e-4, atol=1e-6)
  raw_stats = state["gen"]["batch_stats"]["BatchNorm_0"]["mean"]
  assert np.max(np.abs(np.asarray(raw_stats) - mean)) > 1e-3  # not the raw G's statistics

  latents = jax.random.normal(jax.random.key(2), (5, nets.latent_dim))
  labels = np.zeros(5, np.int32)
  expected = nets.generator.apply({"params": state["ema"], **state["ema_stats"]}, latents,
                                  labels, train=False)
  np.testing.assert_allclose(obj.decode(state, latents, labels), expected, rtol=1e-6)
  without = {k: v for k, v in state.items() if k != "ema_stats"}
  assert np.max(np.abs(np.asarray(obj.decode(without, latents, labels)) -
                       np.asarray(expected))) > 1e-3


def _models(name):
  from fairgen.models import MODELS  # pylint: disable=g-import-not-at-top
  if name == "dcgan":
    spec = types.SimpleNamespace(image_shape=(28, 28, 1), num_classes=10, num_groups=2)
    return MODELS.get("dcgan")(spec, latent_dim=8, width=0.125), spec
  spec = types.SimpleNamespace(image_shape=(32, 32, 1), num_classes=10, num_groups=2)
  return MODELS.get("resnet_gan")(spec, latent_dim=8, g_ch=4, d_ch=4, conditional=True), spec


def test_standing_statistics_are_the_sampling_weights_own_and_ignore_running_averages():
  """objective.standing_stats: BN statistics come from one momentum-0 pass of the sampling
  weights over a fixed batch of prior latents, whatever the running averages hold."""
  for name in ("dcgan", "resnet_gan"):
    nets, spec = _models(name)
    settings = {**gan.DEFAULTS, "standing_stats": 256}
    obj = gan.build(nets, spec, settings, _GAN_OPTIM)
    plain = gan.build(nets, spec, gan.DEFAULTS, _GAN_OPTIM)
    state = jax.jit(obj.init)(jax.random.key(0))
    z = np.random.default_rng(5).standard_normal((6, nets.latent_dim), np.float32)
    y = np.arange(6, dtype=np.int32) % max(nets.num_classes, 1)
    garbage = jax.tree.map(lambda s: np.asarray(s) + 3.0, state["gen"]["batch_stats"])
    spoiled = {**state, "gen": {**state["gen"], "batch_stats": garbage}}
    # Jitted: one program per decoder, not one per operation and shape.
    decode, plain_decode = jax.jit(obj.decode), jax.jit(plain.decode)
    np.testing.assert_allclose(decode(spoiled, z, y), decode(state, z, y), atol=1e-5)
    assert np.abs(np.asarray(plain_decode(spoiled, z, y)) -
                  np.asarray(plain_decode(state, z, y))).max() > 1e-2, name
    if name == "dcgan":  # Dense (no bias) -> BatchNorm_0: its statistics, by hand.
      standing = jax.jit(lambda v: gan.standing_statistics(nets, v, 256))(
          {"params": state["ema"], "batch_stats": garbage})
      latents = np.asarray(jax.random.normal(jax.random.key(0), (256, nets.latent_dim)),
                           np.float64)
      h = latents @ np.asarray(state["ema"]["Dense_0"]["kernel"], np.float64)
      stats = standing["batch_stats"]["BatchNorm_0"]
      np.testing.assert_allclose(stats["mean"], h.mean(0), rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(stats["var"], h.var(0), rtol=1e-4, atol=1e-5)
      expected = jax.jit(lambda v: nets.generator.apply(v, z, y, train=False))(standing)
      np.testing.assert_allclose(decode(state, z, y), expected, atol=1e-6)
