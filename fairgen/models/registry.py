"""The model registry, its config checks and the helpers its builders share.

``MODELS`` maps a model name to a builder ``(spec, **hyperparameters) -> modules``: a GAN
builder returns ``GanModules(generator, discriminator)``, a VAE builder a ``VAE`` module.
Each builder lives in its network's module and registers itself there with
``@MODELS.register(name)``; ``fairgen/models/__init__.py`` imports those modules, so the
registry is complete once ``fairgen.models`` is imported. This module imports none of them.

``validate`` checks the ``model`` config section against the builder's signature (an
unknown key is an error) and the hyperparameters every family shares by name (sizes,
widths, dropout rates); ``build`` calls the builder. The objective that uses a model checks
that the family fits.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Mapping

import flax.linen as nn

from fairgen.config import ConfigError, require
from fairgen.data.base import DataSpec
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


def positive_ints(value: Any, key: str, allow_empty: bool = False) -> tuple[int, ...]:
  """``value`` (a positive integer or a sequence of them: a config's ``ch_mult`` or
  ``attn_resolutions``) as a tuple.

  Raises:
    ConfigError: naming ``key``, unless every entry is a positive integer and, without
      ``allow_empty``, there is at least one.
  """
  values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  require((values or allow_empty) and all(isinstance(v, int) and v >= 1 for v in values),
          f"{key} must be positive integers, got {value!r}.")
  return values


def num_conditions(spec: DataSpec, conditional: bool, condition_key: str) -> int:
  """The number of labels a model conditions on (0: unconditional), checked against the data.

  Args:
    spec: the dataset's spec.
    conditional: whether the model is conditional.
    condition_key: 'label' (the dataset's classes) or 'attr' (its sensitive-attribute
      groups, ``spec.num_groups``).

  Returns:
    The number of conditioning values, 0 when ``conditional`` is False.

  Raises:
    ConfigError: for an unknown ``condition_key``, or 'attr' on a dataset without groups.
  """
  if condition_key not in ("label", "attr"):
    raise ConfigError(f"model.condition_key must be 'label' or 'attr', got {condition_key!r}.")
  if conditional and condition_key == "attr" and not spec.num_groups:
    raise ConfigError(f"model.condition_key='attr' needs a dataset with groups; "
                     f"{spec.name!r} has none.")
  if not conditional:
    return 0
  return spec.num_groups if condition_key == "attr" else spec.num_classes


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
  """Raises ConfigError for an unknown model name or key, or an impossible size.

  Args:
    model: the config's ``model`` section: ``name`` plus the builder's hyperparameters.
  """
  name = model.get("name")
  require(name in MODELS, f"Unknown model.name={name!r}; valid names: "
          f"{', '.join(MODELS.names())}.")
  params = inspect.signature(MODELS.get(name)).parameters
  for key, value in _hyperparameters(model).items():
    require(key in params and key != "spec", f"Unknown key model.{key}; model {name!r} takes: "
            f"{', '.join(k for k in params if k != 'spec')}.")
    _check_value(key, value)


def build(model: Mapping[str, Any], spec: Any) -> Any:
  """The modules of the ``model`` section (``name`` plus hyperparameters) for ``spec``.

  Args:
    model: the config's ``model`` section.
    spec: the dataset's spec (a ``DataSpec`` or a ``TabularSpec``).

  Returns:
    Whatever the named builder returns (e.g. ``GanModules`` or a Flax module).
  """
  hparams = _hyperparameters(model.to_dict() if hasattr(model, "to_dict") else model)
  return MODELS.get(model["name"])(spec, **hparams)
