"""The dataset registry, the ``data`` config section's checks, and opening a split.

Each dataset registers itself in its own module, with the metadata the checks read:

```python
@registry.register("my_data", check=check_my_options, domain_options=("variant",))
def my_data(split: str, variant: str = "a") -> base.Source:
  ...
```

The loader's keyword arguments (``split`` and ``tfds_data_dir`` aside) are the dataset's
``data.options`` keys, with their defaults; ``check`` validates their values before
anything is read; ``domain_options`` are the options that change what the examples look
like, so they name the cached classifiers trained on the dataset (``cache_tag``).
``fairgen/data/__init__.py`` imports the dataset modules, so the registry is complete once
``fairgen.data`` is imported. This module imports none of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
from typing import Any, Callable, Mapping, TypeVar

from fairgen.config import ConfigError, require
from fairgen.data.base import DataError, Source
from fairgen.registry import Registry

LoaderT = TypeVar("LoaderT", bound=Callable[..., Source])
# Loader arguments that are not ``data.options`` keys.
_NOT_OPTIONS = ("split", "tfds_data_dir")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A registered dataset: its loader and the metadata that the config checks read.

  Attributes:
    loader: ``loader(split, **options) -> Source``; its keyword arguments are the options.
    check: ``check(**options)``, called with the loader's defaults filled in, raises
      DataError for an impossible value before anything is read; None: no checks.
    domain_options: the options that change what the examples look like (not which rows
      are taken); they name the classifiers trained on the dataset (``cache_tag``).
  """

  loader: Callable[..., Source]
  check: Callable[..., Any] | None = None
  domain_options: tuple[str, ...] = ()

  def parameters(self) -> dict[str, inspect.Parameter]:
    """All the loader's parameters, by name."""
    return dict(inspect.signature(self.loader).parameters)

  def options(self) -> dict[str, inspect.Parameter]:
    """The options the loader takes (``split`` and ``tfds_data_dir`` aside)."""
    return {k: p for k, p in self.parameters().items() if k not in _NOT_OPTIONS}


DATASETS: Registry[Dataset] = Registry("dataset")


def register(name: str, check: Callable[..., Any] | None = None,
             domain_options: tuple[str, ...] = ()) -> Callable[[LoaderT], LoaderT]:
  """A decorator that registers a loader as dataset ``name``, with its metadata.

  Args:
    name: the ``data.name`` that selects the dataset.
    check: its option check (see :class:`Dataset`), or None.
    domain_options: its options that name cached classifiers (see :class:`Dataset`).

  Returns:
    A decorator that registers the loader and returns it unchanged.

  Raises:
    ValueError: (from the decorator) if ``name`` is already registered.
  """

  def decorator(loader: LoaderT) -> LoaderT:
    DATASETS.register(name)(Dataset(loader, check, tuple(domain_options)))
    return loader

  return decorator


def _check_options(name: str, data_config: Mapping[str, Any]) -> None:
  """Runs the dataset's option check on ``options`` and on ``eval_options`` over them."""
  dataset = DATASETS.get(name)
  if dataset.check is None:
    return
  defaults = {k: p.default for k, p in dataset.options().items() if p.default is not p.empty}
  options = dict(data_config.get("options") or {})
  for section, values in (("options", options),
                          ("eval_options", {**options, **dict(data_config.get("eval_options")
                                                              or {})})):
    try:
      dataset.check(**{**defaults, **values})
    except DataError as e:
      raise ConfigError(f"data.{section} of {name!r}: {e}") from None


def validate(data_config: Mapping[str, Any]) -> None:
  """Raises ConfigError for an unknown dataset, an unknown option or an impossible value.

  Args:
    data_config: the config's ``data`` section.
  """
  name = data_config.get("name")
  require(name in DATASETS,
          f"Unknown data.name={name!r}; valid names: {', '.join(DATASETS.names())}.")
  valid = DATASETS.get(name).options()
  for section in ("options", "eval_options"):
    for key in dict(data_config.get(section) or {}):
      require(key in valid, f"Unknown key data.{section}.{key} for dataset {name!r}; it takes: "
              f"{', '.join(valid) or 'no options'}.")
  _check_options(name, data_config)
  require(data_config.get("prefetch", 0) >= 0,
          f"data.prefetch must be >= 0, got {data_config.get('prefetch')}.")


def load(data_config: Mapping[str, Any], split: str,
         overrides: Mapping[str, Any] | None = None) -> Source:
  """Opens ``split`` of the dataset that ``data_config`` (the config's data section) names.

  ``overrides`` replace some of ``data_config.options`` (e.g. ``eval_options``).
  ``data_config.tfds_data_dir`` goes to the loaders that read TFDS data.

  Args:
    data_config: the config's ``data`` section.
    split: the split to open (e.g. 'train', 'test').
    overrides: options that replace some of ``data_config.options``.

  Returns:
    The split's random-access source.
  """
  dataset = DATASETS.get(data_config["name"])
  options = {**dict(data_config.get("options") or {}), **dict(overrides or {})}
  if "tfds_data_dir" in dataset.parameters():
    options["tfds_data_dir"] = data_config.get("tfds_data_dir")
  return dataset.loader(split, **options)


def load_eval(data_config: Mapping[str, Any]) -> Source:
  """The held-out real data of evaluation: ``eval_split`` with ``eval_options`` applied."""
  return load(data_config, data_config["eval_split"], data_config.get("eval_options"))


def _spell(value: Any) -> Any:
  """An option's value as ``cache_tag`` compares it: sequences as tuples, one name bare."""
  if isinstance(value, list):
    value = tuple(value)
  if isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], str):
    value = value[0]  # One attribute, spelled as a sequence or not.
  return value


def cache_tag(data_config: Mapping[str, Any]) -> str:
  """A name for classifiers trained on this dataset: its name plus its domain options.

  E.g. ``biased_mnist-attribute=color-num_colors=3``: classifiers trained for the colour
  and the digit-group variants must not share a cache directory. Options at their
  loader's default are left out (so a config that spells out ``attribute='digit_group'``
  and a command that omits it name the same classifier), as are options that only pick
  rows (proportions, ref_fraction, subset, seed).

  Args:
    data_config: the config's ``data`` section.

  Returns:
    The tag, e.g. ``'mnist_5k'`` or ``'biased_mnist-attribute=color-num_colors=3'``.
  """
  name = data_config["name"]
  dataset = DATASETS.get(name)
  options = dict(data_config.get("options") or {})
  defaults = {k: p.default for k, p in dataset.parameters().items()}
  parts = [name]
  for key in dataset.domain_options:
    value = _spell(options.get(key, defaults.get(key)))
    if value == defaults.get(key):
      continue  # A default, spelled out or not, names the same classifier.
    if isinstance(value, tuple):
      # Digits run together (digits=01234); names are joined (attribute=Black_Hair+Male).
      value = ("+" if any(isinstance(v, str) for v in value) else "").join(
          str(v) for v in value)
    if "/" in str(value) or os.sep in str(value):  # A path names no directory: its hash.
      value = hashlib.sha256(str(value).encode()).hexdigest()[:12]
    parts.append(f"{key}={value}")
  return "-".join(parts)
