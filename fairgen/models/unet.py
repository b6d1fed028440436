"""The DDPM U-Net of Ho et al. 2020 (``diffusion_tf/models/unet.py``), in Flax Linen.

A noise-prediction network ``(x_t, t[, y]) -> [B, H, W, C]``:

- a sinusoidal embedding of the timestep (Transformer-style, ``ch`` wide) through a two-layer
  MLP to ``4 * ch``;
- ``len(ch_mult)`` resolutions of ``num_res_blocks`` residual blocks (group norm, swish,
  3x3 convolutions, the time embedding added between them, dropout before the second), with
  self-attention after each block at the sides in ``attn_resolutions``, and a strided 3x3
  convolution between resolutions;
- a middle of block, attention, block; an upsampling path mirroring it with one more block
  per resolution, each taking the matching skip connection; nearest-neighbour upsampling
  and a 3x3 convolution between resolutions;
- group norm, swish and a 3x3 convolution to the image's channels.

With ``ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,)`` at 32x32x3
this is the paper's CIFAR-10 network: 35.7M parameters. Odd sides (7 from 28) downsample
with 'SAME' padding and the upsampling path crops back to the skip's side, so 28x28 MNIST
runs at 28, 14 and 7.

Conditioning (``num_classes`` > 0): a learned class embedding, added to the time embedding,
with one extra row, ``num_classes``, for "no label": classifier-free guidance (Ho &
Salimans 2021) trains with labels dropped to it and samples with both.
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


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embeddings ``[sin(t w_k), cos(t w_k)]`` of integer timesteps, ``[B, dim]``.

  ``w_k = max_period^(-k / (dim/2 - 1))`` as in Ho et al.'s ``get_timestep_embedding``.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class _GroupNorm(nn.Module):
  """Group norm with 32 groups (Ho et al.), fewer for narrow layers: at least 4 channels a
  group, because a one-channel group (instance norm) would subtract the time embedding,
  which the residual blocks add as a per-channel constant."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    groups = math.gcd(32, max(1, c // 4))
    return nn.GroupNorm(num_groups=groups, dtype=self.dtype)(x)


class ResBlock(nn.Module):
  """Pre-activation residual block with the time embedding added in the middle."""

  out_ch: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    h = nn.swish(_GroupNorm(self.dtype)(x))
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype)(h)
    h = h + nn.Dense(self.out_ch, dtype=self.dtype)(nn.swish(emb))[:, None, None, :]
    h = nn.swish(_GroupNorm(self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    # Ho et al. initialise the last convolution at zero: each block starts as the identity.
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros)(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Dense(self.out_ch, dtype=self.dtype)(x)  # 'nin': a 1x1 projection.
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the H*W positions, residual (Ho et al.'s attn_block)."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = _GroupNorm(self.dtype)(x).reshape(b, h * w, c)
    q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(y) for n in ("q", "k", "v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) / math.sqrt(c)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    y = jnp.einsum("bqk,bkc->bqc", weights, v)
    y = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj_out")(y)
    return x + y.reshape(b, h, w, c)


class UNet(nn.Module):
  """The DDPM noise-prediction U-Net (see the module docstring).

  Attributes:
    out_channels: the output's channels (the image's).
    ch: base channels.
    ch_mult: channel multipliers, one per resolution.
    num_res_blocks: residual blocks per resolution (the upsampling path has one more).
    attn_resolutions: the sides at which self-attention runs.
    dropout: dropout rate inside the residual blocks (training only).
    num_classes: > 0: conditional on labels in ``[0, num_classes)``; label ``num_classes``
      means "unconditional" (classifier-free guidance).
    condition_key: the batch column its labels come from ('label' or 'attr').
    dtype: the computation dtype (outputs are float32).
  """

  out_channels: int
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  num_classes: int = 0
  condition_key: str = "label"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """Predicts the network's target (noise, or v) for ``x`` at integer timesteps ``t``.

    Args:
      x: ``[B, H, W, C]`` noisy images.
      t: ``[B]`` integer timesteps.
      labels: ``[B]`` labels in ``[0, num_classes]`` for a conditional network.
      train: enables dropout (needs the 'dropout' RNG stream).
    """
    dt = self.dtype
    emb = timestep_embedding(t, self.ch)
    emb = nn.Dense(4 * self.ch, dtype=dt)(emb)
    emb = nn.Dense(4 * self.ch, dtype=dt)(nn.swish(emb))
    if self.num_classes:
      if labels is None:
        raise ValueError(f"This conditional U-Net needs labels in [0, {self.num_classes}].")
      emb = emb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=dt)(labels)
    h = nn.Conv(self.ch, (3, 3), dtype=dt)(x.astype(dt))
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = ResBlock(self.ch * mult, self.dropout, dt)(h, emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(dt)(h)
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=dt)(h)
        skips.append(h)
    h = ResBlock(h.shape[-1], self.dropout, dt)(h, emb, train)
    h = AttnBlock(dt)(h)
    h = ResBlock(h.shape[-1], self.dropout, dt)(h, emb, train)
    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        skip = skips.pop()
        h = ResBlock(self.ch * mult, self.dropout, dt)(
            jnp.concatenate([h, skip], axis=-1), emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(dt)(h)
      if level != 0:
        side = skips[-1].shape[1:3]  # Crop back odd sides (14 -> 7 -> 14, not 8 -> 16).
        h = jax.image.resize(h, (h.shape[0], 2 * h.shape[1], 2 * h.shape[2], h.shape[3]),
                             "nearest")[:, :side[0], :side[1]]
        h = nn.Conv(h.shape[-1], (3, 3), dtype=dt)(h)
    h = nn.swish(_GroupNorm(dt)(h))
    h = nn.Conv(self.out_channels, (3, 3), dtype=dt, kernel_init=nn.initializers.zeros)(h)
    return h.astype(jnp.float32)


def check_shape(image_shape: tuple[int, int, int], ch_mult: Sequence[int],
                attn_resolutions: Sequence[int]) -> list[int]:
  """The sides the U-Net runs at for ``image_shape``; raises ValueError for a side that the
  downsampling path cannot take or an attention side it never reaches."""
  h, w, _ = image_shape
  if h != w:
    raise ValueError(f"The U-Net needs square images, got {h}x{w}.")
  sides = [h]
  for _ in ch_mult[1:]:
    sides.append(-(-sides[-1] // 2))
  if sides[-1] < 2:
    raise ValueError(f"{len(ch_mult)} resolutions reduce a side of {h} to {sides[-1]}; use "
                     f"fewer entries in model.ch_mult.")
  missing = sorted(set(attn_resolutions) - set(sides))
  if missing:
    raise ValueError(f"model.attn_resolutions {missing} are not sides the U-Net runs at "
                     f"({', '.join(map(str, sides))}).")
  return sides


@MODELS.register("unet")
def build_unet(spec: DataSpec, ch: int = 64, ch_mult: tuple[int, ...] = (1, 2, 2),
               num_res_blocks: int = 2, attn_resolutions: tuple[int, ...] = (14, 7),
               dropout: float = 0.1, conditional: bool = False, condition_key: str = "label",
               dtype: str = "float32") -> UNet:
  """The DDPM U-Net: ``ch`` base channels times ``ch_mult`` per resolution,
  ``num_res_blocks`` residual blocks each, self-attention at the sides in
  ``attn_resolutions``; ``conditional``: on ``batch[condition_key]`` with classifier-free
  guidance. Ho et al.'s CIFAR-10 net: ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
  attn_resolutions=(16,)."""
  num_classes = num_conditions(spec, conditional, condition_key)
  require(isinstance(ch, int) and ch >= 1, f"model.ch must be a positive integer, got {ch!r}.")
  mults = positive_ints(ch_mult, "model.ch_mult")
  require(isinstance(num_res_blocks, int) and num_res_blocks >= 1,
          f"model.num_res_blocks must be a positive integer, got {num_res_blocks!r}.")
  attn = positive_ints(attn_resolutions, "model.attn_resolutions", allow_empty=True)
  try:
    check_shape(tuple(spec.image_shape), mults, attn)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return UNet(out_channels=spec.image_shape[-1], ch=ch, ch_mult=mults,
              num_res_blocks=num_res_blocks, attn_resolutions=attn, dropout=dropout,
              num_classes=num_classes, condition_key=condition_key,
              dtype=jnp.dtype(dtype))
