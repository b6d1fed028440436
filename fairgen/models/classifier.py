"""A small convolutional classifier: the feature/attribute backbone of the metrics.

Conv(w) -> Conv(w, s2) -> Conv(2w) -> Conv(2w, s2) -> Flatten -> Dense(feature_dim) -> Dropout
-> Dense(num_classes), ReLU after every hidden layer. The Dense(feature_dim) activations are
the penultimate *features* (for FID, KID and PRDC); the logits give class probabilities (for
Inception Score and per-class proportions). It is not a generative model, so it is not in
``fairgen.models.MODELS``; ``fairgen.classifiers`` trains, saves and loads it.
"""

from __future__ import annotations

import flax.linen as nn
import jax

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
