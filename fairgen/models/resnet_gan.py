"""ResNet generators and discriminators in the SNGAN / BigGAN style, for 32x32 and 64x64.

The block structure is BigGAN-PyTorch's (Brock et al. 2019; ``BigGAN.py``, ``layers.py``),
which for 32x32 with ``g_ch=64, d_ch=32`` is the SNGAN ResNet of Miyato et al. 2018
(G 256 channels, D 128):

- ``GBlock``: BN -> ReLU -> 2x nearest upsample -> conv3x3 -> BN -> ReLU -> conv3x3, plus a
  shortcut upsample -> conv1x1. BN is conditional on the class or group label when the
  generator is (Dumoulin et al. 2017 / Miyato & Koyama 2018: per-class gain and bias).
  Its convolutions have no bias, unlike the references': every path from them reaches a
  batch norm through per-channel-constant maps (1x1 convs, upsampling, sums), which
  cancels them exactly. Their gradient is zero but for rounding, which Adam (b1 = 0)
  would turn into lr-sized random steps: noise that made 1 and 8 devices disagree.
- ``DBlock``: [ReLU] -> conv3x3 -> ReLU -> conv3x3 -> [2x2 average pool], plus a conv1x1
  shortcut (pooled before it in the first block, which has no leading ReLU: SNGAN's
  "optimized" block, after it).
- Generator: linear z -> 4x4 -> GBlocks -> BN -> ReLU -> conv3x3 -> tanh.
- Discriminator: DBlocks -> ReLU -> global sum pool -> linear, plus the projection
  ``<embed(y), h>`` when conditional (Miyato & Koyama 2018).
- An optional SAGAN self-attention block (Zhang et al. 2019): in G after the block whose
  output has side ``attention``, in D before the block (other than the first) whose input
  has that side.
- Weight initialisation by name (``INITS``: orthogonal, BigGAN's default; N(0, 0.02);
  Glorot uniform) for every conv, linear and embedding.

Spectral normalisation is not a layer here: ``objective.spectral_norm`` applies it to any
GAN's parameters (``fairgen.models.spectral``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fairgen.config import ConfigError, require
from fairgen.data.base import DataSpec
from fairgen.models.registry import MODELS, GanModules, num_conditions

# Per resolution: G blocks' output channel multipliers (from a 4x4 input of multiplier
# g_in), D blocks' output multipliers and downsampling flags. BigGAN-PyTorch's G_arch/D_arch.
ARCHS = {
    32: dict(g_in=4, g_out=(4, 4, 4), d_out=(4, 4, 4, 4), d_down=(True, True, False, False)),
    64: dict(g_in=16, g_out=(16, 8, 4, 2), d_out=(1, 2, 4, 8, 16),
             d_down=(True, True, True, True, False)),
}
_BN_MOMENTUM = 0.9  # PyTorch's 0.1.
_BN_EPSILON = 1e-5


# Weight initialisers by BigGAN-PyTorch's names (``--G_init``/``--D_init``): orthogonal
# (BigGAN's default), N(0, 0.02) (Choi et al.'s CelebA runs), Glorot uniform (SNGAN's Chainer
# code). Biases start at 0.
INITS = {"ortho": nn.initializers.orthogonal(), "N02": nn.initializers.normal(0.02),
         "xavier": nn.initializers.glorot_uniform()}


@dataclasses.dataclass(frozen=True)
class _Layers:
  """Layer factories sharing the dtype and initialiser."""

  dtype: Any
  weight_init: str

  def conv(self, features: int, size: int, name: str, use_bias: bool = True) -> nn.Conv:
    return nn.Conv(features, (size, size), padding="SAME", use_bias=use_bias,
                   kernel_init=INITS[self.weight_init], dtype=self.dtype, name=name)

  def dense(self, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=INITS[self.weight_init], dtype=self.dtype, name=name)


class ConditionalBatchNorm(nn.Module):
  """Batch norm whose gain and bias are per class (none: the usual learned affine).

  Attributes:
    num_classes: 0 for plain batch norm.
    dtype: computation dtype.
    momentum: of the running statistics (0: a training-mode call stores its batch's).
  """

  num_classes: int = 0
  dtype: Any = jnp.float32
  momentum: float = _BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array | None, train: bool) -> jax.Array:
    affine = not self.num_classes
    x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                     epsilon=_BN_EPSILON, use_scale=affine, use_bias=affine,
                     dtype=self.dtype, name="bn")(x)
    if affine:
      return x
    # Per-class tables, not ``nn.Embed``: spectral normalisation leaves them alone, as
    # BigGAN does ("applying SN to G's embedding seems to randomly cripple G").
    c = x.shape[-1]
    gain = self.param("gain", nn.initializers.ones, (self.num_classes, c))
    bias = self.param("bias", nn.initializers.zeros, (self.num_classes, c))
    return (x * gain[labels][:, None, None, :].astype(x.dtype)
            + bias[labels][:, None, None, :].astype(x.dtype))


class SelfAttention(nn.Module):
  """SAGAN self-attention as in BigGAN-PyTorch: theta, phi (ch/8) and g (ch/2) 1x1 convs,
  phi and g max-pooled 2x2, an output 1x1 conv, and a gate gamma that starts at 0."""

  weight_init: str = "ortho"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    layers = _Layers(self.dtype, self.weight_init)
    pool = lambda t: nn.max_pool(t, (2, 2), (2, 2))
    theta = layers.conv(max(1, c // 8), 1, "theta", use_bias=False)(x).reshape(b, h * w, -1)
    phi = pool(layers.conv(max(1, c // 8), 1, "phi", use_bias=False)(x)).reshape(
        b, h * w // 4, -1)
    g = pool(layers.conv(max(1, c // 2), 1, "g", use_bias=False)(x)).reshape(b, h * w // 4, -1)
    attn = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", theta, phi).astype(jnp.float32), axis=-1)
    o = jnp.einsum("bqk,bkc->bqc", attn.astype(g.dtype), g).reshape(b, h, w, -1)
    o = layers.conv(c, 1, "o", use_bias=False)(o)
    gamma = self.param("gamma", nn.initializers.zeros, ())
    return x + gamma.astype(x.dtype) * o


class GBlock(nn.Module):
  """The generator's residual upsampling block (see the module docstring)."""

  features: int
  num_classes: int = 0
  weight_init: str = "ortho"
  dtype: Any = jnp.float32
  bn_momentum: float = _BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array | None, train: bool) -> jax.Array:
    layers = _Layers(self.dtype, self.weight_init)
    up = lambda t: jnp.repeat(jnp.repeat(t, 2, axis=1), 2, axis=2)
    bn = functools.partial(ConditionalBatchNorm, self.num_classes, self.dtype,
                           momentum=self.bn_momentum)
    h = nn.relu(bn(name="bn_0")(x, labels, train))
    h = layers.conv(self.features, 3, "conv_0", use_bias=False)(up(h))
    h = nn.relu(bn(name="bn_1")(h, labels, train))
    h = layers.conv(self.features, 3, "conv_1", use_bias=False)(h)
    return h + layers.conv(self.features, 1, "shortcut", use_bias=False)(up(x))


class DBlock(nn.Module):
  """The discriminator's residual block; ``first``: no leading ReLU, shortcut pooled first."""

  features: int
  down: bool = True
  first: bool = False
  weight_init: str = "ortho"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    layers = _Layers(self.dtype, self.weight_init)
    pool = (lambda t: nn.avg_pool(t, (2, 2), (2, 2))) if self.down else (lambda t: t)
    h = x if self.first else nn.relu(x)
    h = layers.conv(self.features, 3, "conv_0")(h)
    h = layers.conv(self.features, 3, "conv_1")(nn.relu(h))
    h = pool(h)
    learnable = self.down or x.shape[-1] != self.features
    if not learnable:
      return h + x
    if self.first:
      return h + layers.conv(self.features, 1, "shortcut")(pool(x))
    return h + pool(layers.conv(self.features, 1, "shortcut")(x))


def check_shape(image_shape: tuple[int, int, int], attention: int) -> dict[str, Any]:
  """The ``ARCHS`` entry for ``image_shape``.

  Raises:
    ConfigError: for an unsupported side, or an ``attention`` side no generator block has.
  """
  h, w, _ = image_shape
  if h != w or h not in ARCHS:
    raise ConfigError(f"The ResNet GAN supports square images of side "
                      f"{' or '.join(map(str, ARCHS))}, got {image_shape}; pad or resize "
                      f"the data (e.g. mnist_5k's data.options.pad_to=32).")
  arch = ARCHS[h]
  g_sides = [4 * 2 ** (i + 1) for i in range(len(arch["g_out"]))]
  if attention and attention not in g_sides:
    raise ConfigError(f"model.attention={attention}: the ResNet GAN at {h}x{h} has blocks "
                      f"of side {', '.join(map(str, g_sides))} (0 for no attention).")
  return arch


class Generator(nn.Module):
  """z (and labels, when conditional) -> images in [-1, 1].

  Attributes:
    image_shape: (H, W, C), H = W in ``ARCHS``.
    latent_dim: size of z.
    ch: base channel count (the block channels are multiples of it).
    num_classes: > 0 conditions every block's batch norm on the label.
    attention: side of the block after which a self-attention block runs (0: none).
    weight_init: the weight initialiser, a name in ``INITS``.
    dtype: computation dtype (parameters stay float32).
    bn_momentum: of the batch norms' running statistics (0 for standing statistics:
      ``fairgen.objectives.gan``).
  """

  image_shape: tuple[int, int, int]
  latent_dim: int = 128
  ch: int = 64
  num_classes: int = 0
  attention: int = 0
  weight_init: str = "ortho"
  dtype: Any = jnp.float32
  bn_momentum: float = _BN_MOMENTUM

  @nn.compact
  def __call__(self, z: jax.Array, labels: jax.Array | None = None,
               train: bool = True) -> jax.Array:
    arch = check_shape(self.image_shape, self.attention)
    if self.num_classes and labels is None:
      raise ValueError("A conditional generator needs labels.")
    layers = _Layers(self.dtype, self.weight_init)
    x = layers.dense(4 * 4 * self.ch * arch["g_in"], "linear")(z.astype(self.dtype))
    x = x.reshape(z.shape[0], 4, 4, self.ch * arch["g_in"])
    for i, mult in enumerate(arch["g_out"]):
      x = GBlock(self.ch * mult, self.num_classes, self.weight_init, self.dtype,
                 self.bn_momentum, name=f"block_{i}")(x, labels, train)
      if self.attention == x.shape[1]:
        x = SelfAttention(self.weight_init, self.dtype, name="attention")(x)
    x = nn.relu(ConditionalBatchNorm(0, self.dtype, self.bn_momentum, name="bn_out")(
        x, None, train))
    x = layers.conv(self.image_shape[-1], 3, "conv_out")(x)
    return jnp.tanh(x).astype(jnp.float32)


class Discriminator(nn.Module):
  """Images (and labels, when conditional) -> one logit per example.

  Attributes:
    ch: base channel count.
    num_classes: > 0 adds the projection term ``<embed(y), h>``.
    attention: side of the block input at which a self-attention block runs (0: none).
    weight_init: the weight initialiser, a name in ``INITS``.
    dtype: computation dtype (parameters stay float32).
  """

  ch: int = 64
  num_classes: int = 0
  attention: int = 0
  weight_init: str = "ortho"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array | None = None,
               train: bool = True) -> jax.Array:
    del train  # No dropout or batch statistics in D.
    arch = check_shape(x.shape[1:], 0)
    layers = _Layers(self.dtype, self.weight_init)
    h = x.astype(self.dtype)
    for i, (mult, down) in enumerate(zip(arch["d_out"], arch["d_down"])):
      if self.attention and self.attention == h.shape[1] and i > 0:
        h = SelfAttention(self.weight_init, self.dtype, name="attention")(h)
      h = DBlock(self.ch * mult, down, i == 0, self.weight_init, self.dtype,
                 name=f"block_{i}")(h)
    h = jnp.sum(nn.relu(h), axis=(1, 2))
    logit = layers.dense(1, "linear")(h)[:, 0]
    if self.num_classes:
      if labels is None:
        raise ValueError("A conditional discriminator needs labels.")
      embed = nn.Embed(self.num_classes, h.shape[-1], embedding_init=INITS[self.weight_init],
                       name="projection")(labels)
      logit = logit + jnp.sum(embed.astype(h.dtype) * h, axis=-1)
    return logit.astype(jnp.float32)


@MODELS.register("resnet_gan")
def build_resnet_gan(spec: DataSpec, latent_dim: int = 128, g_ch: int = 64, d_ch: int = 64,
                     attention: int = 0, conditional: bool = False,
                     condition_key: str = "label", weight_init: str = "ortho",
                     dtype: str = "float32") -> GanModules:
  """The SNGAN/BigGAN ResNet pair for 32x32 or 64x64 images.

  ``g_ch``/``d_ch``: base channels (SNGAN at 32x32: 64 and 32; BigGAN at 64x64: 64 and
  64); ``attention``: the side at which a self-attention block runs in G and D (0: none);
  ``conditional``: conditional batch norm in G and a projection D on
  ``batch[condition_key]``; ``weight_init``: 'ortho' (BigGAN), 'N02' (Choi et al.) or
  'xavier' (SNGAN).
  """
  num_classes = num_conditions(spec, conditional, condition_key)
  check_shape(tuple(spec.image_shape), attention)
  require(weight_init in INITS, f"model.weight_init must be one of "
          f"{', '.join(INITS)}, got {weight_init!r}.")
  dt = jnp.dtype(dtype)
  return GanModules(
      generator=Generator(tuple(spec.image_shape), latent_dim, g_ch, num_classes,
                          attention, weight_init, dt),
      discriminator=Discriminator(d_ch, num_classes, attention, weight_init, dt),
      latent_dim=latent_dim, num_classes=num_classes, condition_key=condition_key)
