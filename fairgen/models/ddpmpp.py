"""DDPM++, the U-Net of Song et al. 2021 ("Score-Based Generative Modeling through SDEs") as
Karras et al. 2022 (EDM) train it on CIFAR-10, in Flax Linen.

A denoising network ``(x, c_noise[, y]) -> [B, H, W, C]`` (EDM's ``F``):

- the noise input's positional embedding (``ch`` wide, frequencies ``10000^(-k / (ch/2 -
  1))``, sine first), through two SiLU layers to ``4 ch``; a class label enters as a
  one-hot vector times ``sqrt(num_classes)`` through a linear map added to the embedding
  ("no label" is the zero vector, for classifier-free guidance);
- residual blocks of group norm (eps 1e-6), SiLU, 3x3 convolution, the embedding added
  (no adaptive scale), group norm, SiLU, dropout, 3x3 convolution, a 1x1 projection of the
  skip when channels or resolution change, and the sum scaled by ``sqrt(1/2)``;
  single-head self-attention after the blocks at ``attn_resolutions`` (its sum scaled
  too); resolution changes are residual blocks of their own, down by 2x2 averaging and up
  by nearest neighbours (the [1, 1] filter), applied before both convolution paths;
- an encoder of a 3x3 input convolution and ``num_blocks`` blocks per resolution, a
  middle of an attention block and a block, a decoder of ``num_blocks + 1`` blocks per
  resolution taking every encoder output as a skip, and group norm, SiLU and a 3x3
  convolution to the image's channels.

With ``ch=128, ch_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,)`` at 32x32x3 this is
EDM's CIFAR-10 network: 55.73M parameters (the paper's Table 7; tested).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fairgen.config import ConfigError, require
from fairgen.data.base import DataSpec
from fairgen.models.registry import MODELS, num_conditions, positive_ints

_SKIP_SCALE = math.sqrt(0.5)


def positional_embedding(x: jax.Array, channels: int, max_positions: float = 10000.0
                         ) -> jax.Array:
  """``[sin(x w_k), cos(x w_k)]`` with ``w_k = max_positions^(-k / (channels/2 - 1))``."""
  half = channels // 2
  freqs = (1.0 / max_positions) ** (jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = x.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def _norm(x: jax.Array, dtype: Any) -> jax.Array:
  """Group norm: 32 groups, at least 4 channels each, eps 1e-6."""
  return nn.GroupNorm(num_groups=min(32, x.shape[-1] // 4), epsilon=1e-6, dtype=dtype)(x)


def _resample(x: jax.Array, up: bool, down: bool) -> jax.Array:
  """The [1, 1] filter's resampling: nearest-neighbour 2x up, or 2x2 average down."""
  if up:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  if down:
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  return x


class Block(nn.Module):
  """A DDPM++ residual block, optionally resampling, optionally with attention."""

  out_ch: int
  up: bool = False
  down: bool = False
  attention: bool = False
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    dt, small = self.dtype, nn.initializers.variance_scaling(1e-10, "fan_avg", "uniform")
    h = _resample(nn.silu(_norm(x, dt)), self.up, self.down)
    h = nn.Conv(self.out_ch, (3, 3), dtype=dt, name="conv0")(h)
    h = h + nn.Dense(self.out_ch, dtype=dt, name="affine")(emb)[:, None, None, :]
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(_norm(h, dt)))
    h = nn.Conv(self.out_ch, (3, 3), dtype=dt, kernel_init=small, name="conv1")(h)
    skip = x
    if self.out_ch != x.shape[-1] or self.up or self.down:
      skip = nn.Conv(self.out_ch, (1, 1), dtype=dt, name="skip")(
          _resample(x, self.up, self.down))
    x = (h + skip) * _SKIP_SCALE
    if not self.attention:
      return x
    b, height, width, c = x.shape
    qkv = nn.Conv(3 * c, (1, 1), dtype=dt, name="qkv")(_norm(x, dt)).reshape(
        b, height * width, 3, c)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) / math.sqrt(c)
    a = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1).astype(dt), v)
    a = nn.Conv(c, (1, 1), dtype=dt, kernel_init=small, name="proj")(
        a.reshape(b, height, width, c))
    return (a + x) * _SKIP_SCALE


class DDPMpp(nn.Module):
  """DDPM++ (see the module docstring). Attributes as ``fairgen.models.unet.UNet``'s, with
  ``num_blocks`` the residual blocks per resolution."""

  out_channels: int
  ch: int = 128
  ch_mult: Sequence[int] = (2, 2, 2)
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.13
  num_classes: int = 0
  condition_key: str = "label"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """``F(x, c_noise)`` for ``x`` ``[B, H, W, C]`` and noise inputs ``t`` ``[B]``."""
    dt = self.dtype
    emb = positional_embedding(t, self.ch).astype(dt)
    if self.num_classes:
      if labels is None:
        raise ValueError(f"This conditional DDPM++ needs labels in [0, {self.num_classes}].")
      onehot = jax.nn.one_hot(labels, self.num_classes, dtype=dt)  # "No label": zeros.
      emb = emb + nn.Dense(self.ch, dtype=dt, name="map_label")(
          onehot * math.sqrt(self.num_classes))
    emb = nn.silu(nn.Dense(4 * self.ch, dtype=dt, name="map_layer0")(emb))
    emb = nn.silu(nn.Dense(4 * self.ch, dtype=dt, name="map_layer1")(emb))
    block = lambda out, **kw: Block(out, dropout=self.dropout, dtype=dt, **kw)
    h = nn.Conv(self.ch, (3, 3), dtype=dt, name="enc_conv")(x.astype(dt))
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      if level:
        h = block(h.shape[-1], down=True)(h, emb, train)
        skips.append(h)
      for _ in range(self.num_blocks):
        h = block(self.ch * mult, attention=h.shape[1] in self.attn_resolutions)(h, emb, train)
        skips.append(h)
    for level, mult in reversed(list(enumerate(self.ch_mult))):
      if level == len(self.ch_mult) - 1:
        h = block(h.shape[-1], attention=True)(h, emb, train)
        h = block(h.shape[-1])(h, emb, train)
      else:
        h = block(h.shape[-1], up=True)(h, emb, train)
      for idx in range(self.num_blocks + 1):
        attention = idx == self.num_blocks and h.shape[1] in self.attn_resolutions
        h = block(self.ch * mult, attention=attention)(
            jnp.concatenate([h, skips.pop()], axis=-1), emb, train)
    small = nn.initializers.variance_scaling(1e-10, "fan_avg", "uniform")
    h = nn.Conv(self.out_channels, (3, 3), dtype=dt, kernel_init=small, name="out_conv")(
        nn.silu(_norm(h, dt)))
    return h.astype(jnp.float32)


@MODELS.register("ddpmpp")
def build_ddpmpp(spec: DataSpec, ch: int = 128, ch_mult: tuple[int, ...] = (2, 2, 2),
                 num_blocks: int = 4, attn_resolutions: tuple[int, ...] = (16,),
                 dropout: float = 0.13, conditional: bool = False,
                 condition_key: str = "label", dtype: str = "float32") -> DDPMpp:
  """DDPM++: ``ch`` base channels times ``ch_mult`` per resolution, ``num_blocks`` blocks
  each, attention at the sides in ``attn_resolutions``; the defaults are EDM's CIFAR-10
  network. The image's sides must halve ``len(ch_mult) - 1`` times."""
  require(isinstance(ch, int) and ch >= 4 and ch % 4 == 0,
          f"model.ch must be a positive multiple of 4, got {ch!r}.")
  mults = positive_ints(ch_mult, "model.ch_mult")
  require(isinstance(num_blocks, int) and num_blocks >= 1,
          f"model.num_blocks must be a positive integer, got {num_blocks!r}.")
  side = spec.image_shape[0]
  if spec.image_shape[0] != spec.image_shape[1] or side % 2 ** (len(mults) - 1):
    raise ConfigError(f"DDPM++ halves the image's sides {len(mults) - 1} times: it needs "
                      f"square images with sides divisible by {2 ** (len(mults) - 1)}, got "
                      f"{spec.image_shape[0]}x{spec.image_shape[1]}.")
  attn = positive_ints(attn_resolutions, "model.attn_resolutions", allow_empty=True)
  sides = [side // 2 ** level for level in range(len(mults))]
  missing = sorted(set(attn) - set(sides))
  require(not missing, f"model.attn_resolutions {missing} are not sides DDPM++ runs at "
          f"({', '.join(map(str, sides))}).")
  return DDPMpp(out_channels=spec.image_shape[-1], ch=ch, ch_mult=mults,
                num_blocks=num_blocks, attn_resolutions=attn, dropout=dropout,
                num_classes=num_conditions(spec, conditional, condition_key),
                condition_key=condition_key, dtype=jnp.dtype(dtype))
