"""DiT (Peebles & Xie 2023): the paper's sizes against the official code's parameter counts,
adaLN-Zero's identity at initialisation, patchify and unpatchify, and the config's DiT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from fairgen import data, models
from fairgen.models import dit

# Parameters of the paper's models (ImageNet 256: 32x32x4 latents, 1,000 classes, learned
# sigma), in millions as Table 1 and the model zoo give them.
PAPER_MILLIONS = {"S": 33, "B": 130, "L": 458, "XL": 675}


def count(model, shape=(1, 32, 32, 4)):
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape), jnp.zeros((1,)),
                          jnp.zeros((1,), jnp.int32))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("size", dit.SIZES)
def test_the_paper_sizes_have_its_parameter_counts(size):
  """Every size at patches 2, 4 and 8 is within 1M of the paper's millions (patch 8's larger
  output layer adds 0.8M to XL); DiT-XL/2 is the
  official code's 675,129,632 with its frozen 256 x 1152 position table."""
  hidden, depth, heads = dit.SIZES[size]
  for patch in (2, 4, 8):
    model = dit.DiT(out_channels=8, patch=patch, hidden=hidden, depth=depth, heads=heads,
                    num_classes=1000)
    n = count(model)
    assert abs(n / 1e6 - PAPER_MILLIONS[size]) < 1.0, (size, patch, n)
    if size == "XL" and patch == 2:
      assert n + 256 * 1152 == 675_129_632


def config_dit():
  config = load_config("dit_mnist", "smoke,conditional")
  spec = data.load(config.data, "test").spec
  return models.build(config.model, spec), spec


def test_adaln_zero_makes_every_block_the_identity_at_initialisation():
  """Each block's output is its input (gates start at zero) and the network's output is
  zero; once the modulation is trained (perturbed here), neither holds."""
  model, spec = config_dit()
  x = jax.random.normal(jax.random.key(0), (3,) + tuple(spec.image_shape))
  t, y = jnp.array([1.0, 500.0, 999.0]), jnp.array([0, 4, 10])
  params = model.init(jax.random.key(1), x, t, y)["params"]

  def streams(params):
    out, state = model.apply({"params": params}, x, t, y, capture_intermediates=True)
    inter = state["intermediates"]
    tokens = np.asarray(inter["x_embedder"]["__call__"][0])
    return out, tokens, [np.asarray(inter[f"block_{i}"]["__call__"][0])
                         for i in range(model.depth)]

  out, tokens, blocks = streams(params)
  np.testing.assert_array_equal(out, 0.0)
  for b in blocks[1:]:
    np.testing.assert_array_equal(b, blocks[0])
  grid = spec.image_shape[0] // model.patch
  want = tokens.reshape(3, grid * grid, -1) + dit.sincos_position_table(model.hidden, (grid, grid))
  np.testing.assert_allclose(blocks[0], want, rtol=1e-6, atol=1e-6)
  trained = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.1 if "adaLN_modulation" in jax.tree_util.keystr(p) else v, params)
  _, _, moved = streams(trained)
  assert not np.allclose(moved[1], moved[0])


def test_unpatchify_puts_each_token_back_on_its_own_patch():
  """At initialisation the blocks mix no tokens, so with a nonzero final layer, changing
  the input's patch (1, 2) changes the output on exactly that patch's pixels; and with a
  per-(row, column, channel) code as the final bias, every patch carries the code in
  place (pixels inside a patch row-major, channels last)."""
  model = dit.DiT(out_channels=2, patch=2, hidden=16, depth=1, heads=2)
  x = jax.random.normal(jax.random.key(1), (1, 4, 6, 2))
  params = model.init(jax.random.key(0), x, jnp.zeros(1))["params"]
  code = np.arange(2 * 2 * 2, dtype=np.float32)
  params["final_linear"]["bias"] = jnp.asarray(code)
  out = np.asarray(model.apply({"params": params}, x, jnp.zeros(1)))[0]
  for i in range(2):
    for j in range(3):
      np.testing.assert_array_equal(out[2 * i:2 * i + 2, 2 * j:2 * j + 2], code.reshape(2, 2, 2))
  params["final_linear"]["kernel"] = jax.random.normal(jax.random.key(2), (16, 8))
  apply = lambda x: np.asarray(model.apply({"params": params}, x, jnp.zeros(1)))[0]
  changed = apply(x.at[:, 2:4, 4:6].add(1.0)) != apply(x)
  want = np.zeros((4, 6, 2), bool)
  want[2:4, 4:6] = True
  np.testing.assert_array_equal(changed, want)


@pytest.mark.parametrize("key,value,fragment", [
    ("model.patch", 5, "model.patch=5 must divide the image's sides (28x28)"),
    ("model.size", "M", "model.size must be one of S, B, L, XL"),
    ("model.heads", 5, "model.hidden (32) must be a multiple of 4 and of model.heads (5)")])
def test_impossible_sizes_are_refused_in_one_line(key, value, fragment):
  from fairgen.config import ConfigError
  config = load_config("dit_mnist", "smoke", **{key: value})
  spec = data.load(config.data, "test").spec
  with pytest.raises(ConfigError) as info:
    models.build(config.model, spec)
  assert fragment in str(info.value) and "\n" not in str(info.value)


def test_the_launcher_refuses_a_patch_that_does_not_divide_the_image(tmp_path):
  """Through ``fairgen.main``: one line, exit status 2, no traceback, before any step."""
  from conftest import run_main
  result = run_main("--config=experiments/dit_mnist.py:smoke", f"--workdir={tmp_path}/w",
                    "--config.model.patch=3")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "fairgen: error: model.patch=3 must divide the image's sides (28x28).")
  assert "Traceback" not in result.stderr
