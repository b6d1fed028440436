"""Density-ratio estimation by classification, for importance-weighted fair training.

Choi et al. 2020, "Fair Generative Modeling via Weak Supervision": a small, balanced
*reference* dataset and a large *biased* dataset are drawn from p_ref and p_bias. A binary
classifier c(x) = P(ref | x) trained to tell them apart gives the density ratio through its
odds, w(x) = p_ref(x) / p_bias(x) = c(x) / (1 - c(x)) * (n_bias / n_ref), where the last
factor corrects for the class prior seen in training. ``fit_density_ratio`` trains on
*balanced* batches (half reference, half biased), so that prior is 1/2 whatever the set
sizes and the odds estimate the ratio directly: ``log w(x) = logit_ref(x) - logit_bias(x)``.

The weights, flattened to ``w ** alpha``, multiply the per-example real-data loss of a GAN
discriminator (self-normalised per batch by the objective, not here); reference examples
get weight 1. ``weight_diagnostics`` checks what a weighting does to the group proportions
of the biased set, e.g. that a 90/10 set is reweighted to about 50/50.

Typical use::

  params, info = fit_density_ratio(x_ref, x_bias, Classifier(num_classes=2), steps=2000)
  log_odds = classifier_log_odds(model, params, x_all)
  weights = importance_weights(log_odds, is_ref, alpha=1.0, clip=20.0)
  print(weight_diagnostics(weights, attr, is_ref, num_groups=2))
"""

from __future__ import annotations

import functools
import time
from typing import Any, Iterator

import flax.linen as nn
import jax
import numpy as np
import ml_collections
import optax

from fairgen import parallel
from fairgen import privacy as privacy_lib
from fairgen.classifiers import fit

REF, BIAS = 1, 0  # Class indices: the classifier's logit 1 is "reference".


def ratio_privacy(config: ml_collections.ConfigDict, num_examples: int
                  ) -> privacy_lib.DpSettings | None:
  """The DP-SGD settings of importance weighting's density-ratio classifier: None unless the
  config has a privacy section. Its clip is
  ``privacy.clip_norm``, its noise ``fair.ratio.noise_multiplier``, its Poisson batches
  ``fair.ratio.batch_size`` examples on average (padded by ``privacy.padded_batch_size``)
  from all ``num_examples``."""
  if "privacy" not in config:
    return None
  p = {**privacy_lib.DEFAULTS, **config.privacy.to_dict()}  # A section may give some keys.
  ratio = config.fair.ratio
  expected = int(ratio.batch_size)
  section = {"clip_norm": p["clip_norm"], "noise_multiplier": ratio.noise_multiplier,
             "expected_batch_size": expected, "delta": p["delta"],
             "accountant": p["accountant"]}
  return privacy_lib.resolve_section(section, num_examples,
                                     privacy_lib.padded_batch_size(expected),
                                     int(ratio.steps), prefix="fair.ratio.")


class _IndexStream:
  """Indices drawn from successive seeded permutations of ``range(n)``, across epochs.

  A batch that reaches the end of a permutation continues into the next one, so every
  example is seen equally often and sets smaller than a batch still work.
  """

  def __init__(self, n: int, rng: np.random.Generator):
    self._n, self._rng = n, rng
    self._order, self._position = rng.permutation(n), 0

  def take(self, k: int) -> np.ndarray:
    parts = []
    while k > 0:
      if self._position == self._n:
        self._order, self._position = self._rng.permutation(self._n), 0
      m = min(k, self._n - self._position)
      parts.append(self._order[self._position:self._position + m])
      self._position += m
      k -= m
    return np.concatenate(parts)


def _balanced_batches(x_ref: np.ndarray, x_bias: np.ndarray, half: int, seed: int
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Balanced batches: ``half`` reference (label 1) then ``half`` biased (label 0) examples."""
  ref_rng, bias_rng = np.random.default_rng(seed).spawn(2)
  ref_stream = _IndexStream(len(x_ref), ref_rng)
  bias_stream = _IndexStream(len(x_bias), bias_rng)
  labels = np.concatenate([np.full((half,), REF, np.int32), np.full((half,), BIAS, np.int32)])
  while True:
    yield np.concatenate([x_ref[ref_stream.take(half)], x_bias[bias_stream.take(half)]]), labels


def _check_sets(x_ref: np.ndarray, x_bias: np.ndarray, batch_size: int, steps: int,
                augment_shift: int) -> None:
  if len(x_ref) == 0 or len(x_bias) == 0:
    raise ValueError(f"Both sets need examples, got {len(x_ref)} reference and "
                     f"{len(x_bias)} biased.")
  if x_ref.shape[1:] != x_bias.shape[1:]:
    raise ValueError(f"Reference and biased examples must have the same shape, got "
                     f"{x_ref.shape[1:]} and {x_bias.shape[1:]}.")
  if batch_size < 2 or batch_size % 2:
    raise ValueError(f"batch_size must be even and at least 2 (half reference, half "
                     f"biased), got {batch_size}.")
  if steps < 1:
    raise ValueError(f"steps must be positive, got {steps}.")
  if augment_shift < 0 or (augment_shift and x_ref.ndim != 4):
    raise ValueError(f"augment_shift={augment_shift} needs NHWC images and a shift >= 0, "
                     f"got inputs of shape {x_ref.shape}; pass augment_shift=0 otherwise.")


def fit_density_ratio(x_ref: np.ndarray, x_bias: np.ndarray, model: nn.Module, *,
                      steps: int = 1000, batch_size: int = 64, lr: float = 1e-3,
                      weight_decay: float = 1e-4, seed: int = 0, augment_shift: int = 0,
                      log_every: int = 0, privacy: privacy_lib.DpSettings | None = None
                      ) -> tuple[Any, dict[str, Any]]:
  """Trains ``model`` to tell reference from biased examples, on balanced batches.

  Every step takes ``batch_size // 2`` examples from each set, from seeded per-epoch
  permutations that wrap independently, so the classifier sees a 1/2 prior whatever
  ``len(x_ref) / len(x_bias)`` is and its odds estimate ``p_ref(x) / p_bias(x)`` with no
  prior correction (``classifier_log_odds`` gives their log). The loss is softmax
  cross-entropy, the optimizer AdamW with a cosine-decayed learning rate. The run is
  deterministic given ``seed``: initialisation, dropout and augmentation keys derive from
  ``jax.random.key(seed)`` (folded with the step inside the jitted step) and the batch
  order from ``np.random.default_rng(seed)``.

  Args:
    x_ref: ``[n_ref, ...]`` reference examples (labelled class 1).
    x_bias: ``[n_bias, ...]`` biased examples (class 0), same per-example shape.
    model: a Flax module; ``model.apply({'params': p}, x, train=bool, rngs={'dropout': r})``
      returns ``[N, 2]`` logits or a dict with ``[N, 2]`` ``'logits'``.
    steps: optimizer steps.
    batch_size: examples per step, even: half from each set.
    lr: peak learning rate of the cosine decay.
    weight_decay: AdamW decoupled weight decay (applied to every parameter).
    seed: the run's seed.
    augment_shift: translate NHWC images randomly by up to this many pixels (edge padding
      and a random crop), both sets alike; 0 disables it.
    log_every: print the running train loss every this many steps (0: never).
    privacy: train by DP-SGD (``fit.private_classification_step``) with these settings
      (``num_examples`` = ``n_ref + n_bias``, ``steps`` and their batch size): Poisson
      batches from the union, each biased example's clipped gradient scaled by
      ``n_ref / n_bias`` (or each reference one's by the inverse, whichever is at most 1),
      so the classes weigh equally in expectation and the odds still estimate the ratio.
      The set sizes are treated as public, as N is by the accountant. ``batch_size`` is then
      unused; ``info['privacy']`` holds the mechanism and its epsilon.

  Returns:
    ``(params, info)``: the trained parameters as a NumPy pytree, and a JSON-serialisable
    dict with ``steps``, ``train_seconds``, ``train_loss`` and ``balanced_train_accuracy``
    (both averaged over the last 50 steps' batches; a balanced batch's accuracy is the
    balanced accuracy), ``ref_train_accuracy``, ``bias_train_accuracy``, ``n_ref``,
    ``n_bias``, ``seed`` and ``hyperparameters``.

  Raises:
    ValueError: on empty or mismatched sets, an odd batch size, or augmentation of
      non-image inputs.
  """
  x_ref = np.asarray(x_ref, np.float32)
  x_bias = np.asarray(x_bias, np.float32)
  _check_sets(x_ref, x_bias, batch_size, steps, augment_shift)
  n_ref, n_bias = len(x_ref), len(x_bias)
  if privacy is None:
    half = batch_size // 2
    batches = _balanced_batches(x_ref, x_bias, half, seed)
    balanced_labels = np.repeat(np.array([REF, BIAS], np.int32), half)
    batching = {"batch_size": int(batch_size), "batches": "balanced"}
  else:
    batches = _class_scaled_poisson_batches(x_ref, x_bias, privacy, steps, seed)
    balanced_labels = None
    batching = {"expected_batch_size": privacy.expected_batch_size,
                "batch_size": privacy.batch_size, "batches": "poisson, class-scaled"}
  optimizer = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)
  init_rng, dropout_init_rng, base = jax.random.split(jax.random.key(seed), 3)
  state = fit.init_state(model, optimizer, {"params": init_rng, "dropout": dropout_init_rng},
                         x_ref[:1], train=False)
  start_time = time.perf_counter()
  state, recent = fit.fit(model, optimizer, state, base, batches, steps,
                          max_shift=augment_shift, num_classes=2, log_every=log_every,
                          privacy=privacy)
  params = jax.device_get(state["params"])
  train_seconds = time.perf_counter() - start_time

  # Each class's accuracy over the recent batches' (sampled) rows of that class.
  accuracy = {}
  for name, cls in (("ref", REF), ("bias", BIAS)):
    right = seen = 0.0
    for m in recent:  # DP batches carry their labels and padding mask.
      labels = m["label"] if "label" in m else balanced_labels
      rows = (labels == cls) * m.get("mask", 1.0)
      right += float(np.sum(m["correct"] * rows))
      seen += float(np.sum(rows))
    accuracy[name] = right / max(seen, 1.0)
  info = {
      "steps": int(steps),
      "train_seconds": round(train_seconds, 2),
      "train_loss": float(np.mean([m["loss"] for m in recent])),
      "balanced_train_accuracy": (accuracy["ref"] + accuracy["bias"]) / 2,
      "ref_train_accuracy": accuracy["ref"],
      "bias_train_accuracy": accuracy["bias"],
      "n_ref": n_ref,
      "n_bias": n_bias,
      "seed": int(seed),
      "hyperparameters": {**batching, "lr": float(lr), "weight_decay": float(weight_decay),
                          "augment_shift": int(augment_shift),
                          "optimizer": "adamw, cosine decay"},
  }
  if privacy is not None:
    info["privacy"] = {**privacy_lib.mechanism(privacy),
                       "epsilon": privacy_lib.epsilon(privacy, steps)}
  return params, info


def _class_scaled_poisson_batches(x_ref: np.ndarray, x_bias: np.ndarray,
                                  privacy: privacy_lib.DpSettings, steps: int, seed: int
                                  ) -> Iterator[tuple[np.ndarray, ...]]:
  """DP-SGD's batches of ``fit_density_ratio`` (see its ``privacy`` argument): Poisson
  batches from the union, the larger class's rows scaled down to weigh as the smaller."""
  n_ref, n_bias = len(x_ref), len(x_bias)
  if privacy.num_examples != n_ref + n_bias or privacy.num_steps != steps:
    raise ValueError(f"The DP settings are for {privacy.num_examples} examples and "
                     f"{privacy.num_steps} steps, the fit has {n_ref + n_bias} and {steps}.")
  x = np.concatenate([x_ref, x_bias])
  labels = np.concatenate([np.full(n_ref, REF, np.int32), np.full(n_bias, BIAS, np.int32)])
  scale = np.where(labels == REF, min(1.0, n_bias / n_ref), min(1.0, n_ref / n_bias))
  return fit.poisson_batches(lambda idx: (x[idx], labels[idx]), privacy, seed,
                             scale.astype(np.float32))


@functools.partial(jax.jit, static_argnames="model")
def _log_odds(model: nn.Module, params: Any, x: jax.Array) -> jax.Array:
  logits = fit.logits_of(model.apply({"params": params}, x, train=False), num_classes=2)
  return logits[:, REF] - logits[:, BIAS]


def classifier_log_odds(model: nn.Module, params: Any, x: np.ndarray,
                        batch_size: int = 500) -> np.ndarray:
  """``log c(x) - log(1 - c(x))`` of a ``fit_density_ratio`` classifier, ``[N]`` float32.

  Computed stably as ``logits[:, 1] - logits[:, 0]`` (no softmax, so no saturation), in
  chunks of ``batch_size``; the last chunk is padded, so one shape is compiled. With the
  balanced training of ``fit_density_ratio`` this is the estimated ``log p_ref / p_bias``.

  Args:
    model: the module that was trained.
    params: its parameters.
    x: ``[N, ...]`` examples.
    batch_size: examples per jitted call.

  Returns:
    ``[N]`` float32 log-odds of being a reference example.
  """
  params = jax.device_put(params)  # Once, not once per chunk.
  out = parallel.map_in_chunks(lambda c: _log_odds(model, params, c),
                               (np.asarray(x, np.float32),), batch_size)
  return out.astype(np.float32)


def _is_ref_mask(is_ref: Any, n: int) -> np.ndarray:
  is_ref = np.asarray(is_ref)
  if is_ref.shape != (n,):
    raise ValueError(f"is_ref must have shape ({n},), one flag per example, got "
                     f"{is_ref.shape}.")
  if not np.all((is_ref == 0) | (is_ref == 1)):
    raise ValueError("is_ref must hold only 0 (biased) and 1 (reference); map your labels "
                     "to those two values.")
  return is_ref.astype(bool)


def importance_weights(log_odds: np.ndarray, is_ref: np.ndarray, alpha: float = 1.0,
                       clip: float | None = None) -> np.ndarray:
  """Per-example weights ``w ** alpha`` for biased examples, 1 for reference examples.

  ``w = exp(log_odds)`` estimates ``p_ref(x) / p_bias(x)``; ``alpha`` in [0, 1] flattens it
  (0: no reweighting, 1: full). With ``clip``, each biased weight is then clipped to
  ``[1 / clip, clip]``, which bounds the variance a few confidently-classified examples
  add, at the cost of bias. The weights are not normalised (the objective self-normalises
  them per batch).

  Args:
    log_odds: ``[N]`` log-odds of being a reference example (``classifier_log_odds``).
    is_ref: ``[N]`` 1 for reference examples, 0 for biased ones.
    alpha: the flattening exponent, ``>= 0``.
    clip: ``None`` or a bound ``>= 1``.

  Returns:
    ``[N]`` float32 weights.

  Raises:
    ValueError: on mismatched lengths, non-finite log-odds, ``alpha < 0``, ``clip < 1``,
      or weights that overflow float32.
  """
  log_odds = np.asarray(log_odds, np.float64)
  if log_odds.ndim != 1:
    raise ValueError(f"log_odds must be 1-D ([N]), got shape {log_odds.shape}.")
  ref = _is_ref_mask(is_ref, len(log_odds))
  if not np.all(np.isfinite(log_odds)):
    raise ValueError(f"log_odds has {int(np.sum(~np.isfinite(log_odds)))} non-finite values; "
                     "check the classifier (did training diverge?).")
  if not (np.isfinite(alpha) and alpha >= 0):
    raise ValueError(f"alpha must be finite and >= 0 (0: no reweighting, 1: full), got "
                     f"{alpha}.")
  if clip is not None and not clip >= 1:
    raise ValueError(f"clip must be None or >= 1 (weights are clipped to [1/clip, clip]), "
                     f"got {clip}.")
  weights = np.exp(alpha * log_odds)
  if clip is not None:
    weights = np.clip(weights, 1.0 / clip, clip)
  weights[ref] = 1.0
  if np.any(weights > np.finfo(np.float32).max):
    raise ValueError(f"Weights up to {weights.max():.3g} overflow float32; pass clip (e.g. "
                     "20) or a smaller alpha.")
  return weights.astype(np.float32)


def _proportions(values: np.ndarray) -> list[float | None]:
  total = float(np.sum(values))
  return [float(v) / total if total > 0 else None for v in values]


def weight_diagnostics(weights: np.ndarray, groups: np.ndarray, is_ref: np.ndarray,
                       num_groups: int) -> dict[str, Any]:
  """What a weighting does to the group make-up of the biased set.

  Over the biased examples (``is_ref == 0``): the raw group proportions, the mean weight of
  each group, the *effective* proportions ``sum_{g} w / sum w`` the weighted set has, and
  the effective sample size ``(sum w)^2 / sum w^2`` (how many unweighted examples the
  weighted set is worth). A good weighting brings the effective proportions to the
  reference's, reported beside them when there are reference examples.

  Args:
    weights: ``[N]`` non-negative weights (``importance_weights``).
    groups: ``[N]`` integer group (sensitive attribute) of each example, in
      ``[0, num_groups)``.
    is_ref: ``[N]`` 1 for reference examples, 0 for biased ones.
    num_groups: the number of groups.

  Returns:
    A JSON-serialisable dict: ``n_bias``, ``n_ref``, ``raw_proportions``,
    ``effective_proportions``, ``mean_weight`` (``None`` for a group with no biased
    examples) and ``ref_proportions`` (``None`` without reference examples), lists of
    ``num_groups`` floats; ``ess`` and ``ess_fraction`` (ESS / n_bias); ``max_weight``.

  Raises:
    ValueError: on mismatched lengths, negative or non-finite weights, out-of-range
      groups, or no biased examples.
  """
  weights = np.asarray(weights, np.float64)
  groups = np.asarray(groups)
  if weights.ndim != 1 or groups.shape != weights.shape:
    raise ValueError(f"weights and groups must be 1-D and of one length, got shapes "
                     f"{weights.shape} and {groups.shape}.")
  ref = _is_ref_mask(is_ref, len(weights))
  if not np.all(np.isfinite(weights)) or np.any(weights < 0):
    raise ValueError("weights must be finite and non-negative.")
  if len(groups) and (groups.min() < 0 or groups.max() >= num_groups
                      or not np.all(groups == np.round(groups))):
    raise ValueError(f"groups must be integers in [0, {num_groups}), got values in "
                     f"[{groups.min()}, {groups.max()}]; check num_groups.")
  if np.all(ref):
    raise ValueError("There are no biased examples (is_ref == 0) to diagnose.")
  groups = groups.astype(np.int64)
  w, g = weights[~ref], groups[~ref]
  counts = np.bincount(g, minlength=num_groups).astype(np.float64)
  sums = np.bincount(g, weights=w, minlength=num_groups)
  sum_w, sum_w2 = float(np.sum(w)), float(np.sum(w * w))
  ess = sum_w**2 / sum_w2 if sum_w2 > 0 else 0.0
  return {
      "n_bias": int(len(w)),
      "n_ref": int(np.sum(ref)),
      "raw_proportions": _proportions(counts),
      "effective_proportions": _proportions(sums),
      "mean_weight": [float(s / c) if c else None for s, c in zip(sums, counts)],
      "ref_proportions": (_proportions(np.bincount(groups[ref], minlength=num_groups))
                          if np.any(ref) else None),
      "ess": float(ess),
      "ess_fraction": float(ess / len(w)),
      "max_weight": float(np.max(w)),
  }
