"""Flax Linen models. They take hyperparameters, never the config.

``MODELS`` maps a model name to a builder ``(spec, **hyperparameters) -> modules``: a GAN
builder returns ``GanModules(generator, discriminator)``, a VAE builder a ``VAE`` module.
The objective that uses a model checks that the family fits. ``validate`` checks the
``model`` config section against the builder's signature (an unknown key is an error) and
the hyperparameters every family shares by name (sizes, widths, dropout rates); ``build``
calls the builder.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from fairgen.config import ConfigError, require
from fairgen.data.base import DataSpec
from fairgen.models import dcgan
from fairgen.models import resnet_gan
from fairgen.models import tabgan
from fairgen.models import tabular
from fairgen.models import unet
from fairgen.models import transformer
from fairgen.models import vfae
from fairgen.models import vae
from fairgen.registry import Registry

MODELS: Registry[Any] = Registry("model")
# ``model.dtype``: every model computes in one of these; parameters, optimizer state, the
# models' outputs and the losses stay float32 (mixed precision).
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class GanModules:
  """A generator and a discriminator, the latent size, and what conditions them.

  ``num_classes`` > 0 for conditional nets, which read their labels from
  ``batch[condition_key]`` ('label' for classes, 'attr' for sensitive-attribute groups).
  """

  generator: nn.Module
  discriminator: nn.Module
  latent_dim: int
  num_classes: int
  condition_key: str = "label"


def _num_conditions(spec: DataSpec, conditional: bool, condition_key: str) -> int:
  """The number of labels a model conditions on (0: unconditional), checked against the
  data."""
  if condition_key not in ("label", "attr"):
    raise ConfigError(f"model.condition_key must be 'label' or 'attr', got {condition_key!r}.")
  if conditional and condition_key == "attr" and not spec.num_groups:
    raise ConfigError(f"model.condition_key='attr' needs a dataset with groups; "
                     f"{spec.name!r} has none.")
  if not conditional:
    return 0
  return spec.num_groups if condition_key == "attr" else spec.num_classes


@MODELS.register("dcgan")
def build_dcgan(spec: DataSpec, latent_dim: int = 100, width: float = 1.0,
                conditional: bool = False, dropout: float = 0.3,
                fast_conv: bool = True, condition_key: str = "label",
                dtype: str = "float32") -> GanModules:
  """The seeds' DCGAN; ``conditional`` conditions both nets on ``batch[condition_key]``.

  ``condition_key='label'`` conditions on the dataset's classes, ``'attr'`` on its
  sensitive-attribute groups (``spec.num_groups``; the 'conditional' fairness method).
  """
  num_classes = _num_conditions(spec, conditional, condition_key)
  return GanModules(
      generator=dcgan.Generator(spec.image_shape, latent_dim, width, num_classes, fast_conv,
                                dtype=jnp.dtype(dtype)),
      discriminator=dcgan.Discriminator(width, num_classes, dropout, dtype=jnp.dtype(dtype)),
      latent_dim=latent_dim, num_classes=num_classes, condition_key=condition_key)


@MODELS.register("resnet_gan")
def build_resnet_gan(spec: DataSpec, latent_dim: int = 128, g_ch: int = 64, d_ch: int = 64,
                     attention: int = 0, conditional: bool = False,
                     condition_key: str = "label", weight_init: str = "ortho",
                     dtype: str = "float32") -> GanModules:
  """The SNGAN/BigGAN ResNet pair for 32x32 or 64x64 images (``resnet_gan.py``).

  ``g_ch``/``d_ch``: base channels (SNGAN at 32x32: 64 and 32; BigGAN at 64x64: 64 and
  64); ``attention``: the side at which a self-attention block runs in G and D (0: none);
  ``conditional``: conditional batch norm in G and a projection D on
  ``batch[condition_key]``; ``weight_init``: 'ortho' (BigGAN), 'N02' (Choi et al.) or
  'xavier' (SNGAN).
  """
  num_classes = _num_conditions(spec, conditional, condition_key)
  resnet_gan.check_shape(tuple(spec.image_shape), attention)
  require(weight_init in resnet_gan.INITS, f"model.weight_init must be one of "
          f"{', '.join(resnet_gan.INITS)}, got {weight_init!r}.")
  dt = jnp.dtype(dtype)
  return GanModules(
      generator=resnet_gan.Generator(tuple(spec.image_shape), latent_dim, g_ch, num_classes,
                                     attention, weight_init, dt),
      discriminator=resnet_gan.Discriminator(d_ch, num_classes, attention, weight_init, dt),
      latent_dim=latent_dim, num_classes=num_classes, condition_key=condition_key)


@MODELS.register("vae")
def build_vae(spec: DataSpec, latent_dim: int = 32, arch: str = "mlp",
              hidden: tuple[int, ...] = (512, 256), likelihood: str = "bernoulli",
              conditional: bool = False, condition_key: str = "label",
              dtype: str = "float32") -> vae.VAE:
  """A VAE over the dataset's images; ``conditional``: a conditional VAE on
  ``batch[condition_key]`` (classes, or groups for ``fair.method='conditional'``)."""
  num_classes = _num_conditions(spec, conditional, condition_key)
  return vae.VAE(spec.image_shape, latent_dim, arch, tuple(hidden), likelihood,
                 dtype=jnp.dtype(dtype), num_classes=num_classes, condition_key=condition_key)


@MODELS.register("unet")
def build_unet(spec: DataSpec, ch: int = 64, ch_mult: tuple[int, ...] = (1, 2, 2),
               num_res_blocks: int = 2, attn_resolutions: tuple[int, ...] = (14, 7),
               dropout: float = 0.1, conditional: bool = False, condition_key: str = "label",
               dtype: str = "float32") -> unet.UNet:
  """The DDPM U-Net (``unet.py``): ``ch`` base channels times ``ch_mult`` per resolution,
  ``num_res_blocks`` residual blocks each, self-attention at the sides in
  ``attn_resolutions``; ``conditional``: on ``batch[condition_key]`` with classifier-free
  guidance. Ho et al.'s CIFAR-10 net: ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
  attn_resolutions=(16,)."""
  num_classes = _num_conditions(spec, conditional, condition_key)
  require(isinstance(ch, int) and ch >= 1, f"model.ch must be a positive integer, got {ch!r}.")
  mults = tuple(ch_mult) if isinstance(ch_mult, (tuple, list)) else (ch_mult,)
  require(len(mults) >= 1 and all(isinstance(m, int) and m >= 1 for m in mults),
          f"model.ch_mult must be positive integers, got {ch_mult!r}.")
  require(isinstance(num_res_blocks, int) and num_res_blocks >= 1,
          f"model.num_res_blocks must be a positive integer, got {num_res_blocks!r}.")
  attn = tuple(attn_resolutions) if isinstance(attn_resolutions, (tuple, list)) else (
      attn_resolutions,)
  try:
    unet.check_shape(tuple(spec.image_shape), mults, attn)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return unet.UNet(out_channels=spec.image_shape[-1], ch=ch, ch_mult=mults,
                   num_res_blocks=num_res_blocks, attn_resolutions=attn, dropout=dropout,
                   num_classes=num_classes, condition_key=condition_key,
                   dtype=jnp.dtype(dtype))


@MODELS.register("fair_mlp")
def build_fair_mlp(spec: Any, hidden: tuple[int, ...] = (200,), dropout: float = 0.2,
                   equalized_odds: bool = True, dtype: str = "float32"
                   ) -> tabular.DebiasModules:
  """A predictor MLP over encoded rows and the Zhang et al. 2018 adversary."""
  del spec  # Dense layers infer the input width.
  return tabular.DebiasModules(tabular.Predictor(tuple(hidden), dropout, jnp.dtype(dtype)),
                               tabular.Adversary(equalized_odds, jnp.dtype(dtype)))


@MODELS.register("pixel_transformer")
def build_pixel_transformer(spec: DataSpec, levels: int = 2, num_layers: int = 4,
                            num_heads: int = 4, embed_dim: int = 128, mlp_dim: int = 512,
                            dropout: float = 0.1, positional: str = "learned",
                            window: int = 0, conditional: bool = False,
                            condition_key: str = "label", dtype: str = "float32"
                            ) -> transformer.PixelTransformer:
  """A GPT-style transformer over the image's pixels quantised to ``levels`` values (2:
  binarised, ``pixel > 0``), in raster order; ``window`` > 0: local attention in blocks of
  that many pixels; ``conditional``: ``p(x | y)`` on ``batch[condition_key]`` (the label's
  embedding is the start token)."""
  num_classes = _num_conditions(spec, conditional, condition_key)
  for key, value, low in (("levels", levels, 2), ("num_layers", num_layers, 1),
                          ("num_heads", num_heads, 1), ("window", window, 0)):
    require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
            f"model.{key} must be an integer >= {low}, got {value!r}.")
  require(levels <= 256, f"model.levels must be <= 256, got {levels}.")
  require(embed_dim % num_heads == 0, f"model.embed_dim={embed_dim} must be divisible by "
          f"model.num_heads={num_heads}.")
  require(positional in transformer.POSITIONAL, f"model.positional must be one of "
          f"{', '.join(transformer.POSITIONAL)}, got {positional!r}.")
  return transformer.PixelTransformer(
      tuple(spec.image_shape), levels, num_layers, num_heads, embed_dim, mlp_dim, dropout,
      positional, window, num_classes, condition_key, jnp.dtype(dtype))


MODELS.register("vfae")(vfae.build_vfae)
MODELS.register("tabgan")(tabgan.build_tabgan)


def _hyperparameters(model: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in dict(model).items() if k != "name"}


def _check_value(key: str, value: Any) -> None:
  """Checks the hyperparameters that mean the same in every model, by their names."""
  def number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

  if key.endswith(("_dim", "_ch")):
    require(number(value) and value >= 1 and value == int(value),
            f"model.{key} must be a positive integer, got {value!r}.")
  elif key == "attention":
    require(number(value) and value >= 0 and value == int(value),
            f"model.{key} must be an image side (0: none), got {value!r}.")
  elif key == "width" or key == "temperature":
    require(number(value) and value > 0, f"model.{key} must be > 0, got {value!r}.")
  elif key.endswith("hidden"):
    values = value if isinstance(value, (tuple, list)) else (value,)
    require(len(values) > 0 and all(number(v) and v >= 1 and v == int(v) for v in values),
            f"model.{key} must be positive layer widths, got {value!r}.")
  elif key.endswith("dropout"):
    require(number(value) and 0 <= value < 1, f"model.{key} must be in [0, 1), got {value!r}.")
  elif key == "dtype":
    require(value in DTYPES, f"model.dtype must be one of {', '.join(DTYPES)}, got {value!r}.")


def validate(model: Mapping[str, Any]) -> None:
  """Raises ConfigError for an unknown model name or key, or an impossible size."""
  name = model.get("name")
  require(name in MODELS, f"Unknown model.name={name!r}; valid names: "
          f"{', '.join(MODELS.names())}.")
  params = inspect.signature(MODELS.get(name)).parameters
  for key, value in _hyperparameters(model).items():
    require(key in params and key != "spec", f"Unknown key model.{key}; model {name!r} takes: "
            f"{', '.join(k for k in params if k != 'spec')}.")
    _check_value(key, value)


def build(model: Mapping[str, Any], spec: Any) -> Any:
  """The modules of the ``model`` section (``name`` plus hyperparameters) for ``spec``."""
  hparams = _hyperparameters(model.to_dict() if hasattr(model, "to_dict") else model)
  return MODELS.get(model["name"])(spec, **hparams)


__all__ = ["DTYPES", "GanModules", "MODELS", "build", "validate"]
