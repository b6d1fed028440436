"""Spectral normalisation: the estimate against NumPy's SVD, its gradient, and the GAN step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fairgen.models import spectral
from fairgen.objectives import adversarial, gan, losses
from test_behaviour_loop import _tiny_gan

_SHAPES = {"conv/kernel": (3, 3, 8, 16), "dense/kernel": (40, 7), "embed/embedding": (10, 32)}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  params = {}
  for path, shape in _SHAPES.items():
    module, name = path.split("/")
    params[module] = {name: jnp.asarray(rng.normal(size=shape), jnp.float32)}
  params["conv"]["bias"] = jnp.ones((16,), jnp.float32)  # rank 1: left as it is
  return params


def _assert_close(actual, expected):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7)


def _max_abs(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _top_singular_value(leaf):
  leaf = np.asarray(leaf, np.float64)
  return np.linalg.svd(leaf.reshape(-1, leaf.shape[-1]), compute_uv=False)[0]


def test_power_iteration_converges_to_the_largest_singular_value():
  params = _params()
  state = spectral.init_state(params, jax.random.key(0))
  assert set(state) == set(_SHAPES)  # every matrix, and not the bias
  iterate = jax.jit(spectral.power_iteration)
  for _ in range(300):
    state = iterate(params, state)
  sigmas = spectral.sigmas(params, state)
  normalized = spectral.normalize(params, state)
  for path in _SHAPES:
    module, name = path.split("/")
    np.testing.assert_allclose(float(sigmas[path]), _top_singular_value(params[module][name]),
                               rtol=1e-4, err_msg=path)
    np.testing.assert_allclose(_top_singular_value(normalized[module][name]), 1.0, rtol=1e-4)
  np.testing.assert_array_equal(normalized["conv"]["bias"], params["conv"]["bias"])


def test_one_power_iteration_is_the_textbook_step():
  """v = M^T u / |M^T u|, u = M v / |M v| for M = leaf.reshape(-1, out).T, u of size out."""
  params = _params(1)
  state = spectral.init_state(params, jax.random.key(3))
  new = spectral.power_iteration(params, state)
  for path in _SHAPES:
    module, name = path.split("/")
    leaf = np.asarray(params[module][name], np.float64)
    m = leaf.reshape(-1, leaf.shape[-1]).T
    u = np.asarray(state[path]["u"], np.float64)
    assert u.shape == (leaf.shape[-1],)
    v = m.T @ u / np.linalg.norm(m.T @ u)
    u = m @ v / np.linalg.norm(m @ v)
    np.testing.assert_allclose(new[path]["v"], v, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new[path]["u"], u, rtol=1e-4, atol=1e-6)


def test_the_gradient_flows_through_the_matrix_with_u_and_v_held_fixed():
  """d<G, W / sigma(W)>/dW = G / sigma - <G, W> / sigma^2 * (u v^T) in W's layout, where
  sigma = u^T M v (Miyato et al. 2018, eq. 12)."""
  params = {"dense": {"kernel": _params()["dense"]["kernel"]}}
  state = spectral.init_state(params, jax.random.key(0))
  g = np.random.default_rng(5).normal(size=(40, 7))
  grad = jax.grad(lambda p: jnp.sum(spectral.normalize(p, state)["dense"]["kernel"] * g))(
      params)["dense"]["kernel"]
  w = np.asarray(params["dense"]["kernel"], np.float64)
  u, v = (np.asarray(state["dense/kernel"][k], np.float64) for k in ("u", "v"))
  sigma = u @ w.T @ v
  d_sigma = np.outer(u, v).T  # d(u^T W^T v)/dW, in W's [fan_in, out] layout
  expected = g / sigma - np.sum(g * w) / sigma**2 * d_sigma
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_spectral_norm_in_the_gan_step_and_in_decoding():
  """A linear critic D(x) = <k, x> + b normalised by its spectral norm |k| has input
  gradient k / |k|, so R1 = 1 at every real, whatever k is (|k|^2 without normalisation);
  one step's power iteration runs on D's pre-update parameters; decoding with a normalised
  generator is invariant to scaling its weights."""
  shape, rows = (4, 4, 1), 6
  nets = _tiny_gan(shape, linear_discriminator=True)
  tx = optax.sgd(0.0)
  init = functools.partial(gan.init, nets, tx, tx, shape, True,
                           spectral_norm=("gen", "disc"))
  state = jax.jit(init)(jax.random.key(0))
  assert set(state["spectral"]) == {"gen", "disc", "ema"}
  kernel = np.linspace(-1.0, 1.0, 16, dtype=np.float32).reshape(16, 1) * 3.0
  state["disc"]["params"]["Dense_0"]["kernel"] = jnp.asarray(kernel)
  images = np.random.default_rng(0).uniform(-1, 1, (rows,) + shape).astype(np.float32)
  batch = {"image": images, "label": np.zeros(rows, np.int32)}
  settings = adversarial.Settings(losses.adversarial_loss("nonsaturating"), n_disc=1,
                                  r1_gamma=1.0)
  step = jax.jit(functools.partial(adversarial.train_step, adapter=gan.adapter(nets),
                                   settings=settings, gen_tx=tx, disc_tx=tx))
  new, metrics = step(state, batch, jax.random.key(1))
  np.testing.assert_allclose(float(metrics["r1"]), 1.0, rtol=1e-5)
  # One iteration per net and update: D's and G's on their pre-update parameters, the
  # EMA's on the updated EMA.
  for net, params in (("disc", state["disc"]["params"]), ("gen", state["gen"]["params"]),
                      ("ema", new["ema"])):
    expected = spectral.power_iteration(params, state["spectral"][net])
    _assert_close(new["spectral"][net], expected)
    assert _max_abs(new["spectral"][net], state["spectral"][net]) > 1e-4, net
  no_sn = {k: v for k, v in state.items() if k != "spectral"}
  assert float(step(no_sn, batch, jax.random.key(1))[1]["r1"]) == pytest.approx(
      float(np.sum(kernel**2)), rel=1e-5)

  z = jax.random.normal(jax.random.key(2), (3, nets.latent_dim))
  labels = jnp.zeros((3,), jnp.int32)
  images = gan.decode(new, z, labels, nets=nets)
  scaled = {**new, "ema": jax.tree.map(lambda p: p * 10.0 if p.ndim >= 2 else p, new["ema"])}
  np.testing.assert_allclose(gan.decode(scaled, z, labels, nets=nets), images, atol=1e-5)
  unscaled = {k: v for k, v in scaled.items() if k != "spectral"}
  assert np.max(np.abs(gan.decode(unscaled, z, labels, nets=nets) - images)) > 1e-2


def test_spectral_norm_names_are_checked():
  for value in ("gen,disc", "disc", "", " disc , gen "):
    gan.check({**gan.DEFAULTS, "spectral_norm": value})
  for value in ("discriminator", "disc,disc", 1, "gen;disc"):
    with pytest.raises(ValueError, match="spectral_norm"):
      gan.check({**gan.DEFAULTS, "spectral_norm": value})
