"""The SNGAN/BigGAN ResNets: parameter counts against the references, and each part against
its definition (self-attention, conditional batch norm, the projection, the initialisers)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import load_config
from fairgen import checkpoint, experiment, train
from fairgen.config import ConfigError
from fairgen.data import DataSpec
from fairgen.models import MODELS, resnet_gan
from fairgen.objectives import base


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _shapes(nets, side, channels=3):
  z = jnp.zeros((2, nets.latent_dim))
  y = jnp.zeros((2,), jnp.int32)
  g = jax.eval_shape(lambda: nets.generator.init(jax.random.key(0), z, y, train=False))
  d = jax.eval_shape(lambda: nets.discriminator.init(
      jax.random.key(1), jnp.zeros((2, side, side, channels)), y, train=False))
  return g, d


# Hand counts from the reference code (pfnet-research/sngan_projection resnet_32 /
# snresnet_32; StudioGAN's D adds the final linear's bias; ermongroup/fairgen's BigGAN at
# 64x64, G_ch = D_ch = 64, z 128, one class, no attention). fairgen's generator blocks
# leave out the three conv biases per block that batch norm cancels (resnet_gan.py), so
# its counts are the references' minus 3 x (block channels) per block.
_REFERENCES = [
    # (name, side, classes, g_ch, d_ch, reference G, reference D, G block channels)
    ("SNGAN CIFAR-10", 32, 0, 64, 32, 4_276_739, 1_053_825, (256, 256, 256)),
    ("SNGAN CIFAR-10, 10 classes", 32, 10, 64, 32, 4_304_387, 1_055_105, (256, 256, 256)),
    ("BigGAN-64 (Choi et al.)", 64, 1, 64, 64, 32_033_283, 19_543_745, (1024, 512, 256, 128)),
]


@pytest.mark.parametrize("name,side,classes,g_ch,d_ch,ref_g,ref_d,blocks", _REFERENCES)
def test_parameter_counts_match_the_reference_implementations(
    name, side, classes, g_ch, d_ch, ref_g, ref_d, blocks):
  spec = DataSpec("x", (side, side, 3), max(classes, 1))
  nets = MODELS.get("resnet_gan")(spec, latent_dim=128, g_ch=g_ch, d_ch=d_ch,
                                  conditional=classes > 0)
  g, d = _shapes(nets, side)
  assert _count(g["params"]) == ref_g - 3 * sum(blocks), name
  assert _count(d["params"]) == ref_d, name


def test_generator_and_discriminator_shapes_with_attention():
  spec = DataSpec("x", (32, 32, 1), 10)
  nets = MODELS.get("resnet_gan")(spec, latent_dim=8, g_ch=2, d_ch=2, attention=16,
                                  conditional=True)
  z = jax.random.normal(jax.random.key(0), (3, 8))
  y = jnp.asarray([0, 4, 9])
  # Jitted: eager Flax ops compile one small program each.
  g_vars = jax.jit(functools.partial(nets.generator.init, train=False))(jax.random.key(1), z, y)
  assert "attention" in g_vars["params"]
  images = jax.jit(functools.partial(nets.generator.apply, train=False))(g_vars, z, y)
  assert images.shape == (3, 32, 32, 1)
  d_vars = jax.jit(nets.discriminator.init)(jax.random.key(2), images, y)
  assert "attention" in d_vars["params"]
  assert jax.jit(nets.discriminator.apply)(d_vars, images, y).shape == (3,)
  # A SAGAN block starts as the identity (gamma = 0), so it adds 1.25 C^2 + 1 parameters.
  c = 2 * 4  # g_ch x the multiplier of every block at 32x32
  assert _count(g_vars["params"]["attention"]) == int(1.25 * c * c) + 1


def test_self_attention_against_its_definition():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
  layer = resnet_gan.SelfAttention()
  variables = layer.init(jax.random.key(1), x)
  np.testing.assert_array_equal(layer.apply(variables, x), x)  # gamma = 0 at init
  params = jax.tree.map(np.asarray, variables["params"])
  params["gamma"] = np.float32(0.7)
  out = layer.apply({"params": params}, x)
  xs = np.asarray(x, np.float64)
  conv = lambda t, name: t @ np.asarray(params[name]["kernel"], np.float64)[0, 0]

  def pool(t):  # 2x2 max pool
    b, h, w, c = t.shape
    return t.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

  theta = conv(xs, "theta").reshape(2, 16, 2)
  phi = pool(conv(xs, "phi")).reshape(2, 4, 2)
  g = pool(conv(xs, "g")).reshape(2, 4, 8)
  logits = np.einsum("bqc,bkc->bqk", theta, phi)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  o = conv(np.einsum("bqk,bkc->bqc", attn, g).reshape(2, 4, 4, 8), "o")
  np.testing.assert_allclose(out, xs + 0.7 * o, rtol=1e-4, atol=1e-5)


def test_conditional_batch_norm_applies_each_labels_gain_and_bias():
  x = jax.random.normal(jax.random.key(0), (6, 2, 2, 3)) * 2.0 + 1.0
  y = jnp.asarray([0, 1, 2, 0, 1, 2])
  layer = resnet_gan.ConditionalBatchNorm(num_classes=3)
  variables = layer.init(jax.random.key(1), x, y, train=True)
  params = {"bn": {}, "gain": np.arange(9, dtype=np.float32).reshape(3, 3) + 1.0,
            "bias": -np.arange(9, dtype=np.float32).reshape(3, 3)}
  out, _ = layer.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, y,
                       train=True, mutable=["batch_stats"])
  xs = np.asarray(x, np.float64)
  normed = (xs - xs.mean((0, 1, 2))) / np.sqrt(xs.var((0, 1, 2)) + 1e-5)
  expected = normed * params["gain"][y][:, None, None] + params["bias"][y][:, None, None]
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_projection_discriminator_adds_the_label_embedding_inner_product():
  """D(x, y) = linear(h) + <E[y], h>: with E's rows one-hot, D(x, k + 1) - D(x, 0) reads out
  h_k; then D(x, y) with a random table is the unconditional part plus E[y] . h."""
  width = 2 * 4  # d_ch x the last multiplier at 32x32
  spec = DataSpec("x", (32, 32, 3), width + 1)
  nets = MODELS.get("resnet_gan")(spec, g_ch=2, d_ch=2, conditional=True)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = jax.tree.map(np.asarray, nets.discriminator.init(
      jax.random.key(1), x, jnp.zeros((2,), jnp.int32)))
  table = variables["params"]["projection"]["embedding"]
  assert table.shape == (width + 1, width)

  def apply(embedding, label):
    v = {"params": {**variables["params"], "projection": {"embedding": embedding}}}
    return np.asarray(nets.discriminator.apply(v, x, jnp.full((2,), label)), np.float64)

  one_hot = np.concatenate([np.zeros((1, width)), np.eye(width)]).astype(np.float32)
  unconditional = apply(one_hot, 0)
  h = np.stack([apply(one_hot, k + 1) - unconditional for k in range(width)], axis=-1)
  assert np.abs(h).max() > 1e-3  # The label reaches the logit at all.
  for label in (0, 3, width):
    np.testing.assert_allclose(apply(table, label), unconditional + h @ table[label],
                               rtol=1e-4, atol=1e-4)


def test_weight_initialisers():
  """ortho: orthonormal columns of each [fan_in, out] kernel; N02: std 0.02; xavier: Glorot
  uniform's bound sqrt(6 / (fan_in + fan_out))."""
  spec = DataSpec("x", (32, 32, 3), 1)
  kernels = {}
  for name in resnet_gan.INITS:
    nets = MODELS.get("resnet_gan")(spec, g_ch=4, d_ch=4, weight_init=name)
    params = jax.jit(nets.discriminator.init)(jax.random.key(0),
                                              jnp.zeros((1, 32, 32, 3)))["params"]
    kernel = np.asarray(params["block_1"]["conv_0"]["kernel"], np.float64)
    kernels[name] = kernel.reshape(-1, kernel.shape[-1])  # [fan_in 144, out 16]
  m = kernels["ortho"]
  np.testing.assert_allclose(m.T @ m, np.eye(16), atol=1e-5)
  assert not np.allclose(kernels["N02"].T @ kernels["N02"], np.eye(16), atol=1e-2)
  assert abs(kernels["N02"].std() - 0.02) < 0.002
  bound = np.sqrt(6 / (144 + 16 * 9))  # fan_out of a 3x3 conv counts its receptive field
  assert np.abs(kernels["xavier"]).max() <= bound and np.abs(kernels["xavier"]).max() > 0.9 * bound
  with pytest.raises(ConfigError, match="weight_init"):
    MODELS.get("resnet_gan")(spec, weight_init="orthogonal")


def test_unsupported_sides_and_attention_are_config_errors():
  with pytest.raises(ConfigError, match="pad_to=32"):
    MODELS.get("resnet_gan")(DataSpec("mnist_5k", (28, 28, 1), 10))
  with pytest.raises(ConfigError, match="attention=12"):
    MODELS.get("resnet_gan")(DataSpec("x", (32, 32, 3), 10), attention=12)


def test_linear_decay_reaches_zero_after_its_steps():
  """SNGAN's schedule: update k uses lr (1 - k / N), and 0 from update N on."""
  tx = base.make_optimizer({"name": "adam", "lr": 1e-2, "b1": 0.0, "b2": 0.9,
                            "linear_decay_steps": 4})
  params = jnp.ones(3)
  state = tx.init(params)
  moves = []
  for _ in range(6):  # Adam, b1 = 0, a constant gradient: |update| = lr_k / (1 + eps)
    updates, state = tx.update(jnp.ones(3), state, params)
    moves.append(float(jnp.max(jnp.abs(updates))))
  np.testing.assert_allclose(moves, [1e-2 * max(0.0, 1 - k / 4) for k in range(6)],
                             rtol=1e-5, atol=1e-12)


def test_sngan_cifar10_trains_on_tfds_mock_data(tmp_path):
  """The paper config's smoke variant end to end on CIFAR-10-shaped mock records: D alone
  spectrally normalised, no EMA, and the ResNet at 32x32x3."""
  config = load_config("sngan_cifar10", "smoke")
  workdir = str(tmp_path)
  with tfds.testing.mock_data(num_examples=64):
    summary = train.train_and_evaluate(config, workdir)
    exp = experiment.setup(config)
  assert summary["final_step"] == config.train.num_steps
  ckpt = checkpoint.Checkpointer(workdir, 1, 1)
  state, step = experiment.restore_or_init(exp, ckpt)
  ckpt.close()
  assert step == config.train.num_steps
  assert set(state["spectral"]) == {"disc"} and "ema" not in state
  assert state["gen"]["params"]["conv_out"]["kernel"].shape == (3, 3, 4 * 4, 3)
