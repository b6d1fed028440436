"""Biased datasets with a small balanced reference set (Choi et al. 2020, ``dataset_splits.py``).

"Fair Generative Modeling via Weak Supervision" trains a generator on a large *biased*
dataset, in which one group of a sensitive attribute is under-represented, plus a small
*balanced reference* dataset that tells the model what the target distribution looks like.
This module builds both from any dataset with a per-example group id, and provides the
MNIST versions used to study the method offline:

- ``attribute='digit_group'``: the group is 0 for digits in ``digits`` (default 0-4) and 1
  otherwise. The group is a function of the digit, so group and shape are entangled.
- ``attribute='color'``: every digit is drawn in one of ``num_colors`` colours of a fixed
  palette on a black background, and the colour is the group. Colours are dealt per digit
  class in equal shares, so the group is independent of the shape.

Choi et al. hard-code the split sizes per dataset (e.g. 135,012 biased CelebA examples).
``make_bias_split`` instead solves for the largest biased set the data allows, keeps the
group proportions exact rather than approximate, and draws every set with a seeded
permutation instead of taking the first examples of each group.
"""

from __future__ import annotations

import fractions
import math
from typing import Sequence

import numpy as np

from fairgen.data import base
from fairgen.data import offline
from fairgen.data import registry
from fairgen.data import tfds_datasets

ATTRIBUTES = ("digit_group", "color")
# 'all': every row of the split; 'balanced': the largest exactly group-balanced subset of it
# (for attribute classifiers and for real reference data in evaluation).
SUBSETS = ("biased", "reference", "union", "all", "balanced")

# Stroke colours as RGB in [0, 1]. The order is part of the dataset's definition: group g
# is drawn in PALETTE[g].
PALETTE = (
    ("red", (1.0, 0.0, 0.0)),
    ("green", (0.0, 1.0, 0.0)),
    ("blue", (0.0, 0.0, 1.0)),
    ("yellow", (1.0, 1.0, 0.0)),
    ("magenta", (1.0, 0.0, 1.0)),
    ("cyan", (0.0, 1.0, 1.0)),
    ("orange", (1.0, 0.5, 0.0)),
    ("purple", (0.5, 0.0, 1.0)),
    ("white", (1.0, 1.0, 1.0)),
    ("grey", (0.5, 0.5, 0.5)),
)

# Denominators above this are treated as a float that cannot be met exactly.
_MAX_DENOMINATOR = 10_000


def num_groups(attribute: str, num_colors: int = 2) -> int:
  """The number of groups of ``attribute`` ('digit_group' or 'color')."""
  if attribute == "digit_group":
    return 2
  if attribute == "color":
    _check_num_colors(num_colors)
    return num_colors
  raise base.DataError(
      f"Unknown bias attribute {attribute!r}; valid attributes: {', '.join(ATTRIBUTES)}.")


def _check_num_colors(num_colors: int) -> None:
  if not 2 <= num_colors <= len(PALETTE):
    raise base.DataError(
        f"num_colors must be between 2 and {len(PALETTE)} (the palette's size), "
        f"got {num_colors}.")


def digit_group(labels: np.ndarray, digits: Sequence[int] = (0, 1, 2, 3, 4)) -> np.ndarray:
  """Group ids of digit labels: 0 for a digit in ``digits``, 1 otherwise.

  Args:
    labels: int array of digit labels.
    digits: the digits that form group 0.

  Returns:
    int32 array of group ids, the shape of ``labels``.
  """
  return np.where(np.isin(labels, np.asarray(list(digits))), 0, 1).astype(np.int32)


def balanced_assignment(labels: np.ndarray, num_values: int, seed: int) -> np.ndarray:
  """Assigns each example one of ``num_values`` values, in equal shares within each label.

  Within every label the values are dealt as evenly as possible (counts differ by at most
  one) in a seeded random order, so the assigned value is independent of the label, not
  just in expectation but in the empirical counts.

  Args:
    labels: int array of labels, shape [N].
    num_values: how many values to deal.
    seed: seed of the random order.

  Returns:
    int32 array of values in [0, num_values), shape [N].
  """
  rng = np.random.default_rng(seed)
  out = np.empty(len(labels), np.int32)
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    # A random offset spreads each label's remainder over different values.
    start = rng.integers(num_values)
    values = (np.arange(len(idx)) + start) % num_values
    out[idx] = rng.permutation(values)
  return out


def colorize(images: np.ndarray, colors: np.ndarray) -> np.ndarray:
  """Draws grayscale digits in colour: the stroke takes the colour, the background stays black.

  A pixel of intensity ``t`` in [0, 1] (``t = (x + 1) / 2`` for ``x`` in [-1, 1]) becomes
  ``t * PALETTE[colour]``, rescaled to [-1, 1], so background (``x = -1``) stays -1 in
  every channel.

  Args:
    images: float [N, H, W, 1] in [-1, 1].
    colors: int [N] palette indices.

  Returns:
    float32 [N, H, W, 3] in [-1, 1].
  """
  palette = np.asarray([rgb for _, rgb in PALETTE], np.float32)
  intensity = (images.astype(np.float32) + 1.0) / 2.0  # [N, H, W, 1]
  rgb = intensity * palette[colors][:, None, None, :]
  return np.clip(2.0 * rgb - 1.0, -1.0, 1.0).astype(np.float32)


def _exact_proportions(proportions: Sequence[float]) -> list[fractions.Fraction]:
  """The proportions as fractions; raises DataError unless they form a distribution."""
  if len(proportions) < 2:
    raise base.DataError(f"Need proportions for at least 2 groups, got {list(proportions)}.")
  fracs = []
  for p in proportions:
    if not 0.0 <= float(p) <= 1.0:
      raise base.DataError(f"Proportions must lie in [0, 1], got {list(proportions)}.")
    frac = fractions.Fraction(float(p)).limit_denominator(_MAX_DENOMINATOR)
    if abs(float(frac) - float(p)) > 1e-9:
      raise base.DataError(
          f"Proportion {p} is not a fraction with denominator <= {_MAX_DENOMINATOR}, so no "
          f"dataset size gives it exactly; round it (e.g. to 3 decimals).")
    fracs.append(frac)
  if sum(fracs) != 1:
    raise base.DataError(f"Proportions must sum to 1, got {list(proportions)} "
                         f"(sum {float(sum(fracs))}).")
  return fracs


def _round_half_up(x: float) -> int:
  # Python's round() rounds halves to even; sizes should not depend on that parity.
  return int(math.floor(x + 0.5))


def _sizes(fracs: Sequence[fractions.Fraction], biased_size: int,
           ref_fraction: float) -> tuple[list[int], int]:
  """Per-group biased counts and the per-group reference count for ``biased_size``."""
  counts = [int(f * biased_size) for f in fracs]  # Exact: biased_size is a multiple.
  per_group_ref = _round_half_up(ref_fraction * biased_size / len(fracs))
  if ref_fraction > 0:
    # A reference set that rounds to nothing would fail much later, inside training.
    per_group_ref = max(per_group_ref, 1)
  return counts, per_group_ref


def _shortfall(needed: Sequence[int], available: np.ndarray) -> int | None:
  """The first group that needs more examples than exist, or None."""
  for g, (n, a) in enumerate(zip(needed, available)):
    if n > a:
      return g
  return None


def _solve_biased_size(fracs: Sequence[fractions.Fraction], ref_fraction: float,
                       available: np.ndarray, unit: int) -> int:
  """The largest multiple of ``unit`` whose biased and reference sets fit in the data.

  Raises DataError naming the bottleneck group when not even ``unit`` examples fit.
  """
  for size in range(unit * (int(available.sum()) // unit), 0, -unit):
    counts, per_ref = _sizes(fracs, size, ref_fraction)
    if _shortfall([c + per_ref for c in counts], available) is None:
      return size
  # Not even the smallest exact split fits. It needs ``unit`` examples, so some group is
  # short whether or not the data holds ``unit`` examples in all.
  counts, per_ref = _sizes(fracs, unit, ref_fraction)
  needed = [c + per_ref for c in counts]
  group = _shortfall(needed, available)
  raise base.DataError(
      f"Group {group} is too small for any biased split with proportions "
      f"{[float(f) for f in fracs]} and ref_fraction {ref_fraction}: the smallest exact "
      f"split ({unit} biased examples) needs {needed[group]} examples of group {group}, "
      f"and only {available[group]} exist.")


def make_bias_split(attr: np.ndarray, proportions: Sequence[float], ref_fraction: float,
                    seed: int, biased_size: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Splits examples into a biased set and a disjoint balanced reference set.

  The recipe of Choi et al. (2020): a large *biased* set in which group ``g`` makes up
  exactly ``proportions[g]`` of the examples, and a small *balanced* reference set with the
  same number of examples of every group. Within each group the examples are drawn by a
  seeded permutation: the reference set takes the first ones, the biased set the next ones.

  Sizes: the biased set has ``B`` examples, group ``g`` exactly ``proportions[g] * B`` of
  them, so ``B`` must be a multiple of the common denominator of the proportions (10 for
  (0.9, 0.1)). The reference set has ``r = round(ref_fraction * B / G)`` examples per group
  (``G`` groups), i.e. ``G * r`` in all: the balanced size nearest ``ref_fraction * B``,
  which equals ``round(ref_fraction * B)`` whenever that is divisible by ``G`` (an exactly
  balanced set cannot have any other size), and at least 1 per group when
  ``ref_fraction > 0``. Halves round up.

  Args:
    attr: int group ids in [0, G), shape [N]; ``G = len(proportions)``.
    proportions: target share of each group in the biased set; sums to 1. Zero shares are
      allowed (the group then appears in the reference set only).
    ref_fraction: size of the reference set relative to the biased set (Choi et al. use
      0.1, 0.25, 0.5 and 1.0).
    seed: seed of the permutations; the split is a pure function of the arguments.
    biased_size: ``B``; None means the largest ``B`` the data allows alongside its
      reference set.

  Returns:
    ``(biased_idx, reference_idx)``: sorted int64 indices into ``attr``, disjoint.

  Raises:
    DataError: for invalid proportions or sizes, or when a group has fewer examples than
      the requested sizes need (the message names the group, the need and the supply).
  """
  attr = np.asarray(attr)
  fracs = _exact_proportions(proportions)
  g = len(fracs)
  if attr.ndim != 1 or len(attr) == 0:
    raise base.DataError(f"attr must be a non-empty 1-D array, got shape {attr.shape}.")
  if not np.issubdtype(attr.dtype, np.integer) or attr.min() < 0 or attr.max() >= g:
    raise base.DataError(
        f"attr must hold integer group ids in [0, {g}) for {g} proportions, got "
        f"dtype {attr.dtype} and values in [{attr.min()}, {attr.max()}].")
  if ref_fraction < 0:
    raise base.DataError(f"ref_fraction must be >= 0, got {ref_fraction}.")
  available = np.bincount(attr, minlength=g)
  unit = math.lcm(*(f.denominator for f in fracs))
  if biased_size is None:
    biased_size = _solve_biased_size(fracs, ref_fraction, available, unit)
  elif biased_size <= 0 or biased_size % unit:
    raise base.DataError(
        f"biased_size must be a positive multiple of {unit} for the proportions "
        f"{list(proportions)} to be exact, got {biased_size}.")
  counts, per_ref = _sizes(fracs, biased_size, ref_fraction)
  needed = [c + per_ref for c in counts]
  group = _shortfall(needed, available)
  if group is not None:
    raise base.DataError(
        f"Group {group} is too small: a biased set of {biased_size} with proportions "
        f"{list(proportions)} and a balanced reference set of {g} x {per_ref} need "
        f"{needed[group]} examples of group {group} ({counts[group]} biased + {per_ref} "
        f"reference), but only {available[group]} exist.")
  rng = np.random.default_rng(seed)
  biased, reference = [], []
  for k in range(g):
    perm = rng.permutation(np.flatnonzero(attr == k))
    reference.append(perm[:per_ref])
    biased.append(perm[per_ref:per_ref + counts[k]])
  return (np.sort(np.concatenate(biased)).astype(np.int64),
          np.sort(np.concatenate(reference)).astype(np.int64))


def select_subset(attr: np.ndarray, subset: str, proportions: Sequence[float],
                  ref_fraction: float, seed: int, biased_size: int | None = None,
                  groups: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The rows of one subset of a bias split, and which of them belong to the reference set.

  Args:
    attr: int group ids of every row of the split, shape [N].
    subset: one of ``SUBSETS``: 'biased', 'reference', 'union' (both), 'all' (every row)
      or 'balanced' (the largest subset with exactly equal group counts, drawn with
      ``seed``).
    proportions, ref_fraction, seed, biased_size: as in ``make_bias_split`` (unused by
      'all' and 'balanced').
    groups: the number of groups (default ``len(proportions)``).

  Returns:
    ``(rows, is_ref)``: sorted int64 row indices and an int32 flag per row (1 for rows of
    the reference set; all 0 for 'all' and 'balanced').
  """
  if subset not in SUBSETS:
    raise base.DataError(f"Unknown subset {subset!r}; valid subsets: {', '.join(SUBSETS)}.")
  groups = groups or len(proportions)
  if subset == "all":
    rows = np.arange(len(attr), dtype=np.int64)
    return rows, np.zeros(len(rows), np.int32)
  if subset == "balanced":
    uniform = [fractions.Fraction(1, groups)] * groups
    counts = np.bincount(np.asarray(attr), minlength=groups)
    size = groups * int(counts.min())
    if size == 0:
      raise base.DataError(f"A group has no examples, so no balanced subset exists "
                           f"(group counts {counts.tolist()}).")
    rows, _ = make_bias_split(attr, [float(f) for f in uniform], 0.0, seed, size)
    return rows, np.zeros(len(rows), np.int32)
  biased, reference = make_bias_split(attr, proportions, ref_fraction, seed, biased_size)
  rows = {"biased": biased, "reference": reference,
          "union": np.sort(np.concatenate([biased, reference]))}[subset]
  return rows, np.isin(rows, reference).astype(np.int32)


def _check_proportions(attribute: str | tuple[str, ...], groups: int,
                       proportions: Sequence[float]) -> None:
  if len(proportions) != groups:
    raise base.DataError(
        f"attribute={attribute!r} has {groups} groups, but {len(proportions)} proportions "
        f"were given: {list(proportions)}.")


@registry.register("biased_mnist",
                   domain_options=("attribute", "num_colors", "digits", "color_seed"))
def biased_mnist(split: str, attribute: str = "digit_group",
                 proportions: Sequence[float] = (0.9, 0.1), ref_fraction: float = 0.25,
                 num_colors: int = 2, subset: str = "biased", seed: int = 0,
                 biased_size: int | None = None,
                 digits: Sequence[int] = (0, 1, 2, 3, 4),
                 color_seed: int = 0) -> base.ArraySource:
  """A biased split of the offline MNIST digits (``mnist_5k``) with its reference set.

  Args:
    split: the ``mnist_5k`` split to draw from: 'train', 'test' or 'all'.
    attribute: 'digit_group' (group 0 = ``digits``) or 'color' (group = stroke colour).
    proportions: group shares of the biased set, one per group (see ``num_groups``).
    ref_fraction: reference-set size relative to the biased set.
    num_colors: palette size for ``attribute='color'``.
    subset: one of ``SUBSETS`` (see ``select_subset``).
    seed: seed of the biased/reference split.
    biased_size: biased-set size; None for the largest the split allows.
    digits: the digits of group 0 for ``attribute='digit_group'``.
    color_seed: seed of the colour assignment. It is part of the dataset's definition, so
      it is separate from ``seed``: drawing a different split does not recolour the digits.

  Returns:
    An ArraySource with arrays 'image' (float32 [N, 28, 28, C] in [-1, 1], C = 3 for
    'color', else 1), 'label' (int32 digit), 'attr' (int32 group) and 'is_ref' (int32, 1
    for reference rows), ordered by the rows' position in ``split``.

  Raises:
    DataError: for an unknown attribute or subset, proportions that do not match the
      number of groups, or a group too small for the requested sizes.
  """
  groups = num_groups(attribute, num_colors)
  if subset not in SUBSETS:
    raise base.DataError(f"Unknown subset {subset!r}; valid subsets: {', '.join(SUBSETS)}.")
  if subset not in ("all", "balanced"):
    _check_proportions(attribute, groups, proportions)
  source = offline.mnist_5k(split)
  images, labels = source.arrays["image"], source.arrays["label"]
  if attribute == "color":
    attr = balanced_assignment(labels, num_colors, color_seed)
    images = colorize(images, attr)
  else:
    attr = digit_group(labels, digits)
  rows, is_ref = select_subset(attr, subset, proportions, ref_fraction, seed, biased_size,
                               groups)
  spec = base.DataSpec("biased_mnist", images.shape[1:], source.spec.num_classes, groups)
  return base.ArraySource(spec, {"image": images[rows], "label": labels[rows],
                                 "attr": attr[rows], "is_ref": is_ref})


# Choi et al.'s CelebA settings (ermongroup/fairgen, ``src/dataset_splits.py``); their
# ``perc`` (0.1, 0.25, 0.5, 1.0) is ``ref_fraction``. The 'multi' proportions are the ones
# the reference code marks "true proportions used in paper" (``get_density_ratios.py``) for
# groups 0-3 (group = 2 * Black_Hair + Male, the code's labelling: other-hair female,
# other-hair male, black-hair female, black-hair male); its biased-set counts, 26,216 /
# 24,878 / 3,784 / 5,122 of 60,000, round to 0.437 / 0.415 / 0.063 / 0.085.
CHOI_CELEB_A = {
    "90_10": {"attribute": "Male", "proportions": (0.9, 0.1)},
    "80_20": {"attribute": "Male", "proportions": (0.8, 0.2)},
    "multi": {"attribute": ("Black_Hair", "Male"),
              "proportions": (0.436, 0.415, 0.064, 0.085)},
}


def group_ids(bits: np.ndarray) -> np.ndarray:
  """Mixed-radix group ids of k binary attributes, the first attribute most significant.

  ``group = sum_j bits[:, j] * 2 ** (k - 1 - j)``: for ``('Black_Hair', 'Male')`` that is
  ``2 * Black_Hair + Male`` (0: neither, 1: male without black hair, 2: black-haired
  female, 3: black-haired male), Choi et al.'s labelling. One attribute is its own id.

  Args:
    bits: 0/1 array [N, k].

  Returns:
    int32 array [N] of ids in [0, 2**k).
  """
  bits = np.asarray(bits, np.int64)
  weights = 2 ** np.arange(bits.shape[1] - 1, -1, -1, dtype=np.int64)
  return (bits @ weights).astype(np.int32)


def check_celeb_a_options(attribute: str | Sequence[str] = "Male",
                          proportions: Sequence[float] = (0.9, 0.1), subset: str = "biased",
                          label_attribute: str | None = None,
                          **_: object) -> tuple[str, ...]:
  """Checks ``biased_celeb_a``'s group options; returns the k attribute names (2**k groups).

  Raises:
    DataError: for an unknown attribute or subset, or proportions that are not one per
      group (the message names the valid attributes or the group count).
  """
  names = tfds_datasets.check_celeb_a_attributes(attribute)
  if label_attribute is not None:
    tfds_datasets.check_celeb_a_label(label_attribute)
  if subset not in SUBSETS:
    raise base.DataError(f"Unknown subset {subset!r}; valid subsets: {', '.join(SUBSETS)}.")
  groups = 2 ** len(names)
  if subset not in ("all", "balanced"):
    _check_proportions(attribute if isinstance(attribute, str) else names, groups,
                       proportions)
  return names


@registry.register("biased_celeb_a", check=check_celeb_a_options,
                   domain_options=("attribute", "image_size"))
def biased_celeb_a(split: str, attribute: str | Sequence[str] = "Male",
                   proportions: Sequence[float] = (0.9, 0.1), ref_fraction: float = 0.25,
                   subset: str = "biased", seed: int = 0, biased_size: int | None = None,
                   label_attribute: str | None = None, tfds_data_dir: str | None = None,
                   image_size: int = 64) -> base.SubsetSource:
  """A biased split of TFDS CelebA (where prepared), grouped by binary attributes.

  Choi et al.'s settings (``CHOI_CELEB_A``): one attribute, ``attribute='Male'`` (group 1
  where it is true) at 90/10 or 80/20, or several, ``attribute=('Black_Hair', 'Male')``:
  four intersectional groups, ``group = 2 * Black_Hair + Male`` (``group_ids``). Reading
  the groups decodes no image (``tfds_datasets.celeb_a_attributes``).

  Args:
    split: the TFDS split ('train', 'validation', 'test').
    attribute: the CelebA attribute of two groups, or k attributes of ``2**k`` groups
      (the first one most significant in the group id), as a sequence or joined by '+'
      ('Black_Hair+Male', for string-typed config fields on the command line).
    proportions: group shares of the biased set, ``2**k`` of them, in group-id order.
    ref_fraction, subset, seed, biased_size: as in ``biased_mnist``.
    label_attribute: the binary attribute used as ``label``. Default: the first of
      ``attribute``: the attribute itself for one, and for several the most significant
      one (``label = attr // 2**(k-1)``), so that the single attribute is the case k = 1.
      Name an attribute outside ``attribute`` for a label that does not follow the groups.
    tfds_data_dir: where the array_record CelebA is prepared.
    image_size: side of the centre-cropped, resized images.

  Returns:
    A source with 'image', 'label', 'attr' and 'is_ref'.

  Raises:
    DataError: for an unknown attribute or subset, proportions that are not one per
      group, data that is not prepared, or a group too small for the requested sizes.
  """
  names = check_celeb_a_options(attribute, proportions, subset, label_attribute)
  groups = 2 ** len(names)
  source = tfds_datasets.celeb_a(split, tfds_data_dir, image_size=image_size,
                                 label_attribute=label_attribute or names[0])
  attr = group_ids(tfds_datasets.celeb_a_attributes(split, tfds_data_dir, names))
  rows, is_ref = select_subset(attr, subset, proportions, ref_fraction, seed, biased_size,
                               groups)
  spec = base.DataSpec("biased_celeb_a", source.spec.image_shape, 2, groups)
  return base.SubsetSource(source, rows, {"attr": attr[rows], "is_ref": is_ref}, spec)
