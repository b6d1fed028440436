"""Flax Linen models. They take hyperparameters, never the config.

``MODELS`` maps a model name to a builder ``(spec, **hyperparameters) -> modules``: a GAN
builder returns ``GanModules(generator, discriminator)``, a VAE builder a ``VAE`` module.
The objective that uses a model checks that the family fits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from fairgen.data.base import DataSpec
from fairgen.models import dcgan
from fairgen.models import tabgan
from fairgen.models import tabular
from fairgen.models import vfae
from fairgen.models import vae
from fairgen.registry import Registry

MODELS: Registry[Any] = Registry("model")


@dataclasses.dataclass(frozen=True)
class GanModules:
  """A generator and a discriminator, and the latent size the generator takes."""

  generator: nn.Module
  discriminator: nn.Module
  latent_dim: int
  num_classes: int


@MODELS.register("dcgan")
def build_dcgan(spec: DataSpec, latent_dim: int = 100, width: float = 1.0,
                conditional: bool = False, dropout: float = 0.3,
                fast_conv: bool = True) -> GanModules:
  """The seeds' DCGAN; ``conditional`` conditions both nets on the dataset's labels."""
  num_classes = spec.num_classes if conditional else 0
  return GanModules(
      generator=dcgan.Generator(spec.image_shape, latent_dim, width, num_classes, fast_conv),
      discriminator=dcgan.Discriminator(width, num_classes, dropout),
      latent_dim=latent_dim, num_classes=num_classes)


@MODELS.register("vae")
def build_vae(spec: DataSpec, latent_dim: int = 32, arch: str = "mlp",
              hidden: tuple[int, ...] = (512, 256), likelihood: str = "bernoulli") -> vae.VAE:
  """A VAE over the dataset's images."""
  return vae.VAE(spec.image_shape, latent_dim, arch, tuple(hidden), likelihood)


@MODELS.register("fair_mlp")
def build_fair_mlp(spec: Any, hidden: tuple[int, ...] = (200,), dropout: float = 0.2,
                   equalized_odds: bool = True) -> tabular.DebiasModules:
  """A predictor MLP over encoded rows and the Zhang et al. 2018 adversary."""
  del spec  # Dense layers infer the input width.
  return tabular.DebiasModules(tabular.Predictor(tuple(hidden), dropout),
                               tabular.Adversary(equalized_odds))


MODELS.register("vfae")(vfae.build_vfae)
MODELS.register("tabgan")(tabgan.build_tabgan)


__all__ = ["GanModules", "MODELS"]
