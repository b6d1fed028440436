"""The FID Inception-v3: the network of TF's original FID code and of pytorch-fid.

It is torchvision's Inception-v3 with the changes pytorch-fid makes to match the TF graph of
``inception-2015-12-05`` (``pytorch_fid.inception.fid_inception_v3``):
  - the average pools of the A, C and first E blocks exclude padding from the mean
    (``count_include_pad=False``, as TF's ``avg_pool`` does);
  - the pool branch of the last E block (``Mixed_7c``) is a *max* pool;
  - 1008 output classes.
FID and KID use the 2048-d global average pool; IS uses the softmax of the 1008 logits.

Parameter names are pytorch-fid's module names (``Mixed_6b/branch7x7_2/conv``), so the
converter (``tools/convert_inception.py``) only transposes arrays. Weights live in an
``.npz`` written by that tool and loaded without pickle; nothing is downloaded.

Preprocessing (``preprocess``) is part of the protocol, and the backbone records it:
  - ``quantize``: samples are rounded to uint8 levels first, as real images stored as PNG
    or JPEG are (clean-fid's protocol); pytorch-fid reads such files, so its images are
    quantised too.
  - ``resize='bilinear'``: pytorch-fid's ``F.interpolate(..., 'bilinear',
    align_corners=False)`` to 299x299, without antialiasing;
  - ``resize='pil_bicubic'``: clean-fid's resize, PIL's bicubic filter on float32 images
    (with PIL's antialiasing when shrinking), clipped to [0, 255].
  - grayscale images are repeated to 3 channels; the network sees ``2 * x / 255 - 1``.
Both resizes are linear maps along each axis, so they run on device as two matrix products,
with the matrices computed once on the host (PIL's exactly, by resizing an identity image).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
RESIZE_MODES = ("bilinear", "pil_bicubic")
_BN_EPSILON = 1e-3
_PRECISION = jax.lax.Precision.HIGHEST


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU: torchvision's
  ``BasicConv2d``, with its ``conv`` and ``bn`` submodule names."""

  features: int
  kernel: int | Sequence[int]
  stride: int = 1
  padding: int | Sequence[int] = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), _pair(self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=_PRECISION,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_same(x: jax.Array) -> jax.Array:
  # TF's avg_pool: 3x3, stride 1, SAME padding, padded cells excluded from the mean.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = BasicConv(64, 1, name="branch1x1")(x)
    b5 = BasicConv(48, 1, name="branch5x5_1")(x)
    b5 = BasicConv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv(64, 1, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, 1, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(384, 3, stride=2, name="branch3x3")(x)
    bd = BasicConv(64, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    b1 = BasicConv(192, 1, name="branch1x1")(x)
    b7 = BasicConv(c7, 1, name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, 1, name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, 1, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(192, 1, name="branch3x3_1")(x)
    b3 = BasicConv(320, 3, stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, 1, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
  """``max_pool``: the FID graph's last block pools with a max (pytorch-fid's E_2)."""

  max_pool: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = BasicConv(320, 1, name="branch1x1")(x)
    b3 = BasicConv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)],
                         axis=-1)
    bd = BasicConv(448, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)],
                         axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_same(x)
    bp = BasicConv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """Inputs ``[N, 299, 299, 3]`` scaled to [-1, 1]; returns ``{'pool': [N, 2048],
  'logits': [N, 1008]}``. Inference only: batch norm uses its stored statistics."""

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    x = BasicConv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, 3, name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_valid(x)
    x = BasicConv(80, 1, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_valid(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, precision=_PRECISION, name="fc")(pool)
    return {"pool": pool, "logits": logits}


# --- Preprocessing. ------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def resize_matrix(mode: str, size_in: int, size_out: int = INPUT_SIZE) -> np.ndarray:
  """The ``[size_out, size_in]`` matrix of a 1-D resize; a 2-D resize applies it to both axes.

  ``bilinear``: PyTorch's ``interpolate(mode='bilinear', align_corners=False)`` (half-pixel
  centres, source coordinates clamped at 0, no antialiasing). ``pil_bicubic``: PIL's
  ``Image.resize(..., BICUBIC)`` on a float32 image, read off by resizing the identity.
  """
  if mode == "bilinear":
    src = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    src = np.maximum(src, 0.0)
    x0 = np.floor(src).astype(int)
    frac = src - x0
    x0 = np.minimum(x0, size_in - 1)
    x1 = np.minimum(x0 + 1, size_in - 1)
    m = np.zeros((size_out, size_in), np.float64)
    np.add.at(m, (np.arange(size_out), x0), 1.0 - frac)
    np.add.at(m, (np.arange(size_out), x1), frac)
    return m.astype(np.float32)
  if mode == "pil_bicubic":
    # Rows of the identity are the unit images; PIL skips the vertical pass when the height
    # is unchanged, so resizing the width alone gives out[y, o] = W[o, y].
    eye = Image.fromarray(np.eye(size_in, dtype=np.float32), mode="F")
    out = np.asarray(eye.resize((size_out, size_in), resample=Image.BICUBIC), np.float32)
    return np.ascontiguousarray(out.T)
  raise ValueError(f"Unknown Inception resize {mode!r}; valid: {', '.join(RESIZE_MODES)}.")


def preprocess(images: jax.Array, rows: jax.Array, cols: jax.Array, *, quantize: bool,
               clip: bool) -> jax.Array:
  """fairgen images (``[N, H, W, C]`` in [-1, 1], C 1 or 3) to the network's input.

  ``rows`` and ``cols`` are ``resize_matrix`` outputs for H and W. ``clip``: clip the
  resized image to [0, 255] (clean-fid does, after its bicubic resize).
  """
  x = (images.astype(jnp.float32) + 1.0) * 127.5
  x = jnp.clip(x, 0.0, 255.0)
  if quantize:
    x = jnp.round(x)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=_PRECISION)
  x = jnp.einsum("pw,nowc->nopc", cols, x, precision=_PRECISION)
  if clip:
    x = jnp.clip(x, 0.0, 255.0)
  return x / 127.5 - 1.0


# --- Weights. ------------------------------------------------------------------------------

_BN_KEYS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
            "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def flax_arrays_from_torch(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pytorch-fid's ``Inception3`` state dict (name -> array) to this module's variables,
  flattened to ``'params/Mixed_5b/branch1x1/conv/kernel'``-style keys.

  Convolution kernels go from OIHW to HWIO and the fc matrix is transposed. Batch-norm
  counters (``num_batches_tracked``) and the auxiliary classifier are dropped.

  Raises:
    ValueError: for a key this network does not have.
  """
  out = {}
  for name, value in state.items():
    value = np.asarray(value, np.float32)
    parts = name.split(".")
    if parts[-1] == "num_batches_tracked" or parts[0] == "AuxLogits":
      continue
    *path, leaf = parts
    if path and path[-1] == "conv" and leaf == "weight":
      out["/".join(["params", *path, "kernel"])] = value.transpose(2, 3, 1, 0)
    elif path and path[-1] == "bn" and leaf in _BN_KEYS:
      collection, new_leaf = _BN_KEYS[leaf]
      out["/".join([collection, *path, new_leaf])] = value
    elif path == ["fc"] and leaf in ("weight", "bias"):
      out["params/fc/" + ("kernel" if leaf == "weight" else "bias")] = (
          value.T if leaf == "weight" else value)
    else:
      raise ValueError(f"{name!r} is not a weight of the FID Inception-v3; is this "
                       "pytorch-fid's pt_inception-2015-12-05 state dict?")
  return out


def unflatten(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """``{'a/b/c': x}`` to ``{'a': {'b': {'c': x}}}``."""
  tree: dict[str, Any] = {}
  for key, value in arrays.items():
    node = tree
    *path, leaf = key.split("/")
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree
