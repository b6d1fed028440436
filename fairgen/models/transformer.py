"""A decoder-only (GPT-style) transformer over the pixels of an image, in raster order.

The image in [-1, 1] is quantised to ``levels`` values per pixel: ``levels=2`` binarises
it as ``pixel > 0``, exactly as the VAE's Bernoulli likelihood does
(``fairgen/models/vae.py``), so the two NLLs are of the same discrete data; ``levels=256``
models 8-bit pixels. The ``H*W*C`` tokens run in raster order (row, column, channel), and
the model gives ``p(x_i | x_<i)`` for every ``i`` in one causal pass: its input is the
token sequence shifted right behind a learned start token (for a conditional model, the
class or group embedding, so ``p(x | y)``).

Blocks are pre-LayerNorm (GPT-2): ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``, with a final
LayerNorm before the logits. Positions are learned or sinusoidal. Attention is full and
causal, or local (``window`` > 0: each position attends to its own block of ``window``
positions and the block before, Parmar et al. 2018), which a CPU trains several times
faster on 784-pixel sequences; the NLL is exact either way.

Sampling runs one token per step with an explicit key/value cache: ``init_cache`` makes
zeros of shape ``[B, D, heads, head_dim]`` per layer, and ``decode_step`` writes position
``i``'s keys and values into it and attends to positions ``<= i`` only. The cache is a plain
pytree carried through ``jax.lax.scan``, so a whole sample is one jitted loop.
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

POSITIONAL = ("learned", "sinusoidal")
# A layer's cache: keys and values, each [B, D, heads, head_dim].
LayerCache = tuple[jax.Array, jax.Array]


def quantise(images: jax.Array, levels: int) -> jax.Array:
  """Images in [-1, 1] -> int32 levels in ``[0, levels)``; 2 levels: ``pixel > 0``."""
  if levels == 2:
    return (images > 0).astype(jnp.int32)
  scaled = jnp.round((images + 1.0) * 0.5 * (levels - 1))
  return jnp.clip(scaled, 0, levels - 1).astype(jnp.int32)


def dequantise(tokens: jax.Array, levels: int) -> jax.Array:
  """Levels in ``[0, levels)`` -> values in [-1, 1]: level k is ``-1 + 2k / (levels - 1)``."""
  return -1.0 + 2.0 * tokens.astype(jnp.float32) / (levels - 1)


def sinusoidal_table(length: int, dim: int) -> np.ndarray:
  """The Transformer's fixed positional encodings, ``[length, dim]`` (sin and cos halves)."""
  half = dim // 2
  freqs = np.exp(-math.log(10000.0) * np.arange(half) / max(1, half))
  angles = np.arange(length)[:, None] * freqs[None, :]
  table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  return np.pad(table, ((0, 0), (0, dim - 2 * half))).astype(np.float32)


def attention_mask(queries: jax.Array, keys: jax.Array, window: int) -> jax.Array:
  """Which keys each query may attend to, by position: causal (``key <= query``) and, with
  ``window`` > 0, local: the key in the query's block of ``window`` positions or the one
  before (Parmar et al. 2018's local 1D attention)."""
  q, k = queries[:, None], keys[None, :]
  mask = k <= q
  if window:
    mask &= k // window >= q // window - 1
  return mask


class SelfAttention(nn.Module):
  """Multi-head causal self-attention, over a whole sequence or one cached step.

  ``window`` > 0 makes it local (``attention_mask``): a query attends to its own block of
  ``window`` positions and the block before, so a training pass costs ``O(T * window)``, not
  ``O(T^2)``.
  """

  num_heads: int
  window: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: LayerCache | None = None,
               index: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
    """``x``: ``[B, T, E]``. Without ``cache``: causal attention over the T positions.

    With ``cache`` (and T == 1): the step at position ``index``, whose keys and values are
    written into the cache; the query attends to the cached positions its mask allows.
    """
    embed = x.shape[-1]
    if embed % self.num_heads:
      raise ConfigError(f"embed_dim={embed} must be divisible by num_heads={self.num_heads}.")
    head_dim = embed // self.num_heads
    # No bias: a key bias shifts all of a query's logits alike (softmax ignores it), so its
    # gradient is rounding noise, which Adam would scale up to full-size steps.
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), use_bias=False, dtype=self.dtype,
                          name="qkv")(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # Each [B, T, heads, head_dim].
    if cache is not None:
      k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, index, 0, 0))
      cache = (k, v)
      mask = attention_mask(index[None], jnp.arange(k.shape[1]), self.window)
      out = _attend(q, k, v, mask[None, None])
    elif self.window:
      out = self._local(q, k, v)
    else:
      positions = jnp.arange(x.shape[1])
      out = _attend(q, k, v, attention_mask(positions, positions, 0)[None, None])
    out = nn.DenseGeneral(embed, axis=(-2, -1), dtype=self.dtype, name="out")(out)
    return out, cache

  def _local(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Local attention in blocks: each block's queries against it and the block before."""
    batch, length = q.shape[:2]
    b = self.window
    blocks = -(-length // b)
    pad = blocks * b - length  # Padding at the end: causality keeps it out of real rows.

    def split(t):
      t = jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0)))
      return t.reshape((batch, blocks, b) + t.shape[2:])

    q, k, v = split(q), split(k), split(v)
    shift = lambda t: jnp.pad(t, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :-1]
    k = jnp.concatenate([shift(k), k], axis=2)  # [B, blocks, 2b, heads, head_dim].
    v = jnp.concatenate([shift(v), v], axis=2)
    first = jnp.arange(blocks)[:, None, None] * b  # Each block's first position.
    offsets = jnp.arange(2 * b) - b
    mask = attention_mask(jnp.arange(b), offsets, 0)[None] & (first + offsets >= 0)
    out = _attend(q, k, v, mask[None, :, None], "bnqhd,bnkhd->bnhqk", "bnhqk,bnkhd->bnqhd")
    return out.reshape((batch, blocks * b) + out.shape[3:])[:, :length]


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
            qk: str = "bqhd,bkhd->bhqk", wv: str = "bhqk,bkhd->bqhd") -> jax.Array:
  """Softmax attention (in float32) of queries to keys where ``mask`` allows."""
  logits = jnp.einsum(qk, q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum(wv, weights, v)


class Block(nn.Module):
  """A pre-LayerNorm transformer block: attention, then a GELU MLP, each residual."""

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  window: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, cache: LayerCache | None = None,
               index: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
    h, cache = SelfAttention(self.num_heads, self.window, self.dtype, name="attn")(
        nn.LayerNorm(dtype=self.dtype, name="ln_attn")(x), cache, index)
    x = x + nn.Dropout(self.dropout)(h, deterministic=not train)
    h = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
    h = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(h))
    h = nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp_out")(h)
    return x + nn.Dropout(self.dropout)(h, deterministic=not train), cache


class PixelTransformer(nn.Module):
  """An autoregressive model of quantised images (see the module docstring).

  Attributes:
    image_shape: (H, W, C); the sequence has ``D = H*W*C`` tokens.
    levels: values per pixel (2: binarised; 256: 8-bit).
    num_layers: transformer blocks.
    num_heads: attention heads (``embed_dim`` must divide by it).
    embed_dim: the residual stream's width.
    mlp_dim: the MLP's hidden width.
    dropout: residual dropout rate in training.
    positional: 'learned' or 'sinusoidal' position encodings.
    window: 0 for full causal attention; > 0 for local attention in blocks of this many
      positions (each attends to its own block and the one before).
    num_classes: > 0: conditional on labels in ``[0, num_classes)`` (the start token).
    condition_key: the batch column its labels come from ('label' or 'attr').
    dtype: computation dtype (logits are float32).
  """

  image_shape: tuple[int, int, int]
  levels: int = 2
  num_layers: int = 4
  num_heads: int = 4
  embed_dim: int = 128
  mlp_dim: int = 512
  dropout: float = 0.0
  positional: str = "learned"
  window: int = 0
  num_classes: int = 0
  condition_key: str = "label"
  dtype: Any = jnp.float32

  @property
  def length(self) -> int:
    """The number of tokens of one image, ``H*W*C``."""
    return int(np.prod(self.image_shape))

  def setup(self):
    if self.positional not in POSITIONAL:
      raise ConfigError(f"positional must be one of {POSITIONAL}, got {self.positional!r}.")
    if self.levels < 2:
      raise ConfigError(f"levels must be >= 2, got {self.levels}.")
    init = nn.initializers.normal(0.02)
    self.token_embed = nn.Embed(self.levels, self.embed_dim, embedding_init=init)
    if self.num_classes:
      self.start = nn.Embed(self.num_classes, self.embed_dim, embedding_init=init)
    else:
      self.start = self.param("start", init, (self.embed_dim,))
    if self.positional == "learned":
      self.positions = self.param("positions", init, (self.length, self.embed_dim))
    else:
      self.positions = jnp.asarray(sinusoidal_table(self.length, self.embed_dim))
    self.blocks = [Block(self.num_heads, self.mlp_dim, self.dropout, self.window, self.dtype)
                   for _ in range(self.num_layers)]
    self.final_ln = nn.LayerNorm(dtype=self.dtype)
    self.head = nn.Dense(self.levels, dtype=self.dtype)
    self.embed_dropout = nn.Dropout(self.dropout)

  def _start(self, labels: jax.Array | None, batch: int) -> jax.Array:
    """The start token's embedding, ``[B, E]``: the label's for a conditional model."""
    if not self.num_classes:
      return jnp.broadcast_to(self.start, (batch, self.embed_dim))
    if labels is None:
      raise ValueError(f"This conditional model needs labels in [0, {self.num_classes}).")
    return self.start(jnp.broadcast_to(labels, (batch,)))

  def _logits(self, h: jax.Array) -> jax.Array:
    return self.head(self.final_ln(h)).astype(jnp.float32)

  def __call__(self, tokens: jax.Array, labels: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """Logits ``[B, D, levels]`` of ``p(x_i | x_<i)`` for int tokens ``[B, D]``."""
    batch = tokens.shape[0]
    prev = self.token_embed(tokens[:, :-1])
    h = jnp.concatenate([self._start(labels, batch)[:, None].astype(prev.dtype), prev], 1)
    h = self.embed_dropout(h + self.positions[None].astype(h.dtype), deterministic=not train)
    for block in self.blocks:
      h, _ = block(h, train)
    return self._logits(h)

  def decode_step(self, prev: jax.Array, index: jax.Array, cache: list[LayerCache],
                  labels: jax.Array | None = None
                  ) -> tuple[jax.Array, list[LayerCache]]:
    """One sampling step: logits ``[B, levels]`` of token ``index`` given token ``index-1``.

    Args:
      prev: int tokens ``[B]`` at position ``index - 1`` (ignored at ``index == 0``, where
        the input is the start token).
      index: the position (an int32 scalar, traced).
      cache: ``init_cache``'s layout, holding positions ``< index``.
      labels: a conditional model's labels ``[B]``.

    Returns:
      The logits and the cache with position ``index`` written.
    """
    batch = prev.shape[0]
    start = self._start(labels, batch)
    h = jnp.where(index == 0, start, self.token_embed(prev).astype(start.dtype))
    pos = jax.lax.dynamic_index_in_dim(self.positions, index, keepdims=False)
    h = (h + pos.astype(h.dtype))[:, None]
    new_cache = []
    for block, layer in zip(self.blocks, cache):
      h, layer = block(h, False, layer, index)
      new_cache.append(layer)
    return self._logits(h)[:, 0], new_cache

  def init_cache(self, batch: int) -> list[LayerCache]:
    """An empty cache for ``batch`` sequences: zeros ``[B, D, heads, head_dim]`` per layer."""
    shape = (batch, self.length, self.num_heads, self.embed_dim // self.num_heads)
    return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
            for _ in range(self.num_layers)]


def adjust_logits(logits: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """Log-probabilities of the sampling distribution: the ``top_k`` most likely values
  (0: all) at ``temperature`` (> 0)."""
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  return jax.nn.log_softmax(logits / temperature, axis=-1)


def inverse_cdf(logits: jax.Array, u: jax.Array, temperature: float = 1.0,
                top_k: int = 0) -> jax.Array:
  """The level whose CDF interval holds ``u`` in (0, 1), under ``adjust_logits``'s
  distribution; ``temperature == 0`` (or ``top_k == 1``) takes the most likely level.

  Args:
    logits: ``[..., levels]``.
    u: uniforms ``[...]``.
    temperature: >= 0.
    top_k: sample among the k most likely levels (0: all).

  Returns:
    int32 levels ``[...]``; a deterministic function of ``(logits, u)``.
  """
  if temperature == 0 or top_k == 1:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  cdf = jnp.cumsum(jnp.exp(adjust_logits(logits, temperature, top_k)), axis=-1)
  # u in (0, 1] of the total, which float rounding can leave off 1: a level outside the
  # top k has an empty interval, and u never passes the last level.
  u = jnp.clip(u, jnp.finfo(jnp.float32).tiny, 1.0)[..., None] * cdf[..., -1:]
  return jnp.sum(cdf < u, axis=-1).astype(jnp.int32)


def sample(model: PixelTransformer, params: Any, u: jax.Array,
           labels: jax.Array | None = None, temperature: float = 1.0,
           top_k: int = 0) -> tuple[jax.Array, jax.Array]:
  """Tokens drawn one position at a time with the key/value cache (``jax.lax.scan``).

  Args:
    model: the transformer.
    params: its parameters.
    u: uniforms ``[B, D]`` in (0, 1), one per position, inverted through each step's CDF:
      the tokens are a deterministic function of ``u`` (and ``labels``).
    labels: a conditional model's labels ``[B]``.
    temperature: softmax temperature (0: greedy).
    top_k: keep the k most likely levels (0: all).

  Returns:
    tokens ``[B, D]`` (int32) and the logits ``[B, D, levels]`` each step saw.
  """
  batch = u.shape[0]
  variables = {"params": params}
  cache = model.init_cache(batch)

  def step(carry, inputs):
    prev, cache = carry
    index, u_i = inputs
    logits, cache = model.apply(variables, prev, index, cache, labels,
                                method=PixelTransformer.decode_step)
    token = inverse_cdf(logits, u_i, temperature, top_k)
    return (token, cache), (token, logits)

  init = (jnp.zeros((batch,), jnp.int32), cache)
  indices = jnp.arange(model.length, dtype=jnp.int32)
  _, (tokens, logits) = jax.lax.scan(step, init, (indices, u.T))
  return tokens.T, jnp.swapaxes(logits, 0, 1)


@MODELS.register("pixel_transformer")
def build_pixel_transformer(spec: DataSpec, levels: int = 2, num_layers: int = 4,
                            num_heads: int = 4, embed_dim: int = 128, mlp_dim: int = 512,
                            dropout: float = 0.1, positional: str = "learned",
                            window: int = 0, conditional: bool = False,
                            condition_key: str = "label", dtype: str = "float32"
                            ) -> PixelTransformer:
  """A GPT-style transformer over the image's pixels quantised to ``levels`` values (2:
  binarised, ``pixel > 0``), in raster order; ``window`` > 0: local attention in blocks of
  that many pixels; ``conditional``: ``p(x | y)`` on ``batch[condition_key]`` (the label's
  embedding is the start token)."""
  num_classes = num_conditions(spec, conditional, condition_key)
  for key, value, low in (("levels", levels, 2), ("num_layers", num_layers, 1),
                          ("num_heads", num_heads, 1), ("window", window, 0)):
    require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
            f"model.{key} must be an integer >= {low}, got {value!r}.")
  require(levels <= 256, f"model.levels must be <= 256, got {levels}.")
  require(embed_dim % num_heads == 0, f"model.embed_dim={embed_dim} must be divisible by "
          f"model.num_heads={num_heads}.")
  require(positional in POSITIONAL, f"model.positional must be one of "
          f"{', '.join(POSITIONAL)}, got {positional!r}.")
  return PixelTransformer(
      tuple(spec.image_shape), levels, num_layers, num_heads, embed_dim, mlp_dim, dropout,
      positional, window, num_classes, condition_key, jnp.dtype(dtype))
