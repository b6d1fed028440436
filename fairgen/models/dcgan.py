"""The seeds' DCGAN (the TensorFlow DCGAN tutorial's MNIST model), with a width multiplier
and a class-conditional variant (label embedding into G, projection discriminator).

Generator: Dense(h/4 * w/4 * 256) -> BN -> LeakyReLU -> ConvT 128 5x5 s1 -> BN -> LeakyReLU
-> ConvT 64 5x5 s2 -> BN -> LeakyReLU -> ConvT C 5x5 s2 -> tanh.
Discriminator: Conv 64 5x5 s2 -> LeakyReLU -> Dropout 0.3 -> Conv 128 5x5 s2 -> LeakyReLU ->
Dropout 0.3 -> Flatten -> Dense 1 (+ projection <embed(y), h> when conditional).

``fast_conv`` swaps the generator's stride-2 transposed convolutions for their exact
stride-1 + depth-to-space reformulation (``fast_conv.py``), whose weight gradient XLA on CPU
computes about 15x faster. In the discriminator it computes the input gradient of the
second strided convolution the same way (``fast_conv.SubpixelGradConv``). Parameters and
outputs are the same either way.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fairgen.config import ConfigError
from fairgen.data.base import DataSpec
from fairgen.models import fast_conv
from fairgen.models.registry import MODELS, GanModules, num_conditions

# Keras defaults, as in the seeds' model.
_LEAKY_SLOPE = 0.3
_BN_MOMENTUM = 0.99
_BN_EPSILON = 1e-3


def _channels(base: int, width: float) -> int:
  return max(1, int(round(base * width)))


class Generator(nn.Module):
  """Maps latents (and labels, when conditional) to images in [-1, 1].

  Attributes:
    image_shape: (H, W, C) of the output; H and W must be divisible by 4.
    latent_dim: size of the latent vector z.
    width: channel multiplier (1.0 is the seeds' 256/128/64).
    num_classes: > 0 makes the generator class-conditional.
    fast_conv: use the exact stride-1 reformulation of the stride-2 ConvTranspose.
    dtype: computation dtype (parameters stay float32).
    bn_momentum: of the batch norms' running statistics (Keras' 0.99; 0 for standing
      statistics: ``fairgen.objectives.gan``).
  """

  image_shape: tuple[int, int, int]
  latent_dim: int = 100
  width: float = 1.0
  num_classes: int = 0
  fast_conv: bool = True
  dtype: Any = jnp.float32
  bn_momentum: float = _BN_MOMENTUM

  @nn.compact
  def __call__(self, z: jax.Array, labels: jax.Array | None = None,
               train: bool = True) -> jax.Array:
    h, w, c = self.image_shape
    if h % 4 or w % 4:
      raise ConfigError(f"DCGAN needs image sides divisible by 4, got {self.image_shape}.")
    if self.num_classes:
      if labels is None:
        raise ValueError("A conditional generator needs labels.")
      z = jnp.concatenate([z, nn.Embed(self.num_classes, self.latent_dim, name="label_embed")(
          labels).astype(z.dtype)], axis=-1)

    def bn_act(x):
      x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                       epsilon=_BN_EPSILON, dtype=self.dtype)(x)
      return nn.leaky_relu(x, _LEAKY_SLOPE)

    x = nn.Dense(h // 4 * w // 4 * _channels(256, self.width), use_bias=False,
                 dtype=self.dtype)(z)
    x = bn_act(x).reshape(z.shape[0], h // 4, w // 4, _channels(256, self.width))
    # Explicit names keep the fast and naive parameter trees interchangeable.
    x = fast_conv.conv_transpose(_channels(128, self.width), 5, 1, fast=False, use_bias=False,
                              dtype=self.dtype, name="deconv_0")(x)
    x = bn_act(x)
    x = fast_conv.conv_transpose(_channels(64, self.width), 5, 2, fast=self.fast_conv,
                              use_bias=False, dtype=self.dtype, name="deconv_1")(x)
    x = bn_act(x)
    x = fast_conv.conv_transpose(c, 5, 2, fast=self.fast_conv, use_bias=False, dtype=self.dtype,
                              name="deconv_2")(x)
    return jnp.tanh(x).astype(jnp.float32)


class Discriminator(nn.Module):
  """Maps images (and labels, when conditional) to one real/fake logit per example.

  Attributes:
    width: channel multiplier (1.0 is the seeds' 64/128).
    num_classes: > 0 adds a projection term <embed(y), features> (Miyato & Koyama 2018).
    dropout: dropout rate after each convolution.
    dtype: computation dtype (parameters stay float32).
    fast_conv: compute the second convolution's input gradient as a stride-1
      convolution + depth-to-space (exact; see ``fast_conv.SubpixelGradConv``).
  """

  width: float = 1.0
  num_classes: int = 0
  dropout: float = 0.3
  dtype: Any = jnp.float32
  fast_conv: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array | None = None,
               train: bool = True) -> jax.Array:
    for i, base in enumerate((64, 128)):
      # The space-to-depth form is slower than XLA's own strided conv on CPU
      # (tools/bench_layers.py). The sub-pixel input gradient pays off only with many
      # input channels, so the first layer (the image's) stays naive; it needs no input
      # gradient in the discriminator's own update either.
      fast = self.fast_conv and i > 0
      # Explicit names keep the fast and naive parameter trees interchangeable.
      x = fast_conv.conv(_channels(base, self.width), 5, 2, fast=fast, dtype=self.dtype,
                      name=f"Conv_{i}")(x)
      x = nn.leaky_relu(x, _LEAKY_SLOPE)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    features = x.reshape(x.shape[0], -1)
    logit = nn.Dense(1, dtype=self.dtype)(features)[:, 0]
    if self.num_classes:
      if labels is None:
        raise ValueError("A conditional discriminator needs labels.")
      embed = nn.Embed(self.num_classes, features.shape[-1], name="label_projection")(labels)
      logit = logit + jnp.sum(embed.astype(features.dtype) * features, axis=-1)
    return logit.astype(jnp.float32)


@MODELS.register("dcgan")
def build_dcgan(spec: DataSpec, latent_dim: int = 100, width: float = 1.0,
                conditional: bool = False, dropout: float = 0.3,
                fast_conv: bool = True, condition_key: str = "label",
                dtype: str = "float32") -> GanModules:
  """The seeds' DCGAN; ``conditional`` conditions both nets on ``batch[condition_key]``.

  ``condition_key='label'`` conditions on the dataset's classes, ``'attr'`` on its
  sensitive-attribute groups (``spec.num_groups``; the 'conditional' fairness method).
  """
  num_classes = num_conditions(spec, conditional, condition_key)
  return GanModules(
      generator=Generator(spec.image_shape, latent_dim, width, num_classes, fast_conv,
                          dtype=jnp.dtype(dtype)),
      discriminator=Discriminator(width, num_classes, dropout, dtype=jnp.dtype(dtype)),
      latent_dim=latent_dim, num_classes=num_classes, condition_key=condition_key)
