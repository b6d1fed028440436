"""The one fit routine of fairgen's auxiliary classifiers.

The metric backbones and attribute classifiers (``train_classifier``, used by
``tools/train_classifier.py``) and the density-ratio classifier of importance weighting
(``fairgen.fairness.density_ratio``) all train through ``fit``: softmax cross-entropy on
batches a caller-supplied iterator draws, optional random translation, dropout, and an
optax optimizer, in one jitted step whose randomness is ``fold_in(rng, step)``. They differ
only in how batches are drawn (per-epoch permutations here; balanced reference/biased
halves there) and in their optimizer.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairgen import data
from fairgen import privacy as privacy_lib
from fairgen.classifiers import backbones
from fairgen.privacy import dpsgd

_METRIC_WINDOW = 50  # ``fit`` returns the metrics of the last this many steps.


def random_translate(images: jax.Array, rng: jax.Array, max_shift: int) -> jax.Array:
  """Translates each image by up to ``max_shift`` pixels (edge padding, random crop)."""
  n, h, w, _ = images.shape
  pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
  padded = jnp.pad(images, pad, mode="edge")
  offsets = jax.random.randint(rng, (n, 2), 0, 2 * max_shift + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

  return jax.vmap(crop)(padded, offsets)


def logits_of(out: Any, num_classes: int | None = None) -> jax.Array:
  """The float32 logits of a classifier output: the array itself or its ``logits`` entry.

  Raises:
    ValueError: for a dict without ``logits``, or logits that are not ``[N, num_classes]``.
  """
  if isinstance(out, Mapping):
    if "logits" not in out:
      raise ValueError(f"The model returned a dict without 'logits' (keys {sorted(out)}); "
                       "return [N, C] logits or a dict with a 'logits' entry.")
    out = out["logits"]
  if num_classes is not None and (out.ndim != 2 or out.shape[-1] != num_classes):
    raise ValueError(f"The model must return [N, {num_classes}] logits, got shape "
                     f"{out.shape}; build it with {num_classes} output classes.")
  return out.astype(jnp.float32)


def classification_step(state: dict[str, Any], images: jax.Array, labels: jax.Array,
                        rng: jax.Array, *, model: nn.Module,
                        optimizer: optax.GradientTransformation, max_shift: int,
                        num_classes: int | None = None
                        ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One optimizer step on softmax cross-entropy; randomness is fixed by (rng, step).

  Returns the new state and ``{'loss', 'correct'}``, ``correct`` being per example.
  """
  rng = jax.random.fold_in(rng, state["step"])
  aug_rng, dropout_rng = jax.random.split(rng)
  if max_shift:
    images = random_translate(images, aug_rng, max_shift)

  def loss_fn(params):
    logits = logits_of(model.apply({"params": params}, images, train=True,
                                   rngs={"dropout": dropout_rng}), num_classes)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.argmax(logits, -1) == labels

  (loss, correct), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt = optimizer.update(grads, state["opt"], state["params"])
  state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
           "opt": opt}
  return state, {"loss": loss, "correct": correct}


def private_classification_step(
    state: dict[str, Any], images: jax.Array, labels: jax.Array, mask: jax.Array,
    scale: jax.Array, rng: jax.Array, *, model: nn.Module,
    optimizer: optax.GradientTransformation, max_shift: int, privacy: privacy_lib.DpSettings,
    num_classes: int | None = None) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """``classification_step`` by DP-SGD (``fairgen.privacy.dpsgd.private_gradient``).

  ``images``/``labels`` are a padded Poisson batch, ``mask`` 1 on its sampled rows and
  ``scale`` in [0, 1] multiplies each clipped gradient (class weights). Each example gets
  its own augmentation and dropout keys. Returns the new state and ``{'loss', 'correct',
  'mask', 'label', ...}``, ``loss`` the mean over sampled rows, the others per row.
  """
  rng = jax.random.fold_in(rng, state["step"])

  def example_loss(params, example, key):
    image, label = example
    aug_key, dropout_key = jax.random.split(key)
    image = image[None]
    if max_shift:
      image = random_translate(image, aug_key, max_shift)
    logits = logits_of(model.apply({"params": params}, image, train=True,
                                   rngs={"dropout": dropout_key}), num_classes)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, label[None])[0]
    return loss, {"loss": loss, "correct": jnp.argmax(logits[0]) == label}

  grads, out, stats = dpsgd.dp_gradient(example_loss, state["params"], (images, labels), rng,
                                        privacy, mask, scale)
  updates, opt = optimizer.update(grads, state["opt"], state["params"])
  state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
           "opt": opt}
  return state, {"loss": dpsgd.masked_mean(out["loss"], mask), "correct": out["correct"],
                 "mask": mask, "label": labels, **stats}


def poisson_batches(get: Any, settings: privacy_lib.DpSettings, seed: int,
                    scale: np.ndarray | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
  """``(images, labels, mask, scale)`` batches by Poisson sampling (``data.PoissonSampler``):
  each of ``settings.num_examples`` examples joins a step's batch with probability
  ``settings.sampling_rate``, padded to ``settings.batch_size`` rows. ``get(indices)``
  returns ``(images, labels)``; ``scale`` ``[N]`` in [0, 1] (default 1) is per example."""
  sampler = data.PoissonSampler(settings.num_examples, settings.batch_size,
                                settings.sampling_rate, seed)
  step = 0
  while True:
    idx, mask = sampler.indices(step), sampler.mask(step)
    images, labels = get(idx)
    rows = np.ones(len(idx), np.float32) if scale is None else scale[idx].astype(np.float32)
    yield np.asarray(images, np.float32), np.asarray(labels, np.int32), mask, rows
    step += 1


def fit(model: nn.Module, optimizer: optax.GradientTransformation, state: dict[str, Any],
        rng: jax.Array, batches: Iterator[tuple[np.ndarray, np.ndarray]], steps: int, *,
        max_shift: int = 0, num_classes: int | None = None, log_every: int = 0,
        privacy: privacy_lib.DpSettings | None = None
        ) -> tuple[dict[str, Any], list[dict[str, np.ndarray]]]:
  """Runs ``steps`` steps of ``classification_step`` on ``(images, labels)`` from ``batches``.

  Args:
    model: the Flax classifier; ``apply(..., train=True, rngs={'dropout': r})``.
    optimizer: its optimizer.
    state: ``{'step', 'params', 'opt'}`` (``opt = optimizer.init(params)``).
    rng: the base key; step ``s`` uses ``fold_in(rng, s)``.
    batches: yields one ``(images, int labels)`` pair per step; with ``privacy``,
      ``(images, labels, mask, scale)`` (``poisson_batches``).
    steps: optimizer steps.
    max_shift: random translation of NHWC images by up to this many pixels (0: none).
    num_classes: if given, the logits' checked width.
    log_every: print the loss every this many steps (0: never).
    privacy: train by DP-SGD with these settings (``private_classification_step``).

  Returns:
    The final state and the host metrics (``loss``, per-example ``correct``; with
    ``privacy`` also per-row ``mask`` and ``label``) of the last 50 steps.
  """
  if privacy is None:
    step_fn = functools.partial(classification_step, model=model, optimizer=optimizer,
                                max_shift=max_shift, num_classes=num_classes)
  else:
    dpsgd.check_no_batch_stats(state, "classifier")
    step_fn = functools.partial(private_classification_step, model=model,
                                optimizer=optimizer, max_shift=max_shift, privacy=privacy,
                                num_classes=num_classes)
  step_fn = jax.jit(step_fn, donate_argnums=0)
  recent = []  # Device arrays: read once at the end, not synchronised every step.
  for step in range(steps):
    images, labels, *masking = next(batches)
    state, metrics = step_fn(state, np.asarray(images, np.float32), labels, *masking, rng)
    recent = (recent + [metrics])[-_METRIC_WINDOW:]
    if log_every and (step + 1) % log_every == 0:
      print(f"step {step + 1}/{steps}: loss {float(metrics['loss']):.4f} "
            f"train acc {float(_accuracy(metrics)):.3f}", flush=True)
  return state, jax.device_get(recent)


def _accuracy(metrics: Mapping[str, Any]) -> float:
  """The fraction correct of a step's metrics (over its sampled rows, for DP batches)."""
  if "mask" in metrics:
    return float(np.sum(metrics["correct"] * metrics["mask"]) /
                 max(float(np.sum(metrics["mask"])), 1.0))
  return float(np.mean(metrics["correct"]))


def _epoch_batches(source: Any, label_key: str, num_classes: int, batch_size: int,
                   seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Batches from per-epoch permutations of ``source``, dropping each epoch's remainder."""
  n = len(source)
  order_rng = np.random.default_rng(seed)
  order, position = order_rng.permutation(n), 0
  while True:
    if position + batch_size > n:  # Drop the remainder: one batch shape, one compile.
      order, position = order_rng.permutation(n), 0
    # Sorted indices read a lazily decoded source in order; the batch's loss is a mean.
    batch = source.get(np.sort(order[position:position + batch_size]))
    position += batch_size
    yield batch["image"], _checked_labels(batch, label_key, num_classes)


def _checked_labels(batch: Mapping[str, np.ndarray], label_key: str, num_classes: int
                    ) -> np.ndarray:
  labels = _labels(batch, label_key)
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"{label_key!r} values must be in [0, {num_classes}), got "
                     f"[{labels.min()}, {labels.max()}]; check num_classes.")
  return labels


def _labels(batch: Mapping[str, np.ndarray], label_key: str) -> np.ndarray:
  if label_key not in batch:
    raise ValueError(f"The source has no {label_key!r} key; it has {sorted(batch)}.")
  return np.asarray(batch[label_key], np.int32).reshape(-1)


def evaluate_accuracy(backbone: backbones.Backbone, source: Any, label_key: str = "label") -> float:
  """The backbone's top-1 accuracy on every example of ``source``."""
  correct = 0
  for start in range(0, len(source), backbone.chunk_size):
    batch = source.get(np.arange(start, min(start + backbone.chunk_size, len(source))))
    predicted = np.argmax(backbone.probs(batch["image"]), axis=-1)
    correct += int(np.sum(predicted == _labels(batch, label_key)))
  return correct / len(source)


def init_state(model: nn.Module, optimizer: optax.GradientTransformation, rngs: Any,
               example: Any, **kwargs: Any) -> dict[str, Any]:
  """``fit``'s initial state ``{'step', 'params', 'opt'}`` for inputs shaped like ``example``.

  Built in one jitted call: an eager Flax ``init`` compiles every initializer separately.
  ``kwargs`` (e.g. ``train=False``) are passed to ``model.init`` as static arguments.
  """
  def make(rngs: Any, example: Any) -> dict[str, Any]:
    params = model.init(rngs, example, **kwargs)["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": optimizer.init(params)}

  return jax.jit(make)(rngs, example)


def train_classifier(train_source: Any, test_source: Any, *, label_key: str = "label",
                     num_classes: int | None = None, steps: int = 1000,
                     batch_size: int = 64, lr: float = 2e-3, width: int = 32,
                     feature_dim: int = 128, dropout: float = 0.25, seed: int = 0,
                     augment: bool = True, max_shift: int | None = None,
                     log_every: int = 0, arch: str = "cnn",
                     blocks: tuple[int, ...] = (2, 2, 2, 2),
                     privacy: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
  """Trains a ``Classifier`` with Adam (cosine-decayed lr) and measures test accuracy.

  Batches are drawn without replacement from per-epoch permutations of ``train_source``;
  the permutations, initialisation, dropout and augmentation all derive from ``seed``, so
  a run is deterministic.

  Args:
    train_source: a fairgen source (``len`` and ``get(indices) -> dict``) with ``image``
      float32 NHWC in [-1, 1] and an int ``label_key`` array.
    test_source: a source of the same kind; accuracy is measured on all of it.
    label_key: the key to predict, e.g. ``label`` or ``attr``.
    num_classes: number of classes; defaults to ``train_source.spec.num_classes`` when
      ``label_key`` is ``label``.
    steps: optimizer steps.
    batch_size: examples per step.
    lr: peak Adam learning rate.
    width: ``Classifier.width``.
    feature_dim: ``Classifier.feature_dim``.
    dropout: ``Classifier.dropout``.
    seed: the run's seed.
    augment: translate training images randomly by up to ``max_shift`` pixels.
    max_shift: the largest translation, in pixels; by default 2, or 1 for images with a
      side under 16 pixels (2 of 8 pixels would cut off the strokes of a small digit).
    log_every: print the running train loss every this many steps (0: never).
    arch: 'cnn' (``Classifier``) or 'resnet' (``ResNetClassifier``: ``width`` channels in
      its first stage, ``blocks`` per stage; its features are 8 x ``width``, so
      ``feature_dim`` does not apply).
    blocks: the ResNet's basic blocks per stage.
    privacy: train by DP-SGD: a privacy section (``fairgen.privacy.DEFAULTS``' keys, e.g.
      ``{'target_epsilon': 1.0, 'expected_batch_size': 64}``), Poisson batches padded to
      ``batch_size``. Its resolved mechanism and the epsilon spent go to ``info['privacy']``.

  Returns:
    ``(params, info)``: the trained parameters and a JSON-serialisable dict with the
    dataset, label key, num_classes, image_shape, test_accuracy, steps, hyperparameters
    and the architecture (what ``classifier_backbone`` and ``save_classifier`` need).
  """
  if num_classes is None:
    if label_key != "label":
      raise ValueError(f"Pass num_classes for label_key={label_key!r}.")
    num_classes = train_source.spec.num_classes
  probe = train_source.get(np.arange(1))
  image_shape = tuple(int(s) for s in probe["image"].shape[1:])
  batch_size = min(batch_size, len(train_source))
  if max_shift is None:
    max_shift = 2 if min(image_shape[:2]) >= 16 else 1
  max_shift = max_shift if augment else 0
  arch = _architecture(arch, int(num_classes), width, feature_dim, dropout, blocks)
  model = backbones.classifier_model(arch)
  optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps))
  init_rng, base = jax.random.split(jax.random.key(seed))
  state = init_state(model, optimizer, init_rng, jnp.zeros((1, *image_shape)))
  start_time = time.perf_counter()
  dp = None
  if privacy is None:
    batches = _epoch_batches(train_source, label_key, int(num_classes), batch_size, seed)
  else:
    dp = privacy_lib.resolve_section(privacy, len(train_source), batch_size, steps)

    def get(indices):
      batch = train_source.get(indices)
      return batch["image"], _checked_labels(batch, label_key, int(num_classes))

    batches = poisson_batches(get, dp, seed)
  state, _ = fit(model, optimizer, state, base, batches, steps, max_shift=max_shift,
                 log_every=log_every, privacy=dp)
  params = jax.device_get(state["params"])
  info = _record(train_source, test_source, label_key, int(num_classes), image_shape, arch,
                 steps, time.perf_counter() - start_time,
                 {"batch_size": batch_size, "lr": lr, "seed": seed, "augment": bool(augment),
                  "max_shift": max_shift, "optimizer": "adam, cosine decay"})
  if dp is not None:
    info["privacy"] = {**dp.mechanism(), "epsilon": dp.epsilon(steps)}
  info["test_accuracy"] = evaluate_accuracy(backbones.classifier_backbone(params, info),
                                            test_source, label_key)
  return params, info


def _architecture(kind: str, num_classes: int, width: int, feature_dim: int, dropout: float,
                  blocks: tuple[int, ...]) -> dict[str, Any]:
  """The classifier's architecture record (``backbones.classifier_model`` builds it); a
  ResNet's features are 8 x ``width``, so ``feature_dim`` does not apply to it."""
  if kind == "resnet":
    feature_dim = 8 * int(width)
  arch = {"kind": kind, "num_classes": num_classes, "width": int(width),
          "feature_dim": int(feature_dim), "dropout": float(dropout)}
  if kind == "resnet":
    arch["blocks"] = [int(b) for b in blocks]
  return arch


def _record(train_source: Any, test_source: Any, label_key: str, num_classes: int,
            image_shape: tuple[int, ...], arch: dict[str, Any], steps: int, seconds: float,
            hyperparameters: dict[str, Any]) -> dict[str, Any]:
  """The JSON-ready record of a trained classifier (``test_accuracy`` still None)."""
  spec = getattr(train_source, "spec", None)
  return {
      "format_version": backbones.FORMAT_VERSION,
      "dataset": spec.name if spec is not None else None,
      "label_key": label_key,
      "num_classes": num_classes,
      "image_shape": list(image_shape),
      "test_accuracy": None,
      "num_train": len(train_source),
      "num_test": len(test_source),
      "train_steps": int(steps),
      "train_seconds": round(seconds, 2),
      "hyperparameters": hyperparameters,
      "architecture": arch,
  }


