"""DiffAugment (Zhao et al. 2020): differentiable augmentations of every image D sees.

The discriminator sees reals and fakes through the same random policy, in its own update and
in the generator's, so the generator's gradient flows through the augmentation (Zhao et al.
made it for small datasets, such as mnist_5k here). Each operation draws its parameters per example from
one key, so the step stays a function of (seed, step). Images are NHWC in [-1, 1]. The
operations follow the reference implementation (``DiffAugment_tf.py``):

- ``color``: brightness ``x + (u - 0.5)``; saturation ``(x - mean_c) * 2u + mean_c`` (a
  no-op on one channel); contrast ``(x - mean) * (u + 0.5) + mean``, with ``u ~ U[0, 1)``
  per example;
- ``translation``: a shift by up to 1/8 of the side (an integer per example and axis),
  filled with zeros;
- ``cutout``: a square of half the side set to zero at a random centre per example.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def brightness(x: jax.Array, rng: jax.Array) -> jax.Array:
  """Adds ``u - 0.5`` to every pixel of each image."""
  return x + (jax.random.uniform(rng, (x.shape[0], 1, 1, 1), x.dtype) - 0.5)


def saturation(x: jax.Array, rng: jax.Array) -> jax.Array:
  """Scales each pixel's distance from its channel mean by ``2u``."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  return (x - mean) * (jax.random.uniform(rng, (x.shape[0], 1, 1, 1), x.dtype) * 2) + mean


def contrast(x: jax.Array, rng: jax.Array) -> jax.Array:
  """Scales each image's distance from its mean by ``u + 0.5``."""
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) * (jax.random.uniform(rng, (x.shape[0], 1, 1, 1), x.dtype) + 0.5) + mean


def translate(x: jax.Array, shift_h: jax.Array, shift_w: jax.Array) -> jax.Array:
  """``out[b, i, j] = x[b, i - shift_h[b], j - shift_w[b]]``, zero outside the image."""
  b, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = jnp.clip(jnp.arange(h)[None] - shift_h[:, None] + 1, 0, h + 1)
  cols = jnp.clip(jnp.arange(w)[None] - shift_w[:, None] + 1, 0, w + 1)
  return padded[jnp.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def translation(x: jax.Array, rng: jax.Array, ratio: float = TRANSLATION_RATIO) -> jax.Array:
  """Shifts each image by integers in ``[-ratio * side, ratio * side]``."""
  b, h, w, _ = x.shape
  sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
  k_h, k_w = jax.random.split(rng)
  return translate(x, jax.random.randint(k_h, (b,), -sh, sh + 1),
                   jax.random.randint(k_w, (b,), -sw, sw + 1))


def cut(x: jax.Array, centre_h: jax.Array, centre_w: jax.Array, size: tuple[int, int]
        ) -> jax.Array:
  """Zeroes rows ``[c_h - size_h // 2, c_h - size_h // 2 + size_h)`` x the same in columns."""
  top = (centre_h - size[0] // 2)[:, None]
  left = (centre_w - size[1] // 2)[:, None]
  rows = jnp.arange(x.shape[1])[None]
  cols = jnp.arange(x.shape[2])[None]
  in_rows = (rows >= top) & (rows < top + size[0])
  in_cols = (cols >= left) & (cols < left + size[1])
  keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
  return x * keep[..., None].astype(x.dtype)


def cutout(x: jax.Array, rng: jax.Array, ratio: float = CUTOUT_RATIO) -> jax.Array:
  """Zeroes a ``ratio * side`` square at a random centre of each image."""
  b, h, w, _ = x.shape
  size = (int(h * ratio + 0.5), int(w * ratio + 0.5))
  k_h, k_w = jax.random.split(rng)
  return cut(x, jax.random.randint(k_h, (b,), 0, h + (1 - size[0] % 2)),
             jax.random.randint(k_w, (b,), 0, w + (1 - size[1] % 2)), size)


POLICIES: dict[str, tuple[Callable[[jax.Array, jax.Array], jax.Array], ...]] = {
    "color": (brightness, saturation, contrast),
    "translation": (translation,),
    "cutout": (cutout,),
}


def parse(policy: str) -> tuple[str, ...]:
  """``'color,translation'`` -> ('color', 'translation'); ValueError names unknown parts."""
  names = tuple(p.strip() for p in policy.split(",") if p.strip())
  unknown = [n for n in names if n not in POLICIES]
  if unknown:
    raise ValueError(f"Unknown DiffAugment policy {', '.join(unknown)}; valid: "
                     f"{', '.join(POLICIES)} (comma-separated).")
  return names


def augment(x: jax.Array, rng: jax.Array, policy: tuple[str, ...]) -> jax.Array:
  """Applies the operations of ``policy`` in order, each with its own key."""
  ops = [op for name in policy for op in POLICIES[name]]
  for i, op in enumerate(ops):
    x = op(x, jax.random.fold_in(rng, i))
  return x
