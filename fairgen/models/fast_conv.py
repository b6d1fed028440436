"""Fast, exactly equivalent rewrites of strided (transposed) convolutions.

XLA on CPU computes the weight gradient of a strided ``nn.ConvTranspose``
(``lax.conv_general_dilated`` with ``lhs_dilation``) very slowly. Two exact
rewrites avoid the slow paths:

* ``SubpixelConvTranspose``: a stride-``s`` transposed convolution equals a
  stride-1 convolution producing ``s * s * Cout`` channels followed by
  ``depth_to_space`` (sub-pixel convolution).
* ``SubpixelGradConv`` keeps the naive strided convolution and its weight
  gradient, and computes its *input* gradient (which XLA computes as a
  convolution of the dilated output gradient) as a stride-1 convolution and
  ``depth_to_space``, through ``jax.custom_vjp``.

In both cases the module owns the *original* parameters (``'kernel'`` of shape
``(k, k, Cin, Cout)`` and ``'bias'`` of shape ``(Cout,)``, exactly as the naive
flax layer with ``padding='SAME'``) and rearranges the kernel differentiably on
every call, so parameter trees, checkpoints and initialisations are
interchangeable with the naive layers and gradients flow back to the original
kernel.

The naive flax layers (``nn.ConvTranspose`` / ``nn.Conv`` with
``padding='SAME'``) remain the reference implementation: the fast layers are
tested against them (``tests/test_fast_conv.py``) for outputs and gradients. Use
the ``conv_transpose`` / ``conv`` factories to switch between the two with a
hyperparameter.

Performance on XLA:CPU (``tools/bench_layers.py``, batch 128): the sub-pixel
transposed conv cuts the weight gradient of the DCGAN 7->14, 128->64, k5 layer
from ~0.7 s to ~40 ms. The naive *strided* ``nn.Conv`` has no such slow path;
there ``SpaceToDepthConv`` was measured 1.5-4x slower (the rearranged kernel
has ``ceil(k/s)**2 * s**2 >= k**2`` taps), so keep ``fast=False`` for ``conv``
unless a benchmark on the target backend says otherwise. ``SubpixelGradConv``
cuts the input gradient of the DCGAN discriminator's 14->7, 64->128 k5 layer
from ~37 to ~30 ms (XLA's default YNNPACK convolutions) or from ~39 to ~22 ms
(``--xla_cpu_experimental_ynn_fusion_type=``, Eigen convolutions); for a layer
with very few input channels (28->14, 1->64) it is slower, so the DCGAN uses it
for its second convolution only.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Initializer = Callable[..., Array]
PrecisionLike = Any

_DN = ('NHWC', 'HWIO', 'NHWC')


def depth_to_space(x: Array, block: int) -> Array:
  """Rearranges channel blocks into spatial blocks (NHWC).

  Channel index ``(rh * block + rw) * C + c`` of input pixel ``(h, w)`` goes to
  output pixel ``(h * block + rh, w * block + rw)``, channel ``c``.

  Args:
    x: array of shape ``(B, H, W, block * block * C)``.
    block: spatial block size.

  Returns:
    Array of shape ``(B, H * block, W * block, C)``.
  """
  b, h, w, c = x.shape
  if c % (block * block):
    raise ValueError(f'channels {c} not divisible by block**2={block**2}')
  cout = c // (block * block)
  x = x.reshape(b, h, w, block, block, cout)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * block, w * block, cout)


def _same_transpose_pad_a(k: int, s: int) -> int:
  """Leading padding lax.conv_transpose uses for 'SAME' (jax convention)."""
  pad_len = k + s - 2
  return k - 1 if s > k - 1 else int(math.ceil(pad_len / 2))


def subpixel_taps(k: int, s: int) -> tuple[np.ndarray, int, int]:
  """Index map from a transposed-conv kernel to its sub-pixel kernel (1D).

  ``lax.conv_transpose(x, w, (s,), 'SAME')`` computes, with ``pad_a`` its
  leading padding, ``y[s*q + r] = sum_d w[s*d + pad_a - r] * x[q + d]`` over the
  taps with ``0 <= s*d + pad_a - r < k``. With ``d = t + d_min`` this is a
  stride-1 convolution over ``x`` padded by ``(-d_min, d_max)`` with kernel
  ``w'[t, r] = w[s*(t + d_min) + pad_a - r]`` (zero when out of range).

  Args:
    k: kernel size of the transposed convolution.
    s: stride.

  Returns:
    ``(idx, pad_lo, pad_hi)``: ``idx`` has shape ``(k', s)`` and holds indices
    into ``w`` with ``k`` meaning "zero tap"; ``pad_lo``/``pad_hi`` are the
    stride-1 convolution's paddings.
  """
  pad_a = _same_transpose_pad_a(k, s)
  d_min = min(-((pad_a - r) // s) for r in range(s))  # ceil((r - pad_a) / s)
  d_max = max((k - 1 + r - pad_a) // s for r in range(s))
  kp = d_max - d_min + 1
  idx = np.full((kp, s), k, dtype=np.int32)
  for t in range(kp):
    for r in range(s):
      j = s * (t + d_min) + pad_a - r
      if 0 <= j < k:
        idx[t, r] = j
  return idx, -d_min, d_max


def subpixel_kernel(kernel: Array, strides: int) -> Array:
  """Builds the stride-1 sub-pixel kernel from a ConvTranspose kernel.

  Args:
    kernel: ``(k, k, Cin, Cout)`` kernel of ``nn.ConvTranspose``.
    strides: stride ``s`` of the transposed convolution.

  Returns:
    ``(k', k', Cin, s * s * Cout)`` kernel whose output channels are ordered
    ``(rh, rw, cout)`` as expected by ``depth_to_space``.
  """
  kh, kw, cin, cout = kernel.shape
  if kh != kw:
    raise ValueError(f'square kernels only, got {(kh, kw)}')
  s = strides
  idx, _, _ = subpixel_taps(kh, s)
  kp = idx.shape[0]
  # Append one zero tap per spatial axis so that index k reads zeros.
  padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
  gathered = padded[idx[:, :, None, None], idx[None, None, :, :]]
  # (kp, s, kp, s, cin, cout) -> (kp, kp, cin, s, s, cout)
  gathered = gathered.transpose(0, 2, 4, 1, 3, 5)
  return gathered.reshape(kp, kp, cin, s * s * cout)


def _check_input(x: Array, name: str) -> None:
  if x.ndim != 4:
    raise ValueError(f'{name} expects NHWC inputs, got shape {x.shape}')


class _SquareConv(nn.Module):
  """The attributes and parameters the rewritten layers share with the naive ones.

  Parameters are created exactly as flax's ``nn.Conv``/``nn.ConvTranspose`` create them
  (``'kernel'`` ``(k, k, Cin, Cout)``, ``'bias'`` ``(Cout,)``), so trees are interchangeable.

  Attributes:
    features: number of output channels.
    kernel_size: square kernel size ``k``.
    strides: stride ``s``.
    use_bias: whether to add a bias.
    kernel_init: kernel initializer (flax default).
    bias_init: bias initializer.
    dtype: computation dtype (``None``: inferred from inputs and params).
    param_dtype: parameter dtype.
    precision: precision passed to ``lax.conv_general_dilated``.
  """

  features: int
  kernel_size: int
  strides: int = 2
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: PrecisionLike = None

  def _promoted(self, inputs: Array) -> tuple[Array, Array, Array | None]:
    """Checks NHWC ``inputs``, creates (or fetches) the kernel and the optional bias, and
    promotes all three to the computation dtype, as flax's layers do."""
    _check_input(inputs, type(self).__name__)
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init,
                        (k, k, inputs.shape[-1], self.features), self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    return nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)


class SubpixelConvTranspose(_SquareConv):
  """``nn.ConvTranspose(padding='SAME')`` as stride-1 conv + depth_to_space.

  Parameters (names, shapes, initialisation) and outputs are identical to
  ``nn.ConvTranspose(features, (k, k), strides=(s, s), padding='SAME')``;
  output spatial size is ``input size * s`` for any input size.

  Attributes: see ``_SquareConv`` (``strides`` is the upsampling factor).
  """


  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """Applies the transposed convolution to NHWC ``inputs``."""
    inputs, kernel, bias = self._promoted(inputs)
    k, s = self.kernel_size, self.strides
    _, pad_lo, pad_hi = subpixel_taps(k, s)
    y = jax.lax.conv_general_dilated(
        inputs, subpixel_kernel(kernel, s), window_strides=(1, 1),
        padding=((pad_lo, pad_hi), (pad_lo, pad_hi)),
        dimension_numbers=_DN, precision=self.precision)
    y = depth_to_space(y, s)
    if bias is not None:
      y = y + bias.reshape(1, 1, 1, -1)
    return y


def same_padding(size: int, kernel_size: int, strides: int) -> tuple[int, int]:
  """The (low, high) padding of a 'SAME' convolution along one axis (lax convention)."""
  out = -(-size // strides)
  total = max((out - 1) * strides + kernel_size - size, 0)
  return total // 2, total - total // 2


def input_grad_taps(size: int, out_size: int, kernel_size: int, strides: int,
                    pad_lo: int) -> tuple[np.ndarray, int, int]:
  """Index map of the input gradient of a strided convolution (1D).

  With ``y[o] = sum_j w[j] x[s*o + j - pad_lo]``, input position ``i = s*q + r``
  receives ``dx[i] = sum_j w[j] dy[(i + pad_lo - j) / s]`` over the taps ``j``
  congruent to ``i + pad_lo`` modulo ``s``. Writing ``dy[q + d]`` for those
  terms, this is a stride-1 correlation of ``dy`` (zero outside its range) with
  the kernel ``w'[d - d_min, r]`` whose channels are the ``s`` phases ``r``,
  followed by ``depth_to_space``.

  Args:
    size: input length of the strided convolution.
    out_size: its output length.
    kernel_size: its kernel size ``k``.
    strides: its stride ``s``.
    pad_lo: its leading padding.

  Returns:
    ``(idx, pad_lo', pad_hi')``: ``idx`` of shape ``(k', s)`` holds indices into
    ``w`` (``k`` meaning "zero tap"); ``pad_lo'`` and ``pad_hi'`` pad ``dy`` so
    that the stride-1 ``VALID`` correlation yields ``ceil(size / s)``
    positions (``pad_hi'`` may be negative: a crop).
  """
  k, s = kernel_size, strides
  entries = {}
  for r in range(s):
    c = (r + pad_lo) % s  # The first tap of phase r.
    for j in range(c, k, s):
      entries[((r + pad_lo - j) // s, r)] = j
  offsets = [d for d, _ in entries]
  d_min, d_max = min(offsets), max(offsets)
  idx = np.full((d_max - d_min + 1, s), k, dtype=np.int32)
  for (d, r), j in entries.items():
    idx[d - d_min, r] = j
  return idx, -d_min, -(-size // s) + d_max - out_size


def _conv(x: Array, kernel: Array, strides: int,
          padding: tuple[tuple[int, int], tuple[int, int]],
          precision: PrecisionLike) -> Array:
  return jax.lax.conv_general_dilated(x, kernel, (strides, strides), padding,
                                      dimension_numbers=_DN, precision=precision)


def conv_input_grad(dy: Array, kernel: Array, input_hw: tuple[int, int],
                    strides: int, padding: tuple[tuple[int, int], tuple[int, int]],
                    precision: PrecisionLike = None) -> Array:
  """The input gradient of ``_conv(x, kernel, strides, padding)`` for cotangent ``dy``.

  Computed as one stride-1 convolution of ``dy`` (with ``strides**2`` phases of
  ``Cin`` output channels) and ``depth_to_space``, instead of XLA's convolution
  of the dilated ``dy``.
  """
  s = strides
  cin, cout = kernel.shape[2], kernel.shape[3]
  maps = [input_grad_taps(n, dy.shape[1 + a], kernel.shape[a], s, padding[a][0])
          for a, n in enumerate(input_hw)]
  (idx_h, lo_h, hi_h), (idx_w, lo_w, hi_w) = maps
  padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
  taps = padded[idx_h[:, :, None, None], idx_w[None, None, :, :]]
  # (kh', s, kw', s, cin, cout) -> (kh', kw', cout, s, s, cin): channels (rh, rw, cin).
  taps = taps.transpose(0, 2, 5, 1, 3, 4).reshape(
      idx_h.shape[0], idx_w.shape[0], cout, s * s * cin)
  z = jax.lax.conv_general_dilated(dy, taps, (1, 1), ((lo_h, hi_h), (lo_w, hi_w)),
                                   dimension_numbers=_DN, precision=precision)
  return depth_to_space(z, s)[:, :input_hw[0], :input_hw[1], :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def subpixel_grad_conv(x: Array, kernel: Array, strides: int,
                       padding: tuple[tuple[int, int], tuple[int, int]],
                       precision: PrecisionLike = None) -> Array:
  """A strided NHWC/HWIO convolution whose input gradient is ``conv_input_grad``."""
  return _conv(x, kernel, strides, padding, precision)


def _subpixel_grad_conv_fwd(x, kernel, strides, padding, precision):
  return _conv(x, kernel, strides, padding, precision), (x, kernel)


def _subpixel_grad_conv_bwd(strides, padding, precision, residuals, dy):
  x, kernel = residuals
  dx = conv_input_grad(dy, kernel, x.shape[1:3], strides, padding, precision)
  _, kernel_vjp = jax.vjp(lambda k: _conv(x, k, strides, padding, precision), kernel)
  return dx.astype(x.dtype), kernel_vjp(dy)[0]


subpixel_grad_conv.defvjp(_subpixel_grad_conv_fwd, _subpixel_grad_conv_bwd)


class SubpixelGradConv(_SquareConv):
  """``nn.Conv(padding='SAME', strides=s)`` with the sub-pixel input gradient.

  Parameters, outputs and the weight gradient are those of the naive layer;
  only the input gradient is computed differently (``conv_input_grad``).

  Attributes: see ``_SquareConv``.
  """


  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """Applies the strided convolution to NHWC ``inputs``."""
    inputs, kernel, bias = self._promoted(inputs)
    k, s = self.kernel_size, self.strides
    padding = tuple(same_padding(n, k, s) for n in inputs.shape[1:3])
    y = subpixel_grad_conv(inputs, kernel, s, padding, self.precision)
    if bias is not None:
      y = y + bias.reshape(1, 1, 1, -1)
    return y


def conv_transpose(features: int, kernel_size: int, strides: int, fast: bool,
                   **kw: Any) -> nn.Module:
  """Returns a 'SAME' transposed conv: naive flax layer or the fast rewrite.

  Both variants have identical parameters and outputs. With ``strides == 1``
  the naive layer is returned (no dilation, nothing to gain).

  Args:
    features: output channels.
    kernel_size: square kernel size.
    strides: stride (upsampling factor).
    fast: use ``SubpixelConvTranspose`` instead of ``nn.ConvTranspose``.
    **kw: forwarded to the layer (``use_bias``, ``kernel_init``, ``dtype``,
      ``name``, ...).

  Returns:
    A flax module.
  """
  if fast and strides > 1:
    return SubpixelConvTranspose(features, kernel_size, strides, **kw)
  return nn.ConvTranspose(features, (kernel_size, kernel_size),
                          strides=(strides, strides), padding='SAME', **kw)


def conv(features: int, kernel_size: int, strides: int, fast: bool,
         **kw: Any) -> nn.Module:
  """Returns a 'SAME' conv: the naive flax layer or its exact rewrite.

  Both variants have identical parameters, outputs and gradients. With
  ``strides == 1`` the naive layer is returned (nothing to gain).

  Args:
    features: output channels.
    kernel_size: square kernel size.
    strides: stride.
    fast: ``False``: ``nn.Conv``; ``True``: ``SubpixelGradConv`` (the naive
      forward pass with a sub-pixel input gradient).
    **kw: forwarded to the layer (``use_bias``, ``kernel_init``, ``dtype``,
      ``name``, ...).

  Returns:
    A flax module.
  """
  if fast and strides > 1:
    return SubpixelGradConv(features, kernel_size, strides, **kw)
  return nn.Conv(features, (kernel_size, kernel_size),
                 strides=(strides, strides), padding='SAME', **kw)
