"""DiffAugment: each operation against its definition, and its place in the GAN step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from fairgen import experiment
from fairgen.config import ConfigError
from fairgen.objectives import diffaugment, gan


def _images(b=3, h=8, w=8, c=3, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (b, h, w, c)).astype(np.float32)


def test_translate_shifts_with_zero_fill():
  x = _images(b=2, c=1)
  out = np.asarray(diffaugment.translate(jnp.asarray(x), jnp.array([1, -2]),
                                         jnp.array([0, 3])))
  expected = np.zeros_like(x)
  expected[0, 1:, :] = x[0, :-1, :]  # Down by 1.
  expected[1, :-2, 3:] = x[1, 2:, :-3]  # Up by 2, right by 3.
  np.testing.assert_array_equal(out, expected)


def test_cut_zeroes_exactly_the_square_and_clips_at_the_border():
  x = np.ones((2, 8, 8, 2), np.float32)
  out = np.asarray(diffaugment.cut(jnp.asarray(x), jnp.array([4, 0]), jnp.array([5, 7]),
                                   (4, 4)))
  expected = x.copy()
  expected[0, 2:6, 3:7] = 0.0
  expected[1, 0:2, 5:8] = 0.0  # Rows -2..1 and columns 5..8, inside the image.
  np.testing.assert_array_equal(out, expected)


def test_colour_operations_follow_their_definitions():
  x = jnp.asarray(_images())
  key = jax.random.key(3)
  shift = np.asarray(diffaugment.brightness(x, key) - x)
  per_image = shift.reshape(3, -1)
  np.testing.assert_allclose(per_image, per_image[:, :1] * np.ones_like(per_image), atol=1e-6)
  assert np.all(np.abs(per_image[:, 0]) <= 0.5)
  # Contrast keeps each image's mean and scales the deviations by one factor in [0.5, 1.5).
  out = np.asarray(diffaugment.contrast(x, key))
  np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), np.asarray(x).mean(axis=(1, 2, 3)),
                             atol=1e-6)
  dev_in = np.asarray(x) - np.asarray(x).mean(axis=(1, 2, 3), keepdims=True)
  dev_out = out - out.mean(axis=(1, 2, 3), keepdims=True)
  ratio = (dev_out.reshape(3, -1) / dev_in.reshape(3, -1))
  np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-4)
  assert np.all((ratio[:, 0] >= 0.5) & (ratio[:, 0] < 1.5))
  # Saturation keeps each pixel's channel mean; on one channel it is the identity.
  out = np.asarray(diffaugment.saturation(x, key))
  np.testing.assert_allclose(out.mean(-1), np.asarray(x).mean(-1), atol=1e-6)
  gray = x[..., :1]
  np.testing.assert_allclose(diffaugment.saturation(gray, key), gray, atol=1e-6)


def test_random_policies_draw_per_example_within_their_ranges():
  x = jnp.ones((64, 16, 16, 1))
  out = np.asarray(diffaugment.cutout(x, jax.random.key(0)))
  zeros = (out == 0).reshape(64, -1).sum(-1)
  assert zeros.max() == 64 and zeros.min() > 0  # An 8x8 square, sometimes clipped.
  assert len(set(map(tuple, (out[..., 0] == 0).reshape(64, -1)))) > 20  # Per example.
  moved = np.asarray(diffaugment.translation(x, jax.random.key(1)))
  empty_rows = (moved[..., 0] == 0).all(axis=2).sum(-1)
  empty_cols = (moved[..., 0] == 0).all(axis=1).sum(-1)
  assert empty_rows.max() == 2 and empty_cols.max() == 2  # At most 1/8 of 16 pixels.
  assert len(set(zip(empty_rows, empty_cols))) > 4
  same = diffaugment.augment(x, jax.random.key(5), ("translation", "cutout"))
  np.testing.assert_array_equal(same, diffaugment.augment(x, jax.random.key(5),
                                                          ("translation", "cutout")))
  assert diffaugment.parse(" color, cutout ") == ("color", "cutout")
  with pytest.raises(ValueError, match="colour"):
    diffaugment.parse("colour")


def test_the_gan_step_augments_what_d_sees_and_nothing_else():
  """D's inputs are augmented in both updates (with a key), the regularisers' are not, and
  the generator's gradient flows through the augmentation."""
  config = load_config("dcgan_mnist", "smoke", **{"objective.diffaugment": "translation,cutout"})
  exp = experiment.setup(config)
  nets = experiment.build_model(config, exp.spec)
  plain = gan.adapter(nets)
  augmented = gan.adapter(nets, ("translation", "cutout"))
  params = experiment.init_state(exp)["disc"]["params"]
  x = jnp.asarray(_images(b=4, h=28, w=28, c=1))
  y = jnp.zeros(4, jnp.int32)
  key = jax.random.key(0)
  assert not np.allclose(augmented.discriminate(params, x, y, key),
                         plain.discriminate(params, x, y, key))
  np.testing.assert_array_equal(augmented.discriminate(params, x, y, None),
                                plain.discriminate(params, x, y, None))
  grad = jax.grad(lambda im: jnp.sum(augmented.discriminate(params, im, y, key)))(x)
  cut_out = np.asarray(diffaugment.augment(jnp.ones_like(x), jax.random.fold_in(key, 1),
                                           ("translation", "cutout")))
  assert np.any(np.asarray(grad) != 0)
  # Pixels the augmentation removed get no gradient: it is applied, and differentiated.
  assert np.sum((np.asarray(grad) == 0) & (cut_out == 0)) > 0
  with pytest.raises(ConfigError, match="diffaugment"):
    gan.check({**gan.DEFAULTS, "diffaugment": "flip"})
