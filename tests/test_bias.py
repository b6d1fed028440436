"""Biased/reference splits (Choi et al. 2020) and the biased MNIST variants."""

import fractions
import math

import numpy as np
import pytest
from scipy import stats

from fairgen.data import base
from fairgen.data import bias


def _attr(counts, seed=0):
  """A shuffled group-id array with ``counts[g]`` examples of group g."""
  attr = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
  return np.random.default_rng(seed).permutation(attr)


@pytest.mark.parametrize("counts, proportions, ref_fraction", [
    ((3000, 1000), (0.9, 0.1), 0.25),
    ((2000, 2000), (0.8, 0.2), 0.1),
    ((1500, 900, 700), (0.7, 0.2, 0.1), 0.5),
    ((800, 800, 800, 800), (0.4, 0.3, 0.3, 0.0), 1.0),
    ((600, 600, 600), (1 / 3, 1 / 3, 1 / 3), 0.25),
])
def test_split_is_exact_disjoint_balanced_and_maximal(counts, proportions, ref_fraction):
  attr = _attr(counts)
  g = len(counts)
  biased, ref = bias.make_bias_split(attr, proportions, ref_fraction, seed=0)
  size = len(biased)
  # Exact proportions: integer counts equal to p * B.
  np.testing.assert_allclose(np.bincount(attr[biased], minlength=g) / size, proportions,
                             rtol=0, atol=1e-12)
  # Disjoint, unique, sorted indices.
  assert not set(biased) & set(ref)
  assert len(np.unique(biased)) == size and len(np.unique(ref)) == len(ref)
  assert np.all(np.diff(biased) > 0) and np.all(np.diff(ref) > 0)
  # Balanced reference of the nearest balanced size to ref_fraction * B.
  per_group = np.bincount(attr[ref], minlength=g)
  assert np.all(per_group == per_group[0])
  assert len(ref) == g * int(np.floor(ref_fraction * size / g + 0.5))
  assert abs(len(ref) - ref_fraction * size) <= g / 2
  # Maximal: the next exact size does not fit.
  unit = math.lcm(*(fractions.Fraction(p).limit_denominator(100).denominator
                    for p in proportions))
  with pytest.raises(base.DataError, match="too small"):
    bias.make_bias_split(attr, proportions, ref_fraction, seed=0, biased_size=size + unit)


def test_default_split_size_matches_reference_rounding():
  # 2,000 per group, (0.9, 0.1), ref 0.25: 1.025 B <= 2000 gives B = 1950 (a multiple of
  # 10), and the reference set is round(0.25 * 1950) = 488 = 2 x 244.
  attr = _attr((2000, 2000))
  biased, ref = bias.make_bias_split(attr, (0.9, 0.1), 0.25, seed=3)
  assert (len(biased), len(ref)) == (1950, 488)
  assert np.bincount(attr[biased]).tolist() == [1755, 195]


def test_explicit_size_and_determinism():
  attr = _attr((3000, 1000))
  a = bias.make_bias_split(attr, (0.9, 0.1), 0.25, seed=7, biased_size=1000)
  b = bias.make_bias_split(attr, (0.9, 0.1), 0.25, seed=7, biased_size=1000)
  c = bias.make_bias_split(attr, (0.9, 0.1), 0.25, seed=8, biased_size=1000)
  assert len(a[0]) == 1000 and len(a[1]) == 250
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_too_small_group_names_group_need_and_supply():
  attr = _attr((1000, 40))
  # B = 500: 50 minority + 62.5 -> 63 reference each = 113 needed, 40 exist.
  with pytest.raises(base.DataError, match=r"Group 1 is too small.* need 113 .*only 40 exist"):
    bias.make_bias_split(attr, (0.9, 0.1), 0.25, seed=0, biased_size=500)
  with pytest.raises(base.DataError, match=r"Group 1 is too small.*needs 2 .*only 0 exist"):
    bias.make_bias_split(np.zeros(50, np.int32), (0.5, 0.5), 0.25, seed=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(proportions=(0.8, 0.1)), "sum to 1"),
    (dict(proportions=(0.9, 0.1), biased_size=1005), "multiple of 10"),
    (dict(proportions=(0.9, 0.1, 0.0), attr=np.array([0, 1, 3])), r"in \[0, 3\)"),
    (dict(proportions=(1.2, -0.2)), r"in \[0, 1\]"),
])
def test_invalid_arguments_raise(kwargs, message):
  kwargs = {"attr": _attr((500, 500)), "ref_fraction": 0.25, "seed": 0, **kwargs}
  with pytest.raises(base.DataError, match=message):
    bias.make_bias_split(**kwargs)


def test_digit_group_biased_mnist():
  union = bias.biased_mnist("train", subset="union")
  biased = bias.biased_mnist("train")
  ref = bias.biased_mnist("train", subset="reference")
  assert biased.spec == base.DataSpec("biased_mnist", (28, 28, 1), 10, 2)
  a = union.arrays
  assert set(a) == {"image", "label", "attr", "is_ref"}
  np.testing.assert_array_equal(a["attr"], (a["label"] >= 5).astype(np.int32))
  assert len(union) == len(biased) + len(ref) and a["is_ref"].sum() == len(ref)
  np.testing.assert_array_equal(a["image"][a["is_ref"] == 0], biased.arrays["image"])
  np.testing.assert_array_equal(a["image"][a["is_ref"] == 1], ref.arrays["image"])
  assert np.bincount(biased.arrays["attr"]).tolist() == [1755, 195]  # 2,000 per group.
  assert np.bincount(ref.arrays["attr"]).tolist() == [244, 244]
  assert not biased.arrays["is_ref"].any() and ref.arrays["is_ref"].all()
  # Other digit sets and seeds.
  odd = bias.biased_mnist("test", digits=(1, 3, 5, 7, 9), seed=1).arrays
  np.testing.assert_array_equal(odd["attr"], (odd["label"] % 2 == 0).astype(np.int32))


def test_balanced_assignment_is_independent_of_label():
  labels = np.repeat(np.arange(10), [400, 397, 401, 399, 400, 400, 403, 398, 400, 402])
  colors = bias.balanced_assignment(labels, 3, seed=0)
  table = np.stack([np.bincount(colors[labels == c], minlength=3) for c in range(10)])
  assert np.all(table.max(axis=1) - table.min(axis=1) <= 1)
  assert stats.chi2_contingency(table).pvalue > 0.99
  assert not np.array_equal(colors, bias.balanced_assignment(labels, 3, seed=1))


def test_color_mnist_is_coloured_and_independent_of_shape():
  src = bias.biased_mnist("train", attribute="color", num_colors=3,
                          proportions=(0.5, 0.3, 0.2), subset="union")
  a = src.arrays
  assert src.spec.image_shape == (28, 28, 3) and a["image"].dtype == np.float32
  # Each digit is drawn in its attribute's palette colour: its summed stroke intensity per
  # channel points along that colour's RGB direction (the background adds nothing).
  ink = ((a["image"] + 1.0) / 2.0).sum(axis=(1, 2))  # [N, 3]
  palette = np.asarray([rgb for _, rgb in bias.PALETTE[:3]])
  np.testing.assert_allclose(ink / ink.max(axis=1, keepdims=True), palette[a["attr"]],
                             atol=1e-5)
  # Colour (the attribute) vs digit: no association beyond chance in the union...
  table = np.stack([np.bincount(a["attr"][a["label"] == c], minlength=3) for c in range(10)])
  assert stats.chi2_contingency(table).pvalue > 0.01
  # ... while the digit-group attribute is a function of the digit.
  d = bias.biased_mnist("train", subset="union").arrays
  dig_table = np.stack([np.bincount(d["attr"][d["label"] == c], minlength=2)
                        for c in range(10)])
  assert stats.chi2_contingency(dig_table).pvalue < 1e-100
  # Strokes take the colour: red digits live in the red channel only, and so on.
  palette = np.array([rgb for _, rgb in bias.PALETTE[:3]])
  for g in range(3):
    imgs = a["image"][a["attr"] == g]
    for ch in range(3):
      if palette[g, ch] == 0:
        assert np.all(imgs[..., ch] == -1.0)
      else:
        assert imgs[..., ch].max() == 1.0


def test_colorize_keeps_background_black_and_strokes_coloured():
  gray = np.full((3, 4, 4, 1), -1.0, np.float32)
  gray[:, 1:3, 1:3, 0] = [[1.0, 0.0], [0.5, 1.0]]
  out = bias.colorize(gray, np.array([0, 3, 6]))  # Red, yellow, orange.
  assert out.shape == (3, 4, 4, 3)
  background = gray[..., 0] == -1.0
  assert np.all(out[background] == -1.0)
  np.testing.assert_allclose(out[0, ..., 0], gray[0, ..., 0], atol=1e-6)  # Red channel.
  assert np.all(out[0, ..., 1:] == -1.0)
  np.testing.assert_allclose(out[1, ..., :2], np.repeat(gray[1], 2, -1), atol=1e-6)
  # Orange: green at half the intensity, (t * 0.5) * 2 - 1 for t = 1 is 0.
  assert out[2, 1, 1, 1] == pytest.approx(0.0) and out[2, 1, 1, 2] == -1.0


def test_num_groups_and_loader_errors():
  assert bias.num_groups("digit_group") == 2 and bias.num_groups("color", 5) == 5
  with pytest.raises(base.DataError, match="Unknown bias attribute"):
    bias.num_groups("hair")
  with pytest.raises(base.DataError, match="num_colors"):
    bias.num_groups("color", 1)
  with pytest.raises(base.DataError, match="3 groups, but 2 proportions"):
    bias.biased_mnist("train", attribute="color", num_colors=3)
  with pytest.raises(base.DataError, match="Unknown subset"):
    bias.biased_mnist("train", subset="both")
