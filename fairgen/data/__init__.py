"""Datasets: a registry of random-access sources and the deterministic input pipeline.

``registry.py`` holds ``DATASETS``, the ``data`` section's checks (``validate``), opening a
split (``load``, ``load_eval``) and the classifier cache's names (``cache_tag``). Each
dataset registers itself in its own module with ``@registry.register(name, check=...,
domain_options=...)``: its loader's keyword arguments are its options, and its checks and
domain options sit beside it. Adding a dataset is one new file plus its line in the list
below, the one list of the package's dataset modules: importing ``fairgen.data`` imports
them all, so the registry is complete.
"""

from fairgen.data import adult_aif360
from fairgen.data import bias
from fairgen.data import image_folder
from fairgen.data import offline
from fairgen.data import tfds_datasets
from fairgen.data import uci
from fairgen.data.base import (ArraySource, DataError, DataSpec, Source, SubsetSource,
                               column_in_memory, read_column)
from fairgen.data.pipeline import IndexSampler, Loader, PoissonSampler, WeightedSampler
from fairgen.data.registry import DATASETS, cache_tag, load, load_eval, validate

__all__ = ["ArraySource", "DATASETS", "DataError", "DataSpec", "IndexSampler", "Loader",
           "PoissonSampler", "Source", "SubsetSource", "WeightedSampler", "cache_tag",
           "column_in_memory", "load", "load_eval", "read_column", "validate"]
