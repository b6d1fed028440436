"""``SubpixelGradConv`` (custom input gradient) equals ``nn.Conv``: outputs and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairgen.models import dcgan, fast_conv
from fairgen.objectives import losses


@pytest.mark.parametrize("size,cin,cout,k", [(14, 8, 4, 5), (28, 1, 4, 5), (9, 3, 2, 3),
                                             (8, 4, 4, 4)])
def test_outputs_and_all_gradients_match_the_naive_conv(size, cin, cout, k):
  x = jax.random.normal(jax.random.key(0), (3, size, size, cin))
  naive = nn.Conv(cout, (k, k), strides=(2, 2), padding="SAME")
  fast = fast_conv.conv(cout, k, 2, fast=True)
  params = naive.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too

  def loss(module, p, x):
    y = module.apply(p, x)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape) / y.size)

  np.testing.assert_allclose(fast.apply(params, x), naive.apply(params, x), rtol=1e-5,
                             atol=1e-5)
  g_fast = jax.jit(jax.grad(lambda p, x: loss(fast, p, x), argnums=(0, 1)))(params, x)
  g_naive = jax.jit(jax.grad(lambda p, x: loss(naive, p, x), argnums=(0, 1)))(params, x)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_naive)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_fast_and_naive_discriminators_agree():
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  fast, naive = (dcgan.Discriminator(width=0.25, fast_conv=f) for f in (True, False))
  params = naive.init(jax.random.key(1), x, train=False)
  assert jax.tree.structure(fast.init(jax.random.key(1), x, train=False)) == \
      jax.tree.structure(params)
  f = lambda m: jax.grad(lambda p, x: jnp.sum(m.apply(p, x, train=False) ** 2),
                         argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(f(fast)), jax.tree.leaves(f(naive))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("penalty", ["gradient_penalty", "r1_penalty"])
def test_penalties_double_backprop_through_the_custom_vjp_layer(penalty):
  """The gradient penalty and R1 differentiate D's input gradient with respect to D's
  parameters (double backprop): through SubpixelGradConv's custom VJP they equal the naive
  layer's, value and parameter gradient."""
  real = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  fake = jax.random.normal(jax.random.key(2), (4, 28, 28, 1))
  inputs = losses.interpolate(real, fake, jax.random.key(3))
  fast, naive = (dcgan.Discriminator(width=0.25, fast_conv=f) for f in (True, False))
  params = naive.init(jax.random.key(1), real, train=False)

  def penalty_of(module):
    def value(p):
      fn = lambda x: module.apply(p, x, train=False)
      return jnp.mean(getattr(losses, penalty)(fn, inputs))
    return jax.jit(jax.value_and_grad(value))(params)

  (v_fast, g_fast), (v_naive, g_naive) = penalty_of(fast), penalty_of(naive)
  np.testing.assert_allclose(v_fast, v_naive, rtol=1e-5)
  fast_leaves = jax.tree_util.tree_flatten_with_path(g_fast)[0]
  for (path, a), b in zip(fast_leaves, jax.tree.leaves(g_naive)):
    if "kernel" in jax.tree_util.keystr(path):  # Biases do not move an input gradient.
      assert np.any(np.asarray(b) != 0), path
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-12)
