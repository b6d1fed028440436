"""TFDS datasets: CIFAR-10 and CelebA under mock data, CelebA groups, no-decode attributes.

``tfds.testing.mock_data`` generates decoded records (it never decodes a JPEG), so the test
that attribute reading decodes no image reads real array_record files with real JPEGs,
written offline by ``fairgen.data.tfds_fakes``.
"""

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from fairgen import config as config_lib
from fairgen import data
from fairgen.data import bias
from fairgen.data import tfds_datasets
from fairgen.data import tfds_fakes

HAIR_SEX = ("Black_Hair", "Male")


def _records(name, split, n):
  source = tfds.data_source(name, split=split, download=False)
  return [source[i] for i in range(n)]


def test_cifar10_under_mock_data_maps_uint8_pixels_to_unit_range():
  with tfds.testing.mock_data(num_examples=10):
    train = data.load({"name": "cifar10"}, "train")
    test = data.load({"name": "cifar10"}, "test")
    records = _records("cifar10", "train", 10)
    batch = train.get(np.array([0, 7]))
  assert (len(train), len(test)) == (10, 10)
  assert train.spec.image_shape == (32, 32, 3) and train.spec.num_classes == 10
  assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.float32
  for row, i in enumerate((0, 7)):
    pixels = records[i]["image"]
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
    for y, x, c in ((0, 0, 0), (31, 31, 2), (5, 17, 1)):
      # By hand: v in [0, 255] -> v / 127.5 - 1.
      assert batch["image"][row, y, x, c] == pytest.approx(pixels[y, x, c] / 127.5 - 1,
                                                          abs=1e-7)
    np.testing.assert_array_equal(batch["image"][row][pixels == 0], -1.0)
    assert batch["label"][row] == records[i]["label"]
  assert batch["label"].dtype == np.int32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_celeb_a_under_mock_data_is_the_centre_140_crop_resized_to_64():
  with tfds.testing.mock_data(num_examples=3):
    source = data.load({"name": "celeb_a"}, "train")
    smiling = data.load({"name": "celeb_a", "options": {"image_size": 32,
                                                        "label_attribute": "Smiling"}}, "train")
    record = _records("celeb_a", "train", 2)[1]
    got, got32 = source.get(np.array([1])), smiling.get(np.array([1]))
  pixels = record["image"]
  assert pixels.shape == (218, 178, 3)
  crop = pixels[39:179, 19:159]  # (218 - 140) / 2 = 39 rows, (178 - 140) / 2 = 19 columns.
  for image, size in ((got["image"][0], 64), (got32["image"][0], 32)):
    resized = np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))
    np.testing.assert_allclose(image, resized / 127.5 - 1.0, rtol=0, atol=1e-6)
  assert got["label"][0] == int(record["attributes"]["Male"])
  assert got32["label"][0] == int(record["attributes"]["Smiling"])


def test_groups_are_the_mixed_radix_index_of_the_attributes():
  n = 48
  with tfds.testing.mock_data(num_examples=n):
    two = data.load({"name": "biased_celeb_a", "options": {
        "attribute": HAIR_SEX, "subset": "all"}}, "train")
    three = data.load({"name": "biased_celeb_a", "options": {
        "attribute": ["Black_Hair", "Male", "Smiling"], "subset": "all"}}, "train")
    one = data.load({"name": "biased_celeb_a", "options": {"subset": "all"}}, "train")
    labels = two.get(np.arange(n))["label"]
    attributes = [r["attributes"] for r in _records("celeb_a", "train", n)]
  hair = np.array([int(a["Black_Hair"]) for a in attributes])
  male = np.array([int(a["Male"]) for a in attributes])
  smiling = np.array([int(a["Smiling"]) for a in attributes])
  assert (two.spec.num_groups, three.spec.num_groups, one.spec.num_groups) == (4, 8, 2)
  assert two.spec.num_classes == 2
  # Choi et al.'s labelling: 0 = (hair 0, male 0), 1 = (0, 1), 2 = (1, 0), 3 = (1, 1).
  np.testing.assert_array_equal(two.columns["attr"], 2 * hair + male)
  np.testing.assert_array_equal(three.columns["attr"], 4 * hair + 2 * male + smiling)
  np.testing.assert_array_equal(one.columns["attr"], male)
  # The label defaults to the first (most significant) attribute.
  np.testing.assert_array_equal(labels, hair)
  assert len(set(two.columns["attr"].tolist())) == 4  # 48 random rows hit every group.


def test_four_group_bias_split_has_exactly_the_requested_proportions():
  proportions = (0.4, 0.3, 0.2, 0.1)
  with tfds.testing.mock_data(num_examples=1200):
    union = data.load({"name": "biased_celeb_a", "options": {
        "attribute": HAIR_SEX, "proportions": proportions, "ref_fraction": 0.2,
        "subset": "union"}}, "train")
  attr, is_ref = union.columns["attr"], union.columns["is_ref"]
  biased = np.bincount(attr[is_ref == 0], minlength=4)
  size = biased.sum()
  assert size % 10 == 0 and size > 400
  np.testing.assert_array_equal(biased, np.round(np.array(proportions) * size).astype(int))
  ref = np.bincount(attr[is_ref == 1], minlength=4)
  assert np.all(ref == ref[0]) and ref[0] == int(np.floor(0.2 * size / 4 + 0.5))


def test_choi_settings_and_group_options_validate():
  for setting in bias.CHOI_CELEB_A.values():
    data.validate({"name": "biased_celeb_a", "options": setting})
    assert sum(setting["proportions"]) == pytest.approx(1.0)
    assert len(setting["proportions"]) == 2 ** len(
        tfds_datasets.check_celeb_a_attributes(setting["attribute"]))
  for spelling in (["Black_Hair", "Male"], "Black_Hair+Male"):  # '+': for the command line.
    data.validate({"name": "biased_celeb_a", "options": {"attribute": spelling,
                                                         "proportions": [0.25] * 4}})
    assert tfds_datasets.check_celeb_a_attributes(spelling) == HAIR_SEX
  bad = [({"attribute": ("Black_Hair", "Mail")}, "no attribute 'Mail'.*Black_Hair, Blond_Hair"),
         ({"attribute": HAIR_SEX}, "has 4 groups, but 2 proportions"),
         ({"label_attribute": "Beard"}, "no attribute 'Beard' \\(label_attribute\\)"),
         ({"attribute": ("Male", "Male"), "subset": "all"}, "repeated"),
         ({"attribute": (), "subset": "all"}, "at least one"),
         ({"label_attribute": "Black_Hair+Male"}, "must be one attribute")]
  for options, message in bad:
    with pytest.raises(config_lib.ConfigError, match=message) as e:
      data.validate({"name": "biased_celeb_a", "options": options})
    assert "\n" not in str(e.value) and str(e.value).startswith("data.options")
  with pytest.raises(config_lib.ConfigError, match="eval_options.*2 groups, but 4"):
    data.validate({"name": "biased_celeb_a", "options": {"proportions": [0.25] * 4,
                                                         "subset": "all"},
                   "eval_options": {"subset": "biased"}})
  with pytest.raises(config_lib.ConfigError, match="no attribute 'male'"):
    data.validate({"name": "celeb_a", "options": {"label_attribute": "male"}})
  assert tfds_datasets.CELEB_A_ATTRIBUTES == tuple(
      tfds.builder("celeb_a").info.features["attributes"].keys())
  assert data.cache_tag({"name": "biased_celeb_a", "options": {"attribute": HAIR_SEX}}) == (
      "biased_celeb_a-attribute=Black_Hair+Male")
  assert data.cache_tag({"name": "biased_celeb_a", "options": {"attribute": ["Male"]}}) == (
      "biased_celeb_a")
  assert data.cache_tag({"name": "biased_celeb_a",
                         "options": {"attribute": "Black_Hair+Male"}}) == (
      "biased_celeb_a-attribute=Black_Hair+Male")


@pytest.fixture(scope="module")
def celeb_a_files(tmp_path_factory):
  """A prepared array_record CelebA with real JPEGs: 24 train and 8 test records."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  tfds_fakes.write_celeb_a(data_dir, {"train": 24, "test": 8})
  return data_dir


@pytest.fixture
def image_decodes(monkeypatch):
  """Counts the JPEG decodes of TFDS's Image feature."""
  calls = []
  decode = tfds.features.Image.decode_example_np

  def spy(self, example):
    calls.append(1)
    return decode(self, example)

  monkeypatch.setattr(tfds.features.Image, "decode_example_np", spy)
  return calls


def test_reading_attributes_decodes_no_image(celeb_a_files, image_decodes, monkeypatch):
  bits = tfds_datasets.celeb_a_attributes("train", celeb_a_files, HAIR_SEX)
  assert not image_decodes
  records = tfds.data_source("celeb_a", split="train", data_dir=celeb_a_files,
                             download=False)
  want = [[int(r["attributes"][a]) for a in HAIR_SEX]
          for r in (records[i] for i in range(len(records)))]
  assert len(image_decodes) == 24  # The spy sees TFDS's decoding.
  np.testing.assert_array_equal(bits, want)
  # Where a record cannot be parsed directly, TFDS deserializes it, its image skipped.
  monkeypatch.setattr(tfds_datasets, "_attributes_from_proto", lambda *_: None)
  image_decodes.clear()
  np.testing.assert_array_equal(
      tfds_datasets.celeb_a_attributes("test", celeb_a_files, HAIR_SEX),
      [[int(r["attributes"][a]) for a in HAIR_SEX] for r in tfds.data_source(
          "celeb_a", split="test", data_dir=celeb_a_files, download=False,
          decoders={"image": tfds.decode.SkipDecoding()})])
  assert not image_decodes


def test_biased_celeb_a_from_files_decodes_only_the_images_it_serves(celeb_a_files,
                                                                     image_decodes):
  source = data.load({"name": "biased_celeb_a", "tfds_data_dir": celeb_a_files,
                      "options": {"attribute": HAIR_SEX, "subset": "all"}}, "train")
  assert not image_decodes and len(source) == 24
  batch = source.get(np.array([3, 0]))
  assert len(image_decodes) == 2
  assert batch["image"].shape == (2, 64, 64, 3) and batch["attr"].max() < 4
  np.testing.assert_array_equal(batch["label"], batch["attr"] // 2)


def test_offline_cifar10_fails_fast_without_downloading(tmp_path, monkeypatch):
  calls = []
  data_source = tfds.data_source

  def spy(*args, **kwargs):
    calls.append(kwargs)
    if kwargs.get("download") is not False:
      raise RuntimeError("would download")  # Fails at once instead of for ~205 s.
    return data_source(*args, **kwargs)

  monkeypatch.setattr(tfds, "data_source", spy)
  for data_dir in (str(tmp_path), None):
    start = time.perf_counter()
    with pytest.raises(data.DataError) as e:
      data.load({"name": "cifar10", "tfds_data_dir": data_dir}, "train")
    assert time.perf_counter() - start < 5
    message = str(e.value)
    assert "\n" not in message and "'cifar10'" in message and "array_record" in message
    assert "--config.data.name=<mnist_5k, digits>" in message
  assert [c["download"] for c in calls] == [False, False]
