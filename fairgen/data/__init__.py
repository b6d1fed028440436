"""Datasets: a registry of random-access sources and the deterministic input pipeline."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from fairgen.config import ConfigError, require
from fairgen.data import adult_aif360
from fairgen.data import bias
from fairgen.data import offline
from fairgen.data import uci
from fairgen.data import tfds_datasets
from fairgen.data.base import (ArraySource, DataError, DataSpec, Source, SubsetSource,
                               column_in_memory, read_column)
from fairgen.data.pipeline import IndexSampler, Loader, PoissonSampler, WeightedSampler
from fairgen.registry import Registry

DATASETS: Registry[Callable[..., Source]] = Registry("dataset")
DATASETS.register("mnist_5k")(offline.mnist_5k)
DATASETS.register("digits")(offline.digits)
DATASETS.register("mnist")(tfds_datasets.mnist)
DATASETS.register("fashion_mnist")(tfds_datasets.fashion_mnist)
DATASETS.register("cifar10")(tfds_datasets.cifar10)
DATASETS.register("celeb_a")(tfds_datasets.celeb_a)
DATASETS.register("adult")(uci.adult)
DATASETS.register("german")(uci.german)
DATASETS.register("adult_aif360")(adult_aif360.adult_aif360)
DATASETS.register("biased_mnist")(bias.biased_mnist)
DATASETS.register("biased_celeb_a")(bias.biased_celeb_a)

# Options that change what the examples look like (not which rows are taken): they name
# the cached classifiers trained on a dataset (``cache_tag``).
_DOMAIN_OPTIONS = {"biased_mnist": ("attribute", "num_colors", "digits", "color_seed"),
                   "biased_celeb_a": ("attribute", "image_size"), "mnist_5k": ("pad_to",)}


# Checks of option values, before anything is read: ``check(**options)`` with the loader's
# defaults filled in raises DataError for an impossible value.
_OPTION_CHECKS: dict[str, Callable[..., Any]] = {
    "biased_celeb_a": bias.check_celeb_a_options,
    "celeb_a": lambda label_attribute, **_: tfds_datasets.check_celeb_a_label(
        label_attribute),
    "mnist_5k": offline.check_mnist_5k_options,
}


def _options(name: str) -> dict[str, inspect.Parameter]:
  """The options a dataset's loader takes (``split`` and ``tfds_data_dir`` aside)."""
  params = inspect.signature(DATASETS.get(name)).parameters
  return {k: p for k, p in params.items() if k not in ("split", "tfds_data_dir")}


def validate(data_config: Mapping[str, Any]) -> None:
  """Raises ConfigError for an unknown dataset, an unknown option or an impossible value."""
  name = data_config.get("name")
  require(name in DATASETS,
          f"Unknown data.name={name!r}; valid names: {', '.join(DATASETS.names())}.")
  valid = _options(name)
  for section in ("options", "eval_options"):
    for key in dict(data_config.get(section) or {}):
      require(key in valid, f"Unknown key data.{section}.{key} for dataset {name!r}; it takes: "
              f"{', '.join(valid) or 'no options'}.")
  check = _OPTION_CHECKS.get(name)
  if check is not None:
    defaults = {k: p.default for k, p in valid.items() if p.default is not p.empty}
    options = dict(data_config.get("options") or {})
    for section, values in (("options", options),
                            ("eval_options", {**options, **dict(data_config.get("eval_options")
                                                                or {})})):
      try:
        check(**{**defaults, **values})
      except DataError as e:
        raise ConfigError(f"data.{section} of {name!r}: {e}") from None
  require(data_config.get("prefetch", 0) >= 0,
          f"data.prefetch must be >= 0, got {data_config.get('prefetch')}.")


def load(data_config: Mapping[str, Any], split: str,
         overrides: Mapping[str, Any] | None = None) -> Source:
  """Opens ``split`` of the dataset that ``data_config`` (the config's data section) names.

  ``overrides`` replace some of ``data_config.options`` (e.g. ``eval_options``).
  ``data_config.tfds_data_dir`` goes to the loaders that read TFDS data.
  """
  name = data_config["name"]
  loader = DATASETS.get(name)
  options = {**dict(data_config.get("options") or {}), **dict(overrides or {})}
  if "tfds_data_dir" in inspect.signature(loader).parameters:
    options["tfds_data_dir"] = data_config.get("tfds_data_dir")
  return loader(split, **options)


def load_eval(data_config: Mapping[str, Any]) -> Source:
  """The held-out real data of evaluation: ``eval_split`` with ``eval_options`` applied."""
  return load(data_config, data_config["eval_split"], data_config.get("eval_options"))


def cache_tag(data_config: Mapping[str, Any]) -> str:
  """A name for classifiers trained on this dataset: its name plus its domain options.

  E.g. ``biased_mnist-attribute=color-num_colors=3``: classifiers trained for the colour
  and the digit-group variants must not share a cache directory. Options at their
  loader's default are left out (so a config that spells out ``attribute='digit_group'``
  and a command that omits it name the same classifier), as are options that only pick
  rows (proportions, ref_fraction, subset, seed).
  """
  name = data_config["name"]
  options = dict(data_config.get("options") or {})
  defaults = {k: p.default for k, p in inspect.signature(DATASETS.get(name)).parameters.items()}
  parts = [name]
  for key in _DOMAIN_OPTIONS.get(name, ()):
    value = options.get(key, defaults.get(key))
    if isinstance(value, list):
      value = tuple(value)
    if isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], str):
      value = value[0]  # One attribute, spelled as a sequence or not.
    if value == defaults.get(key):
      continue  # A default, spelled out or not, names the same classifier.
    if isinstance(value, tuple):
      # Digits run together (digits=01234); names are joined (attribute=Black_Hair+Male).
      value = ("+" if any(isinstance(v, str) for v in value) else "").join(
          str(v) for v in value)
    parts.append(f"{key}={value}")
  return "-".join(parts)


__all__ = ["ArraySource", "DATASETS", "DataError", "DataSpec", "IndexSampler", "Loader",
           "PoissonSampler", "Source", "SubsetSource", "WeightedSampler", "cache_tag",
           "column_in_memory", "load", "load_eval", "read_column", "validate"]
