"""Datasets: a registry of random-access sources and the deterministic input pipeline."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from fairgen.data import adult_aif360
from fairgen.data import bias
from fairgen.data import offline
from fairgen.data import tabular
from fairgen.data import tfds_datasets
from fairgen.data.base import ArraySource, DataError, DataSpec, Source
from fairgen.data.pipeline import IndexSampler, Loader
from fairgen.registry import Registry

DATASETS: Registry[Callable[..., Source]] = Registry("dataset")
DATASETS.register("mnist_5k")(offline.mnist_5k)
DATASETS.register("digits")(offline.digits)
DATASETS.register("mnist")(tfds_datasets.mnist)
DATASETS.register("fashion_mnist")(tfds_datasets.fashion_mnist)
DATASETS.register("cifar10")(tfds_datasets.cifar10)
DATASETS.register("celeb_a")(tfds_datasets.celeb_a)
DATASETS.register("adult")(tabular.adult)
DATASETS.register("german")(tabular.german)
DATASETS.register("adult_aif360")(adult_aif360.adult_aif360)
DATASETS.register("biased_mnist")(bias.biased_mnist)


def load(data_config: Mapping[str, Any], split: str) -> Source:
  """Opens ``split`` of the dataset that ``data_config`` (the config's data section) names."""
  loader = DATASETS.get(data_config["name"])
  options = dict(data_config.get("options") or {})
  return loader(split, tfds_data_dir=data_config.get("tfds_data_dir"), **options)


__all__ = ["ArraySource", "DATASETS", "DataError", "DataSpec", "IndexSampler", "Loader",
           "Source", "load"]
