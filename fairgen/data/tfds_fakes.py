"""Prepared TFDS datasets with synthetic records, written offline and without TensorFlow.

``tfds.testing.mock_data`` replaces the reading path: its records are generated arrays, so
no JPEG is ever decoded and TFDS's ``decoders`` need TensorFlow. Tests and benchmarks of
the real reading path (array_record files, JPEG decoding, ``decoders``) need real files:
``write_celeb_a`` writes them with TFDS's own builder, its JPEGs encoded by PIL (TFDS
passes encoded bytes through without TensorFlow).
"""

from __future__ import annotations

import io
from typing import Any, Iterator

import numpy as np

CELEB_A_SHAPE = (218, 178, 3)


def _face_like_jpeg(rng: np.random.Generator, quality: int) -> bytes:
  """A smooth random 218x178 image as JPEG: about 9 KB, the size of CelebA's (7 KB)."""
  from PIL import Image
  small = rng.integers(0, 256, (28, 23, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(small).resize(CELEB_A_SHAPE[1::-1], Image.BICUBIC))
  image = np.clip(image.astype(np.int16) + rng.integers(-6, 7, image.shape), 0, 255)
  buffer = io.BytesIO()
  Image.fromarray(image.astype(np.uint8)).save(buffer, format="jpeg", quality=quality)
  return buffer.getvalue()


def write_celeb_a(data_dir: str, splits: dict[str, int], seed: int = 0,
                  quality: int = 75) -> None:
  """Writes a prepared array_record ``celeb_a`` with random attributes under ``data_dir``.

  ``tfds.data_source('celeb_a', data_dir=data_dir, download=False)`` then reads it as it
  reads the real dataset.

  Args:
    data_dir: the TFDS data directory to write into.
    splits: examples per split, e.g. ``{'train': 100, 'test': 10}``.
    seed: seed of the images and attributes.
    quality: JPEG quality of the images.
  """
  import tensorflow_datasets as tfds
  builder = tfds.builder("celeb_a", data_dir=data_dir, file_format="array_record")
  features = builder.info.features
  names = list(features["attributes"].keys())
  landmarks = list(features["landmarks"].keys())

  def examples(split: str, count: int) -> Iterator[tuple[int, dict[str, Any]]]:
    rng = np.random.default_rng([seed, sorted(splits).index(split)])
    for i in range(count):
      yield i, {"image": _face_like_jpeg(rng, quality),
                "landmarks": {k: int(rng.integers(0, 178)) for k in landmarks},
                "attributes": {k: bool(rng.integers(2)) for k in names},
                "identity": {"Identity_No": int(rng.integers(1, 10178))}}

  # The real builder downloads CelebA; the same builder with generated examples writes
  # the same features, split names and file layout.
  builder._split_generators = lambda _: {s: examples(s, n) for s, n in splits.items()}  # pylint: disable=protected-access
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
