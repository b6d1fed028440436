"""A VAE with MLP or convolutional encoder/decoder and a Bernoulli or Gaussian likelihood.

With ``num_classes`` > 0 it is a conditional VAE (Sohn et al. 2015): the one-hot label (a
class, or a sensitive-attribute group for ``fair.method='conditional'``) enters the encoder,
``q(z | x, y)``, beside the flattened image features, and the decoder, ``p(x | z, y)``,
beside the latent; the prior ``p(z)`` stays N(0, I).

Images are in [-1, 1]. The Bernoulli likelihood models the binarized image
(pixel > 0, i.e. intensity > 0.5), so its negative log-likelihood is a proper discrete NLL
in nats. The Gaussian likelihood has a learned per-channel log-scale and models the image
in [-1, 1] as continuous.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fairgen.config import ConfigError, require
from fairgen.data.base import DataSpec
from fairgen.models import fast_conv
from fairgen.models.registry import MODELS, num_conditions

LIKELIHOODS = ("bernoulli", "gaussian")
ARCHITECTURES = ("mlp", "conv")


class Encoder(nn.Module):
  """Images -> (mean, log-variance) of the diagonal Gaussian posterior, flat ``[B, D]``.

  With ``latent_channels`` > 0 (conv only) the posterior is a feature map: a 3x3
  convolution of the last conv features gives ``latent_channels`` means and log-variances
  per position, flattened (``spatial_latent`` gives the map's shape).
  """

  latent_dim: int
  arch: str = "mlp"
  hidden: Sequence[int] = (512, 256)
  dtype: Any = jnp.float32
  latent_channels: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """``cond``: an optional ``[B, K]`` one-hot label, joined to the flattened features."""
    join = lambda h: h if cond is None else jnp.concatenate([h, cond.astype(h.dtype)], -1)
    if self.arch == "conv":
      for feat in self.hidden:
        x = nn.relu(fast_conv.conv(feat, 4, 2, fast=False, dtype=self.dtype)(x))
      if self.latent_channels:
        stats = nn.Conv(2 * self.latent_channels, (3, 3), padding="SAME", dtype=self.dtype)(x)
        mean, logvar = jnp.split(stats.astype(jnp.float32), 2, axis=-1)
        return mean.reshape(x.shape[0], -1), logvar.reshape(x.shape[0], -1)
      x = join(x.reshape(x.shape[0], -1))
    else:
      x = join(x.reshape(x.shape[0], -1))
      for feat in self.hidden:
        x = nn.relu(nn.Dense(feat, dtype=self.dtype)(x))
    stats = nn.Dense(2 * self.latent_dim, dtype=self.dtype)(x).astype(jnp.float32)
    mean, logvar = jnp.split(stats, 2, axis=-1)
    return mean, logvar


class Decoder(nn.Module):
  """Latents -> per-pixel likelihood parameters (Bernoulli logits or Gaussian means)."""

  image_shape: tuple[int, int, int]
  arch: str = "mlp"
  hidden: Sequence[int] = (256, 512)
  dtype: Any = jnp.float32
  latent_channels: int = 0

  @nn.compact
  def __call__(self, z: jax.Array, cond: jax.Array | None = None) -> jax.Array:
    """``cond``: an optional ``[B, K]`` one-hot label, joined to the latent."""
    if cond is not None:
      z = jnp.concatenate([z, cond.astype(z.dtype)], -1)
    h, w, c = self.image_shape
    if self.arch == "conv":
      n_up = len(self.hidden)
      if h % 2**n_up or w % 2**n_up:
        raise ConfigError(f"conv decoder needs sides divisible by {2**n_up}, got {h}x{w}.")
      sh, sw = h // 2**n_up, w // 2**n_up
      if self.latent_channels:  # A spatial latent: a 3x3 convolution of its map.
        x = z.reshape(z.shape[0], sh, sw, self.latent_channels)
        x = nn.relu(nn.Conv(self.hidden[0], (3, 3), padding="SAME", dtype=self.dtype)(x))
      else:
        x = nn.relu(nn.Dense(sh * sw * self.hidden[0], dtype=self.dtype)(z))
        x = x.reshape(z.shape[0], sh, sw, self.hidden[0])
      for feat in self.hidden[1:]:
        x = nn.relu(fast_conv.conv_transpose(feat, 4, 2, fast=False, dtype=self.dtype)(x))
      x = fast_conv.conv_transpose(c, 4, 2, fast=False, dtype=self.dtype)(x)
    else:
      x = z
      for feat in self.hidden:
        x = nn.relu(nn.Dense(feat, dtype=self.dtype)(x))
      x = nn.Dense(h * w * c, dtype=self.dtype)(x).reshape(z.shape[0], h, w, c)
    return x.astype(jnp.float32)


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over latent dims."""
  return 0.5 * jnp.sum(jnp.exp(logvar) + mean**2 - 1.0 - logvar, axis=-1)


class VAE(nn.Module):
  """A VAE over images in [-1, 1].

  Attributes:
    image_shape: (H, W, C).
    latent_dim: size of z.
    arch: 'mlp' or 'conv'.
    hidden: encoder widths (the decoder mirrors them).
    likelihood: 'bernoulli' (binarized pixels) or 'gaussian' (learned per-channel scale).
    dtype: computation dtype.
    num_classes: > 0: a conditional VAE on labels in ``[0, num_classes)``.
    condition_key: the batch column its labels come from ('label' or 'attr').
    latent_channels: > 0: a spatial latent (conv, unconditional): ``latent_dim`` is then
      the flattened size of the ``spatial_latent`` map.
  """

  image_shape: tuple[int, int, int]
  latent_dim: int = 32
  arch: str = "mlp"
  hidden: Sequence[int] = (512, 256)
  likelihood: str = "bernoulli"
  dtype: Any = jnp.float32
  num_classes: int = 0
  condition_key: str = "label"
  latent_channels: int = 0

  @property
  def spatial_latent(self) -> tuple[int, int, int] | None:
    """The latent's map ``(H / 2^n, W / 2^n, latent_channels)`` for n conv layers, or None
    for a flat latent. Latent diffusion (``fairgen.objectives.latent``) trains on it."""
    if not self.latent_channels:
      return None
    h, w, _ = self.image_shape
    n = len(self.hidden)
    return (h // 2**n, w // 2**n, self.latent_channels)

  def setup(self):
    if self.likelihood not in LIKELIHOODS:
      raise ConfigError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}.")
    if self.arch not in ARCHITECTURES:
      raise ConfigError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}.")
    self.encoder = Encoder(self.latent_dim, self.arch, tuple(self.hidden), self.dtype,
                           self.latent_channels)
    self.decoder = Decoder(self.image_shape, self.arch, tuple(reversed(self.hidden)), self.dtype,
                           self.latent_channels)
    if self.likelihood == "gaussian":
      self.log_scale = self.param("log_scale", nn.initializers.zeros, (self.image_shape[-1],))

  def _cond(self, labels: jax.Array | None, batch: int) -> jax.Array | None:
    """The one-hot labels of a conditional VAE (None when unconditional)."""
    if not self.num_classes:
      return None
    if labels is None:
      raise ValueError(f"This conditional VAE needs labels in [0, {self.num_classes}).")
    return jax.nn.one_hot(jnp.broadcast_to(labels, (batch,)), self.num_classes)

  def encode(self, x: jax.Array, labels: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """Posterior mean and log-variance (``labels``: a conditional VAE's, else unused)."""
    return self.encoder(x, self._cond(labels, x.shape[0]))

  def decode(self, z: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """Likelihood parameters (logits or means) for latents ``z`` (and ``labels``)."""
    return self.decoder(z, self._cond(labels, z.shape[0]))

  def log_likelihood(self, x: jax.Array, params: jax.Array) -> jax.Array:
    """log p(x | z) per example, summed over pixels, from decoder outputs ``params``."""
    axes = tuple(range(1, x.ndim))
    if self.likelihood == "bernoulli":
      target = (x > 0).astype(jnp.float32)
      return -jnp.sum(optax.sigmoid_binary_cross_entropy(params, target), axis=axes)
    log_scale = self.log_scale
    z = (x - params) * jnp.exp(-log_scale)
    return jnp.sum(-0.5 * z**2 - log_scale - 0.5 * math.log(2 * math.pi), axis=axes)

  def mean_image(self, params: jax.Array) -> jax.Array:
    """The decoder's mean image, in [-1, 1]."""
    if self.likelihood == "bernoulli":
      return 2.0 * jax.nn.sigmoid(params) - 1.0
    return jnp.clip(params, -1.0, 1.0)

  def __call__(self, x: jax.Array, labels: jax.Array | None = None) -> dict[str, jax.Array]:
    """One-sample ELBO terms per example; needs the 'latent' RNG stream."""
    mean, logvar = self.encode(x, labels)
    eps = jax.random.normal(self.make_rng("latent"), mean.shape)
    z = mean + jnp.exp(0.5 * logvar) * eps
    params = self.decode(z, labels)
    return {"log_likelihood": self.log_likelihood(x, params),
            "kl": gaussian_kl(mean, logvar)}


@MODELS.register("vae")
def build_vae(spec: DataSpec, latent_dim: int = 32, arch: str = "mlp",
              hidden: tuple[int, ...] = (512, 256), likelihood: str = "bernoulli",
              conditional: bool = False, condition_key: str = "label",
              dtype: str = "float32", latent_channels: int = 0) -> VAE:
  """A VAE over the dataset's images; ``conditional``: a conditional VAE on
  ``batch[condition_key]`` (classes, or groups for ``fair.method='conditional'``).
  ``latent_channels`` > 0: a spatial latent of that many channels at the last conv
  layer's resolution (an unconditional conv VAE; ``latent_dim`` is then its size), the
  first stage of latent diffusion (``experiments/ldm_mnist.py``)."""
  num_classes = num_conditions(spec, conditional, condition_key)
  require(isinstance(latent_channels, int) and latent_channels >= 0,
          f"model.latent_channels must be an integer >= 0, got {latent_channels!r}.")
  if latent_channels:
    require(arch == "conv" and not conditional, "model.latent_channels > 0 (a spatial "
            f"latent) needs an unconditional conv VAE, got arch={arch!r}, "
            f"conditional={conditional}.")
    h, w, _ = spec.image_shape
    n = len(hidden)
    require(h % 2**n == 0 and w % 2**n == 0, f"A spatial latent needs image sides divisible "
            f"by 2^{n} (one halving per conv layer), got {h}x{w}.")
    latent_dim = (h // 2**n) * (w // 2**n) * latent_channels
  return VAE(spec.image_shape, latent_dim, arch, tuple(hidden), likelihood,
             dtype=jnp.dtype(dtype), num_classes=num_classes, condition_key=condition_key,
             latent_channels=latent_channels)
