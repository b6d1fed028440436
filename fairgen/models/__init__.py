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
  """A generator and a discriminator, the latent size, and what conditions them.

  ``num_classes`` > 0 for conditional nets, which read their labels from
  ``batch[condition_key]`` ('label' for classes, 'attr' for sensitive-attribute groups).
  """

  generator: nn.Module
  discriminator: nn.Module
  latent_dim: int
  num_classes: int
  condition_key: str = "label"


@MODELS.register("dcgan")
def build_dcgan(spec: DataSpec, latent_dim: int = 100, width: float = 1.0,
                conditional: bool = False, dropout: float = 0.3,
                fast_conv: bool = True, condition_key: str = "label") -> GanModules:
  """The seeds' DCGAN; ``conditional`` conditions both nets on ``batch[condition_key]``.

  ``condition_key='label'`` conditions on the dataset's classes, ``'attr'`` on its
  sensitive-attribute groups (``spec.num_groups``; the 'conditional' fairness method).
  """
  if condition_key not in ("label", "attr"):
    raise ValueError(f"model.condition_key must be 'label' or 'attr', got {condition_key!r}.")
  if conditional and condition_key == "attr" and not spec.num_groups:
    raise ValueError(f"model.condition_key='attr' needs a dataset with groups; "
                     f"{spec.name!r} has none.")
  num_classes = 0
  if conditional:
    num_classes = spec.num_groups if condition_key == "attr" else spec.num_classes
  return GanModules(
      generator=dcgan.Generator(spec.image_shape, latent_dim, width, num_classes, fast_conv),
      discriminator=dcgan.Discriminator(width, num_classes, dropout),
      latent_dim=latent_dim, num_classes=num_classes, condition_key=condition_key)


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
