"""Classifiers: the feature/attribute backbones of the metrics.

``Classifier``, a small convolutional network (below), and ``ResNetClassifier``, a
ResNet-18-style network for attributes of larger images (CelebA).

``Classifier``: Conv(w) -> Conv(w, s2) -> Conv(2w) -> Conv(2w, s2) -> Flatten -> Dense(feature_dim) -> Dropout
-> Dense(num_classes), ReLU after every hidden layer. The Dense(feature_dim) activations are
the penultimate *features* (for FID, KID and PRDC); the logits give class probabilities (for
Inception Score and per-class proportions). They are not generative models, so they are not
in ``fairgen.models.MODELS``; ``fairgen.classifiers`` trains, saves and loads them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# Two stride-2 convolutions, each halving (rounding up with SAME padding) the image sides.
MIN_IMAGE_SIDE = 8


class Classifier(nn.Module):
  """Maps NHWC images in [-1, 1] to penultimate features and class logits.

  Attributes:
    num_classes: number of output classes.
    width: channels of the first two convolutions (the last two have ``2 * width``).
    feature_dim: size of the penultimate (feature) layer.
    dropout: dropout rate on the features, active only when ``train`` is True.
  """

  num_classes: int
  width: int = 32
  feature_dim: int = 128
  dropout: float = 0.25

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Runs the classifier.

    Args:
      x: ``[batch, height, width, channels]`` images, height and width at least 8.
      train: enables dropout (needs a ``dropout`` rng).

    Returns:
      ``{"features": [batch, feature_dim], "logits": [batch, num_classes]}``.

    Raises:
      ValueError: if ``x`` is not NHWC or smaller than 8x8.
    """
    if x.ndim != 4 or min(x.shape[1:3]) < MIN_IMAGE_SIDE:
      raise ValueError(
          f"Classifier needs NHWC images of at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}, got "
          f"shape {x.shape}.")
    for i, (channels, stride) in enumerate(
        [(self.width, 1), (self.width, 2), (2 * self.width, 1), (2 * self.width, 2)]):
      x = nn.relu(nn.Conv(channels, (3, 3), strides=stride, padding="SAME",
                          name=f"conv_{i}")(x))
    x = x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(self.feature_dim, name="features")(x))
    h = nn.Dropout(self.dropout, deterministic=not train)(features)
    logits = nn.Dense(self.num_classes, name="logits")(h)
    return {"features": features, "logits": logits}


def _groups(channels: int) -> int:
  """Group norm's groups: 8 channels each (at least one group, at most 32, Wu & He's)."""
  return max(1, min(32, channels // 8))


class _BasicBlock(nn.Module):
  """Pre-activation basic block: GN -> ReLU -> conv3x3(stride) -> GN -> ReLU -> conv3x3."""

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    norm = lambda name: nn.GroupNorm(num_groups=_groups(self.features), name=name)
    h = nn.relu(norm("norm_0")(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), strides=self.stride, use_bias=False,
                         name="shortcut")(h)
    h = nn.Conv(self.features, (3, 3), strides=self.stride, padding="SAME", use_bias=False,
                name="conv_0")(h)
    h = nn.relu(norm("norm_1")(h))
    h = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, name="conv_1")(h)
    return h + shortcut


class ResNetClassifier(nn.Module):
  """A ResNet-18-style classifier (He et al. 2016, pre-activation blocks) for attributes of
  larger images such as CelebA's (Choi et al. 2020 classify attributes with a ResNet-18).

  A conv3x3 stem, four stages of ``blocks`` basic blocks of ``width``, 2x, 4x and 8x
  channels (stride 2 from the second stage on), then GN -> ReLU -> global average pool: the
  features (8 x ``width``), -> Dropout -> Dense(num_classes). Group norm instead of batch
  norm keeps the classifier free of batch statistics, so training, evaluation and a
  differentially private fit treat every example alone.

  Attributes:
    num_classes: number of output classes.
    width: channels of the first stage.
    blocks: basic blocks per stage ((2, 2, 2, 2) is ResNet-18).
    dropout: dropout rate on the features, active only when ``train`` is True.
  """

  num_classes: int
  width: int = 64
  blocks: tuple[int, ...] = (2, 2, 2, 2)
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """``{"features": [batch, 8 * width], "logits": [batch, num_classes]}`` of NHWC images."""
    if x.ndim != 4 or min(x.shape[1:3]) < MIN_IMAGE_SIDE:
      raise ValueError(
          f"ResNetClassifier needs NHWC images of at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}, "
          f"got shape {x.shape}.")
    h = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False, name="stem")(x)
    for stage, count in enumerate(self.blocks):
      for i in range(count):
        stride = 2 if stage > 0 and i == 0 else 1
        h = _BasicBlock(self.width * 2 ** stage, stride, name=f"stage_{stage}_{i}")(h)
    c = h.shape[-1]
    h = nn.relu(nn.GroupNorm(num_groups=_groups(c), name="norm_out")(h))
    features = jnp.mean(h, axis=(1, 2))
    h = nn.Dropout(self.dropout, deterministic=not train)(features)
    logits = nn.Dense(self.num_classes, name="logits")(h)
    return {"features": features, "logits": logits}
