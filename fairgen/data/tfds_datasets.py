"""TFDS-backed datasets, read through ``tfds.data_source`` (array_record, no TensorFlow).

They work where the data is already prepared in ``data.tfds_data_dir`` in the array_record
format (``tfds build mnist --file_format=array_record``, on a machine with internet). Nothing
is downloaded at run time: offline, they fail with one clear error naming the offline
alternatives.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fairgen.data import base
from fairgen.data import registry

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


mnist = registry.register("mnist")(
    _simple("mnist", base.DataSpec("mnist", (28, 28, 1), 10)))
fashion_mnist = registry.register("fashion_mnist")(
    _simple("fashion_mnist", base.DataSpec("fashion_mnist", (28, 28, 1), 10)))
cifar10 = registry.register("cifar10")(
    _simple("cifar10", base.DataSpec("cifar10", (32, 32, 3), 10)))


# CelebA's 40 binary attributes, in TFDS's order (``features['attributes']``).
CELEB_A_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young")


def check_celeb_a_attributes(names: str | Sequence[str], what: str = "attribute"
                             ) -> tuple[str, ...]:
  """``names`` (one CelebA attribute or several) as a tuple; DataError names the valid ones.

  Args:
    names: an attribute name, several joined by '+' ('Black_Hair+Male': the spelling a
      string-typed config field takes on the command line), or a non-empty sequence of
      distinct names.
    what: the option's name, for the message.

  Returns:
    The names as a tuple.

  Raises:
    DataError: for an empty sequence, a repeated name or a name CelebA does not have.
  """
  names = tuple(names.split("+")) if isinstance(names, str) else tuple(names)
  if not names:
    raise base.DataError(f"CelebA {what}: needs at least one attribute name.")
  if len(set(names)) != len(names):
    raise base.DataError(f"CelebA {what}={names}: an attribute is repeated.")
  unknown = [n for n in names if n not in CELEB_A_ATTRIBUTES]
  if unknown:
    raise base.DataError(f"CelebA has no attribute {unknown[0]!r} ({what}); valid "
                         f"attributes: {', '.join(CELEB_A_ATTRIBUTES)}.")
  return names


def check_celeb_a_label(label_attribute: str) -> str:
  """``label_attribute``, one CelebA attribute; DataError otherwise."""
  names = check_celeb_a_attributes(label_attribute, "label_attribute")
  if len(names) != 1:
    raise base.DataError(f"CelebA label_attribute={label_attribute!r} must be one "
                         f"attribute (the label is binary).")
  return names[0]


def check_celeb_a_options(label_attribute: str = "Male", **_: object) -> None:
  """Checks ``celeb_a``'s options (its label attribute); raises DataError."""
  check_celeb_a_label(label_attribute)


@registry.register("celeb_a", check=check_celeb_a_options)
def celeb_a(split: str, tfds_data_dir: str | None = None, image_size: int = 64,
            label_attribute: str = "Male") -> base.MappedSource:
  """CelebA, centre-cropped to 140x140 and resized; the label is a binary attribute."""
  label_attribute = check_celeb_a_label(label_attribute)
  spec = base.DataSpec("celeb_a", (image_size, image_size, 3), 2)
  decode = _image_decoder(
      crop_resize=(140, image_size),
      label=lambda r: int(bool(np.asarray(r["attributes"][label_attribute]))))
  return base.MappedSource(spec, _open("celeb_a", split, tfds_data_dir), decode)


def _attributes_from_proto(record: Any, keys: Sequence[str],
                           parse: Callable[[bytes], Any]) -> list[int] | None:
  """The int values of ``keys`` in a serialized ``tf.train.Example``, or None.

  TFDS stores each record as a ``tf.train.Example`` whose flat keys are the feature paths
  ('attributes/Male'), a bool as one int64. Parsing the proto and reading two keys skips
  TFDS's per-feature decoding of all 52 features (10-20x faster, see
  ``celeb_a_attributes``). None where the record is not bytes (``tfds.testing.mock_data``
  hands out decoded dicts) or lacks a key (another storage layout). ``parse`` reads the
  bytes into a ``tf.train.Example`` (TFDS's own copy of the proto).
  """
  if not isinstance(record, (bytes, memoryview)):
    return None
  feature = parse(record).features.feature
  values = []
  for key in keys:
    if key not in feature or len(feature[key].int64_list.value) != 1:
      return None
    values.append(int(feature[key].int64_list.value[0]))
  return values


def celeb_a_attributes(split: str, tfds_data_dir: str | None,
                       names: str | Sequence[str]) -> np.ndarray:
  """The 0/1 values of CelebA attributes for every record of ``split``, in one pass.

  No image is decoded: each stored record is parsed for the requested attributes only
  (``_attributes_from_proto``), or, where that fails, deserialized by TFDS with the image
  left as its encoded bytes (``tfds.decode.SkipDecoding``). Measured on 5,000 synthetic
  records of CelebA's size (9 KB JPEGs, ``tools/bench_tfds_attributes.py``): 20-40 us a
  record, against about 0.4-0.5 ms with SkipDecoding and 1.5 ms decoding every image.

  Args:
    split: the TFDS split ('train', 'validation', 'test').
    tfds_data_dir: where the array_record CelebA is prepared.
    names: one attribute name or several (``CELEB_A_ATTRIBUTES``).

  Returns:
    int32 array [N, len(names)] of 0/1, column j for ``names[j]``.

  Raises:
    DataError: for an unknown attribute or data that is not prepared.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.proto import tf_example_pb2  # Once, not per record.
  names = check_celeb_a_attributes(names)
  records = _open("celeb_a", split, tfds_data_dir)
  # The stored rows, before TFDS deserializes them (records[i] would decode the image).
  stored = records.data_source
  features = records.dataset_info.features
  skip_images = {"image": tfds.decode.SkipDecoding()}
  keys = [f"attributes/{n}" for n in names]
  out = np.empty((len(records), len(names)), np.int32)
  for i in range(len(records)):
    row = stored[i]
    values = _attributes_from_proto(row, keys, tf_example_pb2.Example.FromString)
    if values is None:
      attributes = features.deserialize_example_np(row, decoders=skip_images)["attributes"]
      values = [bool(np.asarray(attributes[n])) for n in names]
    out[i] = values
  return out
