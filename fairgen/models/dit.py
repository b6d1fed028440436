"""DiT, the Diffusion Transformer of Peebles & Xie (ICCV 2023), in Flax Linen
(``facebookresearch/DiT/models.py``).

A denoising network ``(x, t, labels) -> [B, H, W, C]`` like the U-Net, so it serves every
diffusion and flow objective:

- *patchify*: a ``patch x patch`` strided convolution to ``hidden`` wide tokens, plus fixed
  2-D sine-cosine position embeddings (MAE's);
- the conditioning vector ``c``: a sinusoidal embedding of the noise input (256 frequencies)
  through a two-layer SiLU MLP, plus a learned class embedding (one extra row, "no label",
  for classifier-free guidance);
- ``depth`` blocks of LayerNorm (no affine), multi-head self-attention and a GELU MLP,
  each branch modulated by *adaLN-Zero*: a linear map of ``SiLU(c)`` gives the shift, scale
  and gate of both branches, initialised at zero, so every block starts as the identity
  and the untrained network's residual stream passes through unchanged;
- a final adaLN-modulated LayerNorm and a zero-initialised linear map to ``patch^2 C``
  values per token, unpatchified to the image.

``SIZES`` holds the paper's S, B, L and XL (Table 1); ``learn_sigma`` doubles the output
channels as in the paper's models (fairgen's objectives predict the mean only). DiT-XL/2 on
ImageNet's 32x32x4 latents with 1,000 classes has 675M parameters (the official code
counts 675,129,632, its frozen position table included).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fairgen.config import ConfigError, require
from fairgen.data.base import DataSpec
from fairgen.models.registry import MODELS, num_conditions

# name -> (hidden size, depth, heads): Peebles & Xie, Table 1.
SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """DiT's sinusoidal embedding ``[cos(t w_k), sin(t w_k)]``, ``w_k = max_period^(-k/half)``."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_position_table(dim: int, grid: tuple[int, int]) -> np.ndarray:
  """MAE's fixed 2-D sine-cosine position embeddings, ``[grid_h * grid_w, dim]``: half the
  channels encode the column, half the row (``get_2d_sincos_pos_embed``)."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  w, h = np.meshgrid(np.arange(grid[1], dtype=np.float64), np.arange(grid[0], dtype=np.float64))
  return np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1).astype(np.float32)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN: ``x (1 + scale) + shift`` per example, broadcast over the tokens."""
  return x * (1.0 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
  """Attention and MLP branches, each gated and modulated by adaLN-Zero."""

  hidden: int
  heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    dt = self.dtype
    mod = nn.Dense(6 * self.hidden, dtype=dt, kernel_init=nn.initializers.zeros,
                   name="adaLN_modulation")(nn.silu(c))
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
    norm = lambda: nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dt)
    h = modulate(norm()(x), shift_a, scale_a)
    h = nn.MultiHeadDotProductAttention(self.heads, dtype=dt, name="attn")(h, h)
    x = x + gate_a[:, None] * h
    h = modulate(norm()(x), shift_m, scale_m)
    h = nn.Dense(int(self.hidden * self.mlp_ratio), dtype=dt, name="fc1")(h)
    h = nn.Dense(self.hidden, dtype=dt, name="fc2")(nn.gelu(h, approximate=True))
    return x + gate_m[:, None] * h


class DiT(nn.Module):
  """The Diffusion Transformer (see the module docstring).

  Attributes:
    out_channels: the output's channels (the image's; twice that with learn_sigma).
    patch: the side of a patch (the paper's 2, 4 or 8); the image's sides must divide.
    hidden: the token width.
    depth: the number of DiT blocks.
    heads: attention heads.
    mlp_ratio: the MLP's width over ``hidden``.
    num_classes: > 0: conditional on labels in ``[0, num_classes)``; label ``num_classes``
      means "unconditional" (classifier-free guidance).
    condition_key: the batch column its labels come from ('label' or 'attr').
    dtype: the computation dtype (outputs are float32).
  """

  out_channels: int
  patch: int = 2
  hidden: int = 384
  depth: int = 12
  heads: int = 6
  mlp_ratio: float = 4.0
  num_classes: int = 0
  condition_key: str = "label"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """The network's output for ``x`` (``[B, H, W, C]``) at noise inputs ``t`` (``[B]``)."""
    dt, p = self.dtype, self.patch
    b, height, width, _ = x.shape
    grid = (height // p, width // p)
    h = nn.Conv(self.hidden, (p, p), strides=(p, p), padding="VALID", dtype=dt,
                name="x_embedder")(x.astype(dt))
    h = h.reshape(b, grid[0] * grid[1], self.hidden)
    h = h + jnp.asarray(sincos_position_table(self.hidden, grid), dt)[None]
    c = timestep_embedding(t, 256)
    c = nn.Dense(self.hidden, dtype=dt, name="t_embedder_0")(c)
    c = nn.Dense(self.hidden, dtype=dt, name="t_embedder_2")(nn.silu(c))
    if self.num_classes:
      if labels is None:
        raise ValueError(f"This conditional DiT needs labels in [0, {self.num_classes}].")
      c = c + nn.Embed(self.num_classes + 1, self.hidden, dtype=dt, name="y_embedder")(labels)
    for i in range(self.depth):
      h = DiTBlock(self.hidden, self.heads, self.mlp_ratio, dt, name=f"block_{i}")(h, c)
    shift, scale = jnp.split(nn.Dense(2 * self.hidden, dtype=dt, name="final_modulation",
                                      kernel_init=nn.initializers.zeros)(nn.silu(c)), 2, -1)
    h = modulate(nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dt)(h),
                 shift, scale)
    h = nn.Dense(p * p * self.out_channels, dtype=dt, kernel_init=nn.initializers.zeros,
                 name="final_linear")(h)
    h = h.reshape(b, grid[0], grid[1], p, p, self.out_channels)
    h = h.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, self.out_channels)
    return h.astype(jnp.float32)


@MODELS.register("dit")
def build_dit(spec: DataSpec, size: str = "", patch: int = 2, hidden: int = 384,
              depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0,
              learn_sigma: bool = False, conditional: bool = False,
              condition_key: str = "label", dtype: str = "float32") -> DiT:
  """A DiT: ``size`` one of S, B, L, XL (the paper's widths, depths and heads; it overrides
  ``hidden``, ``depth`` and ``heads``), or those three given (the defaults: DiT-S/2);
  ``patch`` must divide the image's sides; ``conditional``: on ``batch[condition_key]``
  with classifier-free guidance; ``learn_sigma`` doubles the output channels (the
  paper's models; for counting)."""
  require(size in ("",) + tuple(SIZES), f"model.size must be one of {', '.join(SIZES)} "
          f"(or '' for hidden/depth/heads), got {size!r}.")
  if size:
    hidden, depth, heads = SIZES[size]
  for key, value in (("patch", patch), ("hidden", hidden), ("depth", depth), ("heads", heads)):
    require(isinstance(value, int) and value >= 1,
            f"model.{key} must be a positive integer, got {value!r}.")
  require(hidden % heads == 0 and hidden % 4 == 0, f"model.hidden ({hidden}) must be a "
          f"multiple of 4 and of model.heads ({heads}).")
  h, w, channels = spec.image_shape
  if h % patch or w % patch:
    raise ConfigError(f"model.patch={patch} must divide the image's sides ({h}x{w}).")
  require(mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {mlp_ratio}.")
  num_classes = num_conditions(spec, conditional, condition_key)
  return DiT(out_channels=channels * (2 if learn_sigma else 1), patch=patch, hidden=hidden,
             depth=depth, heads=heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
             condition_key=condition_key, dtype=jnp.dtype(dtype))
