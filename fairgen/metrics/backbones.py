"""Backbones: the networks whose features and class probabilities the metrics consume.

FID, KID and PRDC take a backbone's penultimate features; Inception Score and per-class
proportions take its class probabilities. Every backbone is loaded through ``BACKBONES``,
a registry from a *kind* to a loader ``(path) -> Backbone``, so callers only ever write
``load_backbone(kind, path)`` and report ``backbone.describe()`` next to every number.

Kinds:
  - ``classifier``: the small convolutional ``fairgen.models.classifier.Classifier``,
    trained on an offline dataset by ``tools/train_classifier.py`` and saved as an Orbax
    checkpoint (``<dir>/params``) plus ``<dir>/backbone.json`` (what it was trained on, its
    held-out accuracy and its hyperparameters).

An ``inception_v3`` kind that reads its weights from a local, user-supplied file (e.g. an
``.npz``) fits the same contract: register a loader that builds a ``Backbone`` from an apply
function ``(variables, images) -> (features, probs)`` and its variables, and every caller
works unchanged.

Images are float32 NHWC in [-1, 1], fairgen's convention throughout.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from fairgen import parallel
from fairgen.models.classifier import Classifier
from fairgen.registry import Registry

# (variables, images [N, H, W, C]) -> (features [N, F], probs [N, C]).
ApplyFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]

DEFAULT_CHUNK = 500
INFO_FILE = "backbone.json"
PARAMS_DIR = "params"
_FORMAT_VERSION = 1
_TRAIN_TOOL = "python tools/train_classifier.py"


class BackboneNotFoundError(FileNotFoundError):
  """A backbone directory or one of its files is missing; the message says how to make it."""


class Backbone:
  """A frozen network that maps images to features and class probabilities.

  Attributes:
    name: the backbone kind (a ``BACKBONES`` name).
    path: where its weights were loaded from (or "" before saving).
    info: what it was trained on: dataset, label key, num_classes, image_shape,
      test_accuracy, train steps and hyperparameters.
    image_shape: the (H, W, C) the backbone accepts.
    feature_dim: length of a feature vector.
    num_classes: length of a probability vector.
    chunk_size: images per jitted call; the last chunk is padded to it, so one shape is
      compiled per backbone.
  """

  def __init__(self, name: str, path: str, info: Mapping[str, Any], apply_fn: ApplyFn,
               variables: Any, *, image_shape: tuple[int, ...], feature_dim: int,
               num_classes: int, chunk_size: int = DEFAULT_CHUNK):
    if chunk_size < 1:
      raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    self.name = name
    self.path = path
    self.info = dict(info)
    self.image_shape = tuple(int(s) for s in image_shape)
    self.feature_dim = int(feature_dim)
    self.num_classes = int(num_classes)
    self.chunk_size = int(chunk_size)
    # On device once, not transferred again by every chunk's call.
    self.variables = jax.device_put(variables)
    self._apply = jax.jit(apply_fn)

  def _check(self, images: Any) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise ValueError(
          f"Backbone {self.name!r} ({self.path or 'unsaved'}) was trained on images of shape "
          f"{self.image_shape} (NHWC, per image), got a batch of shape {images.shape}.")
    return images

  def features_and_probs(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[N, feature_dim]`` and probabilities ``[N, num_classes]`` of ``images``.

    Args:
      images: ``[N, H, W, C]`` float32 in [-1, 1], ``(H, W, C) == self.image_shape``.

    Returns:
      Two float32 NumPy arrays; each probability row sums to one.

    Raises:
      ValueError: if the image shape differs from the one the backbone was trained on.
    """
    images = self._check(images)
    features, probs = parallel.map_in_chunks(lambda x: self._apply(self.variables, x),
                                             (images,), self.chunk_size)
    return features.astype(np.float32), probs.astype(np.float32)

  def features(self, images: Any) -> np.ndarray:
    """Penultimate features ``[N, feature_dim]`` of ``images`` (see features_and_probs)."""
    return self.features_and_probs(images)[0]

  def probs(self, images: Any) -> np.ndarray:
    """Class probabilities ``[N, num_classes]`` of ``images`` (see features_and_probs)."""
    return self.features_and_probs(images)[1]

  def describe(self) -> dict[str, Any]:
    """Which backbone and checkpoint produced a number: kind, path, dataset, accuracy."""
    return {"kind": self.name, "path": self.path, "dataset": self.info.get("dataset"),
            "test_accuracy": self.info.get("test_accuracy")}

  def __repr__(self) -> str:
    return f"Backbone({', '.join(f'{k}={v!r}' for k, v in self.describe().items())})"


BACKBONES: Registry[Callable[[str], Backbone]] = Registry("backbone")


def load_backbone(kind: str, path: str) -> Backbone:
  """Loads the backbone of ``kind`` (a ``BACKBONES`` name) from ``path``."""
  return BACKBONES.get(kind)(path)


def default_classifier_dir(dataset: str, label_key: str = "label") -> str:
  """``$FAIRGEN_CACHE/classifier_<dataset>_<label_key>``; the cache defaults to ~/.cache/fairgen."""
  cache = os.environ.get("FAIRGEN_CACHE") or os.path.join("~", ".cache", "fairgen")
  return os.path.abspath(os.path.expanduser(
      os.path.join(cache, f"classifier_{dataset}_{label_key}")))


def train_command(data_config: Mapping[str, Any], label_key: str = "label",
                  extra_options: Mapping[str, Any] | None = None) -> str:
  """The ``tools/train_classifier.py`` command that trains a classifier for ``data_config``.

  ``extra_options`` add dataset options for training only (e.g. ``subset='balanced'``).
  """
  import shlex  # pylint: disable=g-import-not-at-top
  options = {**dict(data_config.get("options") or {}), **dict(extra_options or {})}
  parts = [_TRAIN_TOOL, f"--dataset={data_config['name']}"]
  if label_key != "label":
    parts.append(f"--label={label_key}")
  for key, value in options.items():
    if isinstance(value, list):
      value = tuple(value)
    text = value if isinstance(value, str) else repr(value)
    parts.append(f"--option {shlex.quote(f'{key}={text}')}")
  return " ".join(parts)


def load_backbone_or_explain(kind: str, path: str, command: str) -> Backbone:
  """``load_backbone``, re-raising a missing backbone with the command that makes it."""
  try:
    return load_backbone(kind, path)
  except BackboneNotFoundError as e:
    message = str(e).split(" Train one with")[0]
    raise BackboneNotFoundError(f"{message} Train one with `{command} --out={path}`.") from None


# --- The "classifier" kind. -------------------------------------------------------------


def classifier_model(arch: Mapping[str, Any]) -> Classifier:
  """The ``Classifier`` of a backbone's ``info['architecture']``."""
  return Classifier(num_classes=int(arch["num_classes"]), width=int(arch["width"]),
                    feature_dim=int(arch["feature_dim"]), dropout=float(arch["dropout"]))


def _classifier_apply(model: Classifier) -> ApplyFn:

  def apply(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    out = model.apply({"params": params}, images, train=False)
    return out["features"], jax.nn.softmax(out["logits"].astype(jnp.float32), axis=-1)

  return apply


def classifier_backbone(params: Any, info: Mapping[str, Any], path: str = "",
                        chunk_size: int = DEFAULT_CHUNK) -> Backbone:
  """Wraps trained ``Classifier`` params and their info dict as a ``Backbone``."""
  arch = info["architecture"]
  return Backbone("classifier", path, info, _classifier_apply(classifier_model(arch)), params,
                  image_shape=tuple(info["image_shape"]), feature_dim=arch["feature_dim"],
                  num_classes=arch["num_classes"], chunk_size=chunk_size)


def random_translate(images: jax.Array, rng: jax.Array, max_shift: int) -> jax.Array:
  """Translates each image by up to ``max_shift`` pixels (edge padding, random crop)."""
  n, h, w, _ = images.shape
  pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
  padded = jnp.pad(images, pad, mode="edge")
  offsets = jax.random.randint(rng, (n, 2), 0, 2 * max_shift + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

  return jax.vmap(crop)(padded, offsets)


def _train_step(state: dict[str, Any], images: jax.Array, labels: jax.Array, rng: jax.Array,
                *, model: Classifier, optimizer: optax.GradientTransformation,
                max_shift: int) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One Adam step on softmax cross-entropy; randomness is fixed by (rng, step)."""
  rng = jax.random.fold_in(rng, state["step"])
  aug_rng, dropout_rng = jax.random.split(rng)
  if max_shift:
    images = random_translate(images, aug_rng, max_shift)

  def loss_fn(params):
    logits = model.apply({"params": params}, images, train=True,
                         rngs={"dropout": dropout_rng})["logits"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)

  (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt = optimizer.update(grads, state["opt"], state["params"])
  state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
           "opt": opt}
  return state, {"loss": loss, "accuracy": acc}


def _labels(batch: Mapping[str, np.ndarray], label_key: str) -> np.ndarray:
  if label_key not in batch:
    raise ValueError(f"The source has no {label_key!r} key; it has {sorted(batch)}.")
  return np.asarray(batch[label_key], np.int32).reshape(-1)


def evaluate_accuracy(backbone: Backbone, source: Any, label_key: str = "label") -> float:
  """The backbone's top-1 accuracy on every example of ``source``."""
  correct = 0
  for start in range(0, len(source), backbone.chunk_size):
    batch = source.get(np.arange(start, min(start + backbone.chunk_size, len(source))))
    predicted = np.argmax(backbone.probs(batch["image"]), axis=-1)
    correct += int(np.sum(predicted == _labels(batch, label_key)))
  return correct / len(source)


def _fit(step_fn: Callable[..., Any], state: dict[str, Any], rng: jax.Array, source: Any,
         label_key: str, num_classes: int, steps: int, batch_size: int, seed: int,
         log_every: int) -> dict[str, Any]:
  """Runs ``steps`` train steps on batches drawn from per-epoch permutations of ``source``."""
  n = len(source)
  order_rng = np.random.default_rng(seed)
  order, position = order_rng.permutation(n), 0
  for step in range(steps):
    if position + batch_size > n:  # Drop the remainder: one batch shape, one compile.
      order, position = order_rng.permutation(n), 0
    # Sorted indices read a lazily decoded source in order; the batch's loss is a mean.
    batch = source.get(np.sort(order[position:position + batch_size]))
    position += batch_size
    labels = _labels(batch, label_key)
    if labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(f"{label_key!r} values must be in [0, {num_classes}), got "
                       f"[{labels.min()}, {labels.max()}]; check num_classes.")
    state, metrics = step_fn(state, np.asarray(batch["image"], np.float32), labels, rng)
    if log_every and (step + 1) % log_every == 0:
      print(f"step {step + 1}/{steps}: loss {float(metrics['loss']):.4f} "
            f"train acc {float(metrics['accuracy']):.3f}", flush=True)
  return state


def train_classifier(train_source: Any, test_source: Any, *, label_key: str = "label",
                     num_classes: int | None = None, steps: int = 1000,
                     batch_size: int = 64, lr: float = 2e-3, width: int = 32,
                     feature_dim: int = 128, dropout: float = 0.25, seed: int = 0,
                     augment: bool = True, max_shift: int | None = None,
                     log_every: int = 0) -> tuple[Any, dict[str, Any]]:
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

  Returns:
    ``(params, info)``: the trained parameters and a JSON-serialisable dict with the
    dataset, label key, num_classes, image_shape, test_accuracy, steps, hyperparameters
    and the architecture (what ``classifier_backbone`` and ``save_classifier`` need).
  """
  if num_classes is None:
    if label_key != "label":
      raise ValueError(f"Pass num_classes for label_key={label_key!r}.")
    num_classes = train_source.spec.num_classes
  spec = getattr(train_source, "spec", None)
  probe = train_source.get(np.arange(1))
  image_shape = tuple(int(s) for s in probe["image"].shape[1:])
  batch_size = min(batch_size, len(train_source))
  if max_shift is None:
    max_shift = 2 if min(image_shape[:2]) >= 16 else 1
  max_shift = max_shift if augment else 0
  arch = {"num_classes": int(num_classes), "width": int(width),
          "feature_dim": int(feature_dim), "dropout": float(dropout)}
  model = classifier_model(arch)
  optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps))
  init_rng, base = jax.random.split(jax.random.key(seed))
  params = model.init(init_rng, jnp.zeros((1, *image_shape)))["params"]
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt": optimizer.init(params)}
  step_fn = jax.jit(
      functools.partial(_train_step, model=model, optimizer=optimizer,
                        max_shift=max_shift),
      donate_argnums=0)

  start_time = time.perf_counter()
  state = _fit(step_fn, state, base, train_source, label_key, int(num_classes), steps,
               batch_size, seed, log_every)
  params = jax.device_get(state["params"])
  train_seconds = time.perf_counter() - start_time

  info = {
      "format_version": _FORMAT_VERSION,
      "dataset": spec.name if spec is not None else None,
      "label_key": label_key,
      "num_classes": int(num_classes),
      "image_shape": list(image_shape),
      "test_accuracy": None,
      "num_train": len(train_source),
      "num_test": len(test_source),
      "train_steps": int(steps),
      "train_seconds": round(train_seconds, 2),
      "hyperparameters": {"batch_size": batch_size, "lr": lr, "seed": seed,
                          "augment": bool(augment), "max_shift": max_shift,
                          "optimizer": "adam, cosine decay"},
      "architecture": arch,
  }
  info["test_accuracy"] = evaluate_accuracy(classifier_backbone(params, info), test_source,
                                            label_key)
  return params, info


def _missing(directory: str, what: str) -> BackboneNotFoundError:
  name = os.path.basename(os.path.normpath(directory))
  dataset = "<dataset>"
  if name.startswith("classifier_") and name.count("_") >= 2:
    dataset = name[len("classifier_"):].rsplit("_", 1)[0]
  return BackboneNotFoundError(
      f"No classifier backbone at {directory}: {what}. Train one with "
      f"`{_TRAIN_TOOL} --dataset={dataset} --out={directory}`.")


def save_classifier(directory: str, params: Any, info: Mapping[str, Any],
                    overwrite: bool = False) -> str:
  """Saves a trained classifier as ``<directory>/params`` (Orbax) + ``backbone.json``.

  ``backbone.json`` is written last, so a directory holding it holds a complete backbone.

  Args:
    directory: where to save; created if missing.
    params: the ``Classifier`` parameters.
    info: the info dict ``train_classifier`` returned.
    overwrite: replace the params and info of an existing non-empty directory.

  Returns:
    The absolute directory.

  Raises:
    FileExistsError: if ``directory`` is not empty and ``overwrite`` is False.
  """
  directory = os.path.abspath(os.path.expanduser(directory))
  if os.path.isdir(directory) and os.listdir(directory):
    if not overwrite:
      raise FileExistsError(
          f"{directory} is not empty; pass overwrite=True (--overwrite) to replace it.")
    # Only what this function writes is removed, never the rest of a mistaken directory.
    for name in (INFO_FILE, PARAMS_DIR):
      path = os.path.join(directory, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, PARAMS_DIR), jax.device_get(params))
    checkpointer.wait_until_finished()
  tmp = os.path.join(directory, INFO_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(dict(info), f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(directory, INFO_FILE))
  return directory


@BACKBONES.register("classifier")
def load_classifier(directory: str, chunk_size: int = DEFAULT_CHUNK) -> Backbone:
  """Loads a classifier saved by ``save_classifier`` (the ``classifier`` backbone kind).

  Raises:
    BackboneNotFoundError: (a ``FileNotFoundError``) if the directory, its
      ``backbone.json`` or its ``params`` checkpoint is missing; the message gives the
      ``tools/train_classifier.py`` command that creates it.
  """
  directory = os.path.abspath(os.path.expanduser(directory))
  info_path = os.path.join(directory, INFO_FILE)
  params_path = os.path.join(directory, PARAMS_DIR)
  if not os.path.isdir(directory):
    raise _missing(directory, "the directory does not exist")
  if not os.path.isfile(info_path):
    raise _missing(directory, f"{INFO_FILE} is missing (training never finished?)")
  if not os.path.isdir(params_path):
    raise _missing(directory, f"the {PARAMS_DIR}/ checkpoint is missing")
  with open(info_path) as f:
    info = json.load(f)
  if info.get("format_version") != _FORMAT_VERSION:
    raise ValueError(f"{info_path} has format_version {info.get('format_version')!r}, "
                     f"expected {_FORMAT_VERSION}; retrain it with {_TRAIN_TOOL}.")
  model = classifier_model(info["architecture"])
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, *info["image_shape"])))["params"]
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(params_path, abstract)
  return classifier_backbone(params, info, path=directory, chunk_size=chunk_size)
