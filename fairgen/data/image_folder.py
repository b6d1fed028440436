"""``data.name='image_folder'``: your own images, with optional classes and attributes.

A directory of PNG or JPEG images of any size, grey or colour, optionally in one
subdirectory per class (torchvision's ``ImageFolder`` layout), and optionally a CSV or
JSON-lines file of per-image integer attributes (a ``file`` column with the image's path
relative to the directory, as CelebA's attribute list names its images). Options:

- ``directory``: the images; ``attributes``: the attribute file ('' for none);
- ``label``: the attribute that is the class label ('' : the class subdirectory, or a single
  class); ``groups``: the sensitive attribute(s), comma-separated: several make
  intersectional groups (every combination of their values is a group, and each must have
  examples in the training split);
- ``reference``: a 0/1 attribute marking a balanced reference set (Choi et al. 2020), and
  ``subset``: 'all', 'union' (all, with ``is_ref``: what importance weighting needs),
  'biased' or 'reference';
- ``image_size`` (resize the shorter side, then centre-crop a square) and ``channels`` (1 or
  3); ``test_fraction`` and ``split_seed``: a seeded stratified split by label, unless the
  attribute file has a ``split`` column ('train' or 'test').

Images are decoded and resized once, by worker processes (``fairgen/images.py``), into a
``uint8`` ``.npy`` file under ``$FAIRGEN_CACHE/image_folder/`` that is then memory-mapped:
batches read only their rows, so a folder need not fit in memory, and every later run (and
every process of a job) skips decoding. ``.npy`` because it is one contiguous array that NumPy
maps without a copy and random-reads at disk speed, with no dependency; the key is a hash of
every image's path, size and modification time plus the decoding options, so a changed
folder is decoded afresh, never read stale.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from typing import Any

import numpy as np

from fairgen import images
from fairgen import storage
from fairgen.data import base
from fairgen.data import registry

EXTENSIONS = (".png", ".jpg", ".jpeg")
SUBSETS = ("all", "union", "biased", "reference")


def check_options(directory: str = "", image_size: int = 64, channels: int = 3,
                  test_fraction: float = 0.1, subset: str = "all", reference: str = "",
                  **_: Any) -> None:
  """Raises DataError for impossible options (before any file is read)."""
  if not directory:
    raise base.DataError("data.options.directory must name the folder of images.")
  if not isinstance(image_size, int) or image_size < 4:
    raise base.DataError(f"data.options.image_size must be an integer >= 4, got "
                         f"{image_size!r}.")
  if channels not in (1, 3):
    raise base.DataError(f"data.options.channels must be 1 or 3, got {channels!r}.")
  if not 0 < test_fraction < 1:
    raise base.DataError(f"data.options.test_fraction must be in (0, 1), got {test_fraction}.")
  if subset not in SUBSETS:
    raise base.DataError(f"data.options.subset must be one of {SUBSETS}, got {subset!r}.")
  if subset != "all" and not reference:
    raise base.DataError(f"data.options.subset={subset!r} needs data.options.reference (the "
                         f"0/1 attribute marking the reference set).")


def _image_files(directory: str) -> list[str]:
  """Every image under ``directory`` (relative paths, sorted)."""
  if not os.path.isdir(directory):
    raise base.DataError(f"data.options.directory={directory}: no such directory.")
  found = []
  for root, _, files in os.walk(directory):
    for name in files:
      if name.lower().endswith(EXTENSIONS):
        found.append(os.path.relpath(os.path.join(root, name), directory))
  if not found:
    raise base.DataError(f"data.options.directory={directory} holds no PNG or JPEG images.")
  return sorted(found)


def _read_rows(path: str) -> list[dict[str, Any]]:
  """The attribute file's rows: CSV with a header, or JSON lines."""
  if not os.path.isfile(path):
    raise base.DataError(f"data.options.attributes={path}: no such file.")
  with open(path, newline="") as f:
    if path.endswith((".jsonl", ".json")):
      return [json.loads(line) for line in f if line.strip()]
    return list(csv.DictReader(f))


def _attributes(directory: str, path: str, files: list[str]) -> dict[str, dict[str, Any]]:
  """``{file: its row}``; every image needs a row and every row an image."""
  rows = _read_rows(path)
  by_file = {}
  for i, row in enumerate(rows):
    name = str(row.get("file", ""))
    if name not in files:
      raise base.DataError(f"{path}: row {i + 1} names {name!r}, which is not an image in "
                           f"{directory}.")
    by_file[name] = row
  missing = [f for f in files if f not in by_file]
  if missing:
    raise base.DataError(f"{directory}/{missing[0]} has no row in {path} ({len(missing)} "
                         f"image(s) without one).")
  return by_file


def _column(rows: dict[str, dict[str, Any]], files: list[str], key: str, path: str
            ) -> np.ndarray:
  """Attribute ``key`` of every file as integers."""
  values = []
  for f in files:
    if key not in rows[f]:
      raise base.DataError(f"{path}: no attribute {key!r} (columns: "
                           f"{', '.join(sorted(rows[f]))}).")
    value = rows[f][key]
    try:
      values.append(int(str(value).strip()))
    except ValueError:
      raise base.DataError(f"{path}: attribute {key!r} of {f} is {value!r}, not an "
                           f"integer.") from None
  return np.asarray(values, np.int64)


def _codes(values: np.ndarray) -> tuple[np.ndarray, int]:
  """Values as 0..k-1 codes (in sorted order of the values) and k."""
  uniques, codes = np.unique(values, return_inverse=True)
  return codes.astype(np.int32), len(uniques)


def _cache_path(directory: str, files: list[str], size: int, channels: int,
                cache_dir: str) -> str:
  """Where the decoded images of this folder and these options live (content-keyed)."""
  digest = hashlib.sha256(f"{size}|{channels}|v2".encode())
  for name in files:
    st = os.stat(os.path.join(directory, name))
    digest.update(f"{name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
  root = cache_dir or os.path.join(storage.cache_dir(), "image_folder")
  return os.path.join(os.path.expanduser(root), f"{digest.hexdigest()[:32]}.npy")


def decoded(directory: str, files: list[str], size: int, channels: int, cache_dir: str = "",
            workers: int = 0) -> np.ndarray:
  """All images decoded (``uint8 [N, size, size, channels]``), memory-mapped from the cache;
  decoded on first use by ``workers`` processes (0: one per CPU; ``fairgen.images``)."""
  path = _cache_path(directory, files, size, channels, cache_dir)
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial.npy"
    out = np.lib.format.open_memmap(partial, "w+", np.uint8, (len(files), size, size, channels))
    del out  # The header and the rows' space are on disk; the workers fill the rows.
    try:
      images.decode_into(partial, [os.path.join(directory, f) for f in files], size, channels,
                         workers or os.cpu_count() or 1)
    except images.DecodeError as e:
      os.remove(partial)
      raise base.DataError(str(e)) from None
    os.replace(partial, path)  # Complete, or absent: a killed decode is never read.
  return np.load(path, mmap_mode="r")


class FolderSource:
  """Rows ``index`` of a decoded folder: images as float32 in [-1, 1], read on demand."""

  def __init__(self, spec: base.DataSpec, images: np.ndarray, index: np.ndarray,
               columns: dict[str, np.ndarray]):
    self.spec, self._images, self._index = spec, images, np.asarray(index)
    self._columns = {k: np.asarray(v)[self._index] for k, v in columns.items()}

  def __len__(self) -> int:
    return len(self._index)

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at ``indices``: ``image`` and the label, group and reference columns."""
    indices = np.asarray(indices)
    rows = self._index[indices]
    order = np.argsort(rows, kind="stable")  # The memory map reads fastest in order.
    images = np.empty((len(rows),) + self._images.shape[1:], np.float32)
    images[order] = self._images[rows[order]]
    images /= np.float32(127.5)  # In place: one float32 copy of the batch, no more.
    images -= np.float32(1.0)
    out = {"image": images}
    out.update({k: v[indices] for k, v in self._columns.items()})
    return out


def _labels(files: list[str], rows: Any, label: str, attributes: str
            ) -> tuple[np.ndarray, int]:
  """Class codes: the ``label`` attribute, the class subdirectory, or one class."""
  if label:
    if rows is None:
      raise base.DataError(f"data.options.label={label!r} needs data.options.attributes.")
    return _codes(_column(rows, files, label, attributes))
  parts = [f.split(os.sep)[0] if os.sep in f else "" for f in files]
  return _codes(np.asarray(parts))


def _groups(files: list[str], rows: Any, groups: str, attributes: str
            ) -> tuple[np.ndarray | None, int]:
  """Group codes of ``groups`` (several attributes: every combination of their values)."""
  if not groups:
    return None, 0
  if rows is None:
    raise base.DataError(f"data.options.groups={groups!r} needs data.options.attributes.")
  code, count = np.zeros(len(files), np.int64), 1
  for key in groups.split(","):
    values, k = _codes(_column(rows, files, key.strip(), attributes))
    code, count = code * k + values, count * k
  return code.astype(np.int32), count


def _split_index(files: list[str], rows: Any, labels: np.ndarray, split: str,
                 test_fraction: float, seed: int) -> np.ndarray:
  """The rows of ``split``: the attribute file's ``split`` column, or a seeded stratified
  split by label."""
  if split == "all":
    return np.arange(len(files))
  if rows is not None and "split" in rows[files[0]]:
    given = np.asarray([str(rows[f].get("split", "")).strip() for f in files])
    return np.flatnonzero(given == split)
  train, test = base.stratified_split(labels, test_fraction, seed)
  return {"train": train, "test": test}.get(split, np.zeros(0, np.int64))


@registry.register("image_folder", check=check_options,
                   domain_options=("directory", "attributes", "label", "groups", "image_size",
                                   "channels"))
def image_folder(split: str, directory: str = "", attributes: str = "", label: str = "",
                 groups: str = "", reference: str = "", subset: str = "all",
                 image_size: int = 64, channels: int = 3, test_fraction: float = 0.1,
                 split_seed: int = 0, cache_dir: str = "") -> FolderSource:
  """The ``split`` ('train', 'test' or 'all') of a folder of images (module docstring)."""
  check_options(directory, image_size, channels, test_fraction, subset, reference)
  directory = os.path.expanduser(directory)
  files = _image_files(directory)
  rows = _attributes(directory, attributes, files) if attributes else None
  labels, num_classes = _labels(files, rows, label, attributes)
  attr, num_groups = _groups(files, rows, groups, attributes)
  columns = {"label": labels}
  if attr is not None:
    columns["attr"] = attr
  index = _split_index(files, rows, labels, split, test_fraction, split_seed)
  if reference:
    is_ref = _column(rows, files, reference, attributes) if rows is not None else None
    if is_ref is None or not np.isin(is_ref, (0, 1)).all():
      raise base.DataError(f"data.options.reference={reference!r} must name a 0/1 attribute "
                           f"of data.options.attributes.")
    columns["is_ref"] = is_ref.astype(np.int32)
    if subset in ("biased", "reference"):
      index = index[is_ref[index] == (subset == "reference")]
  if len(index) == 0:
    raise base.DataError(f"{directory}: the {split!r} split (subset {subset!r}) is empty.")
  if attr is not None:
    counts = np.bincount(attr[index], minlength=num_groups)
    if (counts == 0).any():
      raise base.DataError(f"{directory}: group {int(np.argmin(counts))} of "
                           f"data.options.groups={groups!r} has no examples in the {split!r} "
                           f"split (group counts {counts.tolist()}).")
  spec = base.DataSpec("image_folder", (image_size, image_size, channels), num_classes,
                       num_groups)
  return FolderSource(spec, decoded(directory, files, image_size, channels, cache_dir),
                      index, columns)
