"""Fast strided (transposed) convs must match the naive flax layers exactly."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairgen.models import fast_conv as layers

# (batch, height, width, cin, cout, kernel, stride)
TRANSPOSE_CASES = [
    (3, 7, 7, 8, 4, 5, 2),
    (3, 14, 14, 4, 1, 5, 2),
    (2, 5, 5, 3, 2, 3, 2),
    (2, 6, 5, 3, 2, 4, 2),
    (2, 4, 4, 3, 2, 5, 2),
    (2, 3, 4, 2, 3, 4, 3),
    (2, 5, 3, 2, 3, 2, 2),
    (2, 5, 5, 3, 2, 3, 1),
]
CONV_CASES = [
    (3, 28, 28, 1, 8, 5, 2),
    (3, 14, 14, 8, 4, 5, 2),
    (2, 8, 8, 3, 2, 3, 2),
    (2, 8, 6, 3, 2, 4, 2),
    (2, 7, 7, 3, 2, 5, 2),
    (2, 7, 8, 3, 2, 3, 2),
    (2, 9, 7, 2, 3, 4, 3),
    (2, 5, 5, 2, 3, 2, 2),
]


def _pair(kind, feats, k, s):
  if kind == 'transpose':
    return (nn.ConvTranspose(feats, (k, k), strides=(s, s), padding='SAME'),
            layers.SubpixelConvTranspose(feats, k, s))
  return (nn.Conv(feats, (k, k), strides=(s, s), padding='SAME'),
          layers.SubpixelGradConv(feats, k, s))


def _assert_close(a, b, name):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (name, a.shape, b.shape)
  scale = max(float(np.abs(a).max()), 1e-6)
  np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


def _check(kind, case):
  b, h, w, cin, cout, k, s = case
  naive, fast = _pair(kind, cout, k, s)
  rng = np.random.default_rng(sum(case))
  x = rng.standard_normal((b, h, w, cin)).astype(np.float32)
  bias = rng.standard_normal((cout,)).astype(np.float32)
  out_shape = jax.eval_shape(naive.init_with_output, jax.random.key(0), x)[0]
  cot = rng.standard_normal(out_shape.shape).astype(np.float32)

  def loss(module):
    return lambda p, inp: jnp.sum(module.apply(p, inp) * cot)

  @jax.jit
  def run(key, x):
    init_n = naive.init(key, x)
    init_f = fast.init(key, x)
    # Non-zero bias so that its path is exercised.
    params = {'params': {**init_n['params'], 'bias': bias}}
    grads_n = jax.grad(loss(naive), argnums=(0, 1))(params, x)
    grads_f = jax.grad(loss(fast), argnums=(0, 1))(params, x)
    return (init_n, init_f, naive.apply(params, x), fast.apply(params, x),
            grads_n, grads_f)

  # One compilation per case keeps the test fast.
  init_n, init_f, y_naive, y_fast, (gp_n, gx_n), (gp_f, gx_f) = run(
      jax.random.key(sum(case)), x)
  # Same names, shapes and (same rng) values.
  assert jax.tree.structure(init_n) == jax.tree.structure(init_f)
  jax.tree.map(np.testing.assert_array_equal, init_n, init_f)
  if kind == 'transpose':
    assert y_naive.shape == (b, h * s, w * s, cout)
  _assert_close(y_naive, y_fast, 'forward')
  _assert_close(gx_n, gx_f, 'grad input')
  _assert_close(gp_n['params']['kernel'], gp_f['params']['kernel'],
                'grad kernel')
  _assert_close(gp_n['params']['bias'], gp_f['params']['bias'], 'grad bias')


@pytest.mark.parametrize('case', TRANSPOSE_CASES, ids=str)
def test_subpixel_conv_transpose_matches_naive(case):
  _check('transpose', case)


@pytest.mark.parametrize('case', CONV_CASES, ids=str)
def test_subpixel_grad_conv_matches_naive(case):
  _check('conv', case)


@pytest.mark.parametrize('block', [2, 3])
def test_depth_to_space_layout(block):
  rng = np.random.default_rng(block)
  y = rng.standard_normal((2, 3, 2, block * block * 5)).astype(np.float32)
  # Channel (rh, rw, c) of pixel (h, w) lands on pixel (h*b+rh, w*b+rw).
  z = layers.depth_to_space(y, block)
  c = 5
  np.testing.assert_array_equal(z[:, 1 * block + 1, 0 * block + block - 1, :],
                                y[:, 1, 0, (block + block - 1) * c:
                                  (block + block) * c])


def test_no_bias_and_dtype():
  x = jnp.ones((2, 4, 4, 3))
  for naive, fast in (_pair('transpose', 2, 4, 2), _pair('conv', 2, 4, 2)):
    naive = naive.clone(use_bias=False)
    fast = fast.clone(use_bias=False, dtype=jnp.bfloat16)
    p = naive.init(jax.random.key(0), x)
    pf = fast.init(jax.random.key(0), x)
    assert set(p['params']) == set(pf['params']) == {'kernel'}
    assert pf['params']['kernel'].dtype == jnp.float32
    y = fast.apply(p, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               naive.apply(p, x), rtol=5e-2, atol=5e-2)


def test_factories():
  assert isinstance(layers.conv_transpose(4, 5, 2, fast=False),
                    nn.ConvTranspose)
  assert isinstance(layers.conv_transpose(4, 5, 2, fast=True),
                    layers.SubpixelConvTranspose)
  assert isinstance(layers.conv_transpose(4, 5, 1, fast=True),
                    nn.ConvTranspose)
  assert isinstance(layers.conv(4, 5, 2, fast=False), nn.Conv)
  assert isinstance(layers.conv(4, 5, 2, fast=True, use_bias=False),
                    layers.SubpixelGradConv)
  assert isinstance(layers.conv(4, 5, 1, fast=True), nn.Conv)
  m = layers.conv(4, 3, 2, fast=True, name='c')
  assert m.name == 'c'
