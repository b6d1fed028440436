"""TFDS-backed datasets, read through ``tfds.data_source`` (array_record, no TensorFlow).

They work where the data is already prepared in ``data.tfds_data_dir`` in the array_record
format (``tfds build mnist --file_format=array_record``, on a machine with internet). Nothing
is downloaded at run time: offline, they fail with one clear error naming the offline
alternatives.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from fairgen.data import base

OFFLINE_ALTERNATIVES = "mnist_5k, digits"


def _open(tfds_name: str, split: str, data_dir: str | None) -> Any:
  import tensorflow_datasets as tfds  # Imported lazily: only TFDS datasets need it.
  try:
    records = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    size = len(records)
  except Exception as e:  # TFDS raises many types here; all mean "not usable as is".
    raise base.DataError(
        f"TFDS dataset {tfds_name!r} (split {split!r}) is not prepared in the array_record "
        f"format under data.tfds_data_dir={data_dir!r}: {type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}. "
        f"Prepare it on a machine with internet (`tfds build {tfds_name} "
        f"--file_format=array_record --data_dir=DIR`) and pass --config.data.tfds_data_dir=DIR, "
        f"or use an offline dataset: --config.data.name=<{OFFLINE_ALTERNATIVES}>.") from None
  if size == 0:
    raise base.DataError(f"TFDS dataset {tfds_name!r}: split {split!r} is empty.")
  return records


def _image_decoder(max_value: float = 255.0,
                   crop_resize: tuple[int, int] | None = None,
                   label: Callable[[Mapping[str, Any]], int] | None = None
                   ) -> Callable[[Mapping[str, Any]], dict[str, np.ndarray]]:
  """Decodes one TFDS record into fairgen's example dict."""

  def decode(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    image = np.asarray(record["image"])
    if crop_resize is not None:
      from PIL import Image  # Only CelebA needs resizing.
      crop, size = crop_resize
      h, w = image.shape[:2]
      top, left = (h - crop) // 2, (w - crop) // 2
      image = image[top:top + crop, left:left + crop]
      image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    lab = label(record) if label is not None else int(record["label"])
    return {"image": base.to_unit_range(image, max_value), "label": np.int32(lab)}

  return decode


def _simple(tfds_name: str, spec: base.DataSpec):

  def load(split: str, tfds_data_dir: str | None = None) -> base.MappedSource:
    return base.MappedSource(spec, _open(tfds_name, split, tfds_data_dir), _image_decoder())

  load.__doc__ = f"TFDS {tfds_name!r} as {spec.image_shape} images in [-1, 1]."
  return load


mnist = _simple("mnist", base.DataSpec("mnist", (28, 28, 1), 10))
fashion_mnist = _simple("fashion_mnist", base.DataSpec("fashion_mnist", (28, 28, 1), 10))
cifar10 = _simple("cifar10", base.DataSpec("cifar10", (32, 32, 3), 10))


def celeb_a(split: str, tfds_data_dir: str | None = None, image_size: int = 64,
            label_attribute: str = "Male") -> base.MappedSource:
  """CelebA, centre-cropped to 140x140 and resized; the label is a binary attribute."""
  spec = base.DataSpec("celeb_a", (image_size, image_size, 3), 2)
  decode = _image_decoder(
      crop_resize=(140, image_size),
      label=lambda r: int(bool(np.asarray(r["attributes"][label_attribute]))))
  return base.MappedSource(spec, _open("celeb_a", split, tfds_data_dir), decode)


def celeb_a_attribute(split: str, tfds_data_dir: str | None, attribute: str) -> np.ndarray:
  """The int32 0/1 values of one CelebA attribute for every record of ``split``."""
  records = _open("celeb_a", split, tfds_data_dir)
  try:
    return np.asarray([bool(np.asarray(records[i]["attributes"][attribute]))
                       for i in range(len(records))], np.int32)
  except KeyError:
    raise base.DataError(f"CelebA has no attribute {attribute!r}.") from None
