"""Parameter counts and output shapes of every model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairgen.data import DataSpec
from fairgen.models import MODELS, dcgan
from fairgen.models import vae as vae_lib

MNIST = DataSpec("mnist_5k", (28, 28, 1), 10)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_dcgan_matches_the_seeds_parameter_counts():
  # The TF DCGAN tutorial's summaries: 2,305,472 trainable generator parameters (its BN
  # moving statistics excluded) and 212,865 discriminator parameters.
  nets = MODELS.get("dcgan")(MNIST)
  z = jnp.zeros((2, 100))
  # Jitted: eager Flax ops compile one small program each.
  g_vars = jax.jit(functools.partial(nets.generator.init, train=False))(jax.random.key(0), z)
  d_vars = jax.jit(functools.partial(nets.discriminator.init, train=False))(
      jax.random.key(1), jnp.zeros((2, 28, 28, 1)))
  assert _count(g_vars["params"]) == 2_305_472
  assert _count(d_vars["params"]) == 212_865
  z = jax.random.normal(jax.random.key(2), (2, 100))
  images = jax.jit(functools.partial(nets.generator.apply, train=False))(g_vars, z)
  assert images.shape == (2, 28, 28, 1)
  assert float(jnp.mean(jnp.abs(images[0] - images[1]))) > 1e-3  # the image depends on z
  assert jax.jit(functools.partial(nets.discriminator.apply, train=False))(
      d_vars, images).shape == (2,)


@pytest.mark.parametrize("width,expected_channels", [(0.5, (128, 64, 32)), (0.25, (64, 32, 16))])
def test_dcgan_width_multiplier_scales_channels(width, expected_channels):
  g = dcgan.Generator((28, 28, 1), latent_dim=8, width=width)
  params = g.init(jax.random.key(0), jnp.zeros((1, 8)), train=False)["params"]
  kernels = [params[f"deconv_{i}"]["kernel"].shape for i in range(3)]
  assert [k[-1] for k in kernels] == [*expected_channels[1:], 1]
  assert kernels[0][-2] == expected_channels[0]


def test_fast_and_naive_generators_agree():
  kw = dict(image_shape=(28, 28, 1), latent_dim=8, width=0.25)
  fast, naive = dcgan.Generator(**kw, fast_conv=True), dcgan.Generator(**kw, fast_conv=False)
  z = jax.random.normal(jax.random.key(0), (3, 8))
  variables = naive.init(jax.random.key(1), z, train=False)
  assert jax.tree.structure(fast.init(jax.random.key(1), z, train=False)) == \
      jax.tree.structure(variables)
  np.testing.assert_allclose(fast.apply(variables, z, train=False),
                             naive.apply(variables, z, train=False), atol=2e-5)


def test_conditional_dcgan_shapes_and_label_dependence():
  spec = DataSpec("digits", (8, 8, 1), 10)
  nets = MODELS.get("dcgan")(spec, latent_dim=4, width=0.25, conditional=True)
  z = jnp.zeros((4, 4))
  labels = jnp.array([0, 1, 2, 3])
  g_vars = jax.jit(functools.partial(nets.generator.init, train=False))(
      jax.random.key(0), z, labels)
  images = jax.jit(functools.partial(nets.generator.apply, train=False))(g_vars, z, labels)
  assert images.shape == (4, 8, 8, 1)
  assert not np.allclose(images[0], images[1])  # same z, different label
  d_vars = jax.jit(functools.partial(nets.discriminator.init, train=False))(
      jax.random.key(1), images, labels)
  assert "label_projection" in d_vars["params"]
  assert jax.jit(functools.partial(nets.discriminator.apply, train=False))(
      d_vars, images, labels).shape == (4,)
  with pytest.raises(ValueError, match="labels"):
    nets.generator.apply(g_vars, z, train=False)


def test_dcgan_rejects_sides_not_divisible_by_4():
  with pytest.raises(ValueError, match="divisible by 4"):
    dcgan.Generator((10, 10, 1)).init(jax.random.key(0), jnp.zeros((1, 100)), train=False)


@pytest.mark.parametrize("arch,hidden,expected", [
    # Encoder 784-512-256-(2x32), decoder 32-256-512-784.
    ("mlp", (512, 256), 784 * 512 + 512 + 512 * 256 + 256 + 256 * 64 + 64
     + 32 * 256 + 256 + 256 * 512 + 512 + 512 * 784 + 784),
    ("conv", (32, 64), None),
])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_vae_shapes_and_counts(arch, hidden, expected, likelihood):
  model = MODELS.get("vae")(MNIST, latent_dim=32, arch=arch, hidden=hidden,
                            likelihood=likelihood)
  x = jnp.zeros((3, 28, 28, 1))
  params = model.init({"params": jax.random.key(0), "latent": jax.random.key(1)}, x)["params"]
  if expected is not None:
    assert _count(params) == expected + (1 if likelihood == "gaussian" else 0)
  out = model.apply({"params": params}, x, rngs={"latent": jax.random.key(2)})
  assert out["log_likelihood"].shape == (3,) and out["kl"].shape == (3,)
  z = jnp.zeros((5, 32))
  decoded = model.apply({"params": params}, z, method=vae_lib.VAE.decode)
  assert decoded.shape == (5, 28, 28, 1)
  # The mean image and log p(x|z) of the chosen likelihood, against their definitions.
  p = np.asarray(decoded, np.float64) + np.linspace(-3, 3, 784).reshape(1, 28, 28, 1)
  x = np.cos(np.arange(784.0)).reshape(1, 28, 28, 1) * np.ones_like(p)  # in [-1, 1]
  mean = model.apply({"params": params}, jnp.asarray(p, jnp.float32),
                     method=vae_lib.VAE.mean_image)
  log_lik = model.apply({"params": params}, jnp.asarray(x, jnp.float32),
                        jnp.asarray(p, jnp.float32), method=vae_lib.VAE.log_likelihood)
  if likelihood == "bernoulli":
    ref_mean = 2 / (1 + np.exp(-p)) - 1
    prob = 1 / (1 + np.exp(-p))
    ref_ll = np.sum(np.where(x > 0, np.log(prob), np.log1p(-prob)), axis=(1, 2, 3))
  else:  # unit scale at initialisation
    ref_mean = np.clip(p, -1, 1)
    ref_ll = np.sum(-0.5 * (x - p) ** 2 - 0.5 * np.log(2 * np.pi), axis=(1, 2, 3))
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(log_lik, ref_ll, rtol=1e-5)


def test_gaussian_kl_closed_form():
  mean, logvar = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, np.log(4.0)]])
  # 0.5 * sum(var + mean^2 - 1 - log var) = 0.5 * [(1 + 1 - 1 - 0) + (4 - 1 - log 4)]
  np.testing.assert_allclose(vae_lib.gaussian_kl(mean, logvar),
                             [0.5 * (1 + 3 - np.log(4.0))], rtol=1e-6)


def test_bernoulli_likelihood_is_a_proper_discrete_log_probability():
  model = vae_lib.VAE((1, 1, 1), latent_dim=1, hidden=(2,))
  logits = jnp.array([[[[0.3]]]])
  on, off = jnp.ones((1, 1, 1, 1)), -jnp.ones((1, 1, 1, 1))
  total = sum(jnp.exp(model.log_likelihood(x, logits)) for x in (on, off))
  np.testing.assert_allclose(total, 1.0, rtol=1e-6)
