"""Backbones: the frozen networks whose features and class probabilities evaluation uses.

FID, KID and PRDC take a backbone's penultimate features; Inception Score and per-class
proportions take its class probabilities. Every backbone is loaded through ``BACKBONES``,
a registry from a *kind* to a loader ``(path) -> Backbone``, so callers only ever write
``load_backbone(kind, path)`` and report ``backbone.describe()`` next to every number.

Kinds:
  - ``classifier``: the small convolutional ``fairgen.models.classifier.Classifier`` (or
    its ``ResNetClassifier``, ``architecture.kind='resnet'``), trained on an offline
    dataset by ``tools/train_classifier.py`` and saved as an Orbax checkpoint
    (``<dir>/params``) plus ``<dir>/backbone.json`` (what it was trained on, its held-out
    accuracy and its hyperparameters). ``fairgen.classifiers.fit`` trains it.

  - ``inception_v3``: the FID Inception-v3 of pytorch-fid and TF's FID code
    (``fairgen.classifiers.inception``), from a local ``.npz`` that
    ``tools/convert_inception.py`` writes from pytorch-fid's weights file. It takes images
    of any size with 1 or 3 channels, and resizes them to 299x299 itself (``resize``,
    ``quantize``: the preprocessing protocol, recorded in ``describe()``).

A loader takes the path and keyword options; ``describe()`` returns everything that must
match for two numbers to be comparable (``info['provenance']``).

Images are float32 NHWC in [-1, 1], fairgen's convention throughout.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fairgen import parallel
from fairgen import storage
from fairgen.classifiers import inception
from fairgen.models.classifier import Classifier, ResNetClassifier
from fairgen.registry import Registry

# (variables, images [N, H, W, C]) -> (features [N, F], probs [N, C]).
ApplyFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]

DEFAULT_CHUNK = 500
INFO_FILE = "backbone.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
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
    image_shape: the (H, W, C) the backbone accepts, or None for any size with 1 or 3
      channels (a backbone that resizes its inputs).
    feature_dim: length of a feature vector.
    num_classes: length of a probability vector.
    chunk_size: images per jitted call, split over ``devices`` (rounded up to a multiple of
      their number); the last chunk is padded to it, so one shape is compiled per backbone.
    devices: how many of this process's devices each call is split over (-1: all; evaluation
      passes its mesh's data-axis size).
    compiler_options: XLA compile options of the jitted network (``jax.jit``'s).
  """

  def __init__(self, name: str, path: str, info: Mapping[str, Any], apply_fn: ApplyFn,
               variables: Any, *, image_shape: tuple[int, ...] | None, feature_dim: int,
               num_classes: int, chunk_size: int = DEFAULT_CHUNK, devices: int = 1,
               compiler_options: Mapping[str, Any] | None = None):
    if chunk_size < 1:
      raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    self.name = name
    self.path = path
    self.info = dict(info)
    self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)
    self.feature_dim = int(feature_dim)
    self.num_classes = int(num_classes)
    # Chunks are split over ``devices`` of this process's devices (variables replicated on
    # each), so a chunk is a multiple of their number.
    local = jax.local_devices()
    n = len(local) if devices in (-1, 0) else min(int(devices), len(local))
    self._mesh = jax.sharding.Mesh(np.array(local[:n]), (parallel.DATA_AXIS,))
    n = self._mesh.size
    self.chunk_size = -(-int(chunk_size) // n) * n
    # On device once, not transferred again by every chunk's call.
    self.variables = jax.device_put(variables, parallel.replicated(self._mesh))
    self.compiler_options = dict(compiler_options or {})
    self._apply = jax.jit(apply_fn, compiler_options=self.compiler_options or None)
    self._sharding = parallel.data_sharding(self._mesh)

  def _check(self, images: Any) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if self.image_shape is None:
      if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"Backbone {self.name!r} takes NHWC images with 1 or 3 channels, "
                         f"got a batch of shape {images.shape}.")
      return images
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
    n = self._mesh.size

    def apply(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
      m = len(x)
      x = np.concatenate([x, np.zeros((-m % n, *x.shape[1:]), x.dtype)])  # Split n ways.
      out = self._apply(self.variables, jax.device_put(x, self._sharding))
      return tuple(np.asarray(o)[:m] for o in out)

    features, probs = parallel.map_in_chunks(apply, (images,), self.chunk_size)
    return features.astype(np.float32), probs.astype(np.float32)

  def features(self, images: Any) -> np.ndarray:
    """Penultimate features ``[N, feature_dim]`` of ``images`` (see features_and_probs)."""
    return self.features_and_probs(images)[0]

  def probs(self, images: Any) -> np.ndarray:
    """Class probabilities ``[N, num_classes]`` of ``images`` (see features_and_probs)."""
    return self.features_and_probs(images)[1]

  def describe(self) -> dict[str, Any]:
    """Which backbone and checkpoint produced a number: kind, path, dataset, accuracy, and
    whatever else the loader put in ``info['provenance']`` (weights digest, preprocessing)."""
    return {"kind": self.name, "path": self.path, "dataset": self.info.get("dataset"),
            "test_accuracy": self.info.get("test_accuracy"),
            **self.info.get("provenance", {})}

  def __repr__(self) -> str:
    return f"Backbone({', '.join(f'{k}={v!r}' for k, v in self.describe().items())})"


BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone")


def load_backbone(kind: str, path: str, **options: Any) -> Backbone:
  """Loads the backbone of ``kind`` (a ``BACKBONES`` name) from ``path``, with the loader's
  keyword ``options`` (e.g. ``resize`` for ``inception_v3``)."""
  return BACKBONES.get(kind)(path, **options)


cache_dir = storage.cache_dir  # Where backbones live by default.


def default_classifier_dir(dataset: str, label_key: str = "label") -> str:
  """``$FAIRGEN_CACHE/classifier_<dataset>_<label_key>``; the cache defaults to ~/.cache/fairgen."""
  return storage.normalize(os.path.join(cache_dir(), f"classifier_{dataset}_{label_key}"))


def train_command(data_config: Mapping[str, Any], label_key: str = "label",
                  extra_options: Mapping[str, Any] | None = None) -> str:
  """The ``tools/train_classifier.py`` command that trains a classifier for ``data_config``.

  ``extra_options`` add dataset options for training only (e.g. ``subset='balanced'``).
  """
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


def load_backbone_or_explain(kind: str, path: str, command: str, **options: Any) -> Backbone:
  """``load_backbone``, re-raising a missing classifier with the command that makes it."""
  try:
    return load_backbone(kind, path, **options)
  except BackboneNotFoundError as e:
    if " Train one with" not in str(e):
      raise
    message = str(e).split(" Train one with")[0]
    raise BackboneNotFoundError(f"{message} Train one with `{command} --out={path}`.") from None


# --- The "classifier" kind. -------------------------------------------------------------


ARCHITECTURES = ("cnn", "resnet")  # ``info['architecture']['kind']``; 'cnn' if absent.


def classifier_model(arch: Mapping[str, Any]) -> Classifier | ResNetClassifier:
  """The network of a backbone's ``info['architecture']``: a ``Classifier`` ('cnn', the
  default of files written before the key existed) or a ``ResNetClassifier`` ('resnet')."""
  kind = arch.get("kind", "cnn")
  if kind == "resnet":
    return ResNetClassifier(num_classes=int(arch["num_classes"]), width=int(arch["width"]),
                            blocks=tuple(int(b) for b in arch["blocks"]),
                            dropout=float(arch["dropout"]))
  if kind != "cnn":
    raise ValueError(f"Unknown classifier architecture {kind!r}; valid: "
                     f"{', '.join(ARCHITECTURES)}.")
  return Classifier(num_classes=int(arch["num_classes"]), width=int(arch["width"]),
                    feature_dim=int(arch["feature_dim"]), dropout=float(arch["dropout"]))


def _classifier_apply(model: Classifier | ResNetClassifier) -> ApplyFn:

  def apply(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    out = model.apply({"params": params}, images, train=False)
    return out["features"], jax.nn.softmax(out["logits"].astype(jnp.float32), axis=-1)

  return apply


def classifier_backbone(params: Any, info: Mapping[str, Any], path: str = "",
                        chunk_size: int = DEFAULT_CHUNK, devices: int = 1) -> Backbone:
  """Wraps trained ``Classifier`` params and their info dict as a ``Backbone``."""
  arch = info["architecture"]
  return Backbone("classifier", path, info, _classifier_apply(classifier_model(arch)), params,
                  image_shape=tuple(info["image_shape"]), feature_dim=arch["feature_dim"],
                  num_classes=arch["num_classes"], chunk_size=chunk_size, devices=devices)


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
  directory = storage.normalize(directory)
  if storage.listdir(directory):
    if not overwrite:
      raise FileExistsError(
          f"{directory} is not empty; pass overwrite=True (--overwrite) to replace it.")
    # Only what this function writes is removed, never the rest of a mistaken directory.
    for name in (INFO_FILE, PARAMS_DIR):
      path = os.path.join(directory, name)
      if storage.isdir(path):
        storage.rmtree(path)
      elif storage.exists(path):
        storage.remove(path)
  storage.makedirs(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, PARAMS_DIR), jax.device_get(params))
    checkpointer.wait_until_finished()
  storage.write_atomic(os.path.join(directory, INFO_FILE),
                       json.dumps(dict(info), indent=2, sort_keys=True))
  return directory


@BACKBONES.register("classifier")
def load_classifier(directory: str, chunk_size: int = DEFAULT_CHUNK,
                    devices: int = 1) -> Backbone:
  """Loads a classifier saved by ``save_classifier`` (the ``classifier`` backbone kind).

  Raises:
    BackboneNotFoundError: (a ``FileNotFoundError``) if the directory, its
      ``backbone.json`` or its ``params`` checkpoint is missing; the message gives the
      ``tools/train_classifier.py`` command that creates it.
  """
  directory = storage.normalize(directory)
  info_path = os.path.join(directory, INFO_FILE)
  params_path = os.path.join(directory, PARAMS_DIR)
  if not storage.isdir(directory):
    raise _missing(directory, "the directory does not exist")
  if not storage.isfile(info_path):
    raise _missing(directory, f"{INFO_FILE} is missing (training never finished?)")
  if not storage.isdir(params_path):
    raise _missing(directory, f"the {PARAMS_DIR}/ checkpoint is missing")
  info = json.loads(storage.read_text(info_path))
  if info.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{info_path} has format_version {info.get('format_version')!r}, "
                     f"expected {FORMAT_VERSION}; retrain it with {_TRAIN_TOOL}.")
  model = classifier_model(info["architecture"])
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, *info["image_shape"])))["params"]
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(params_path, abstract)
  return classifier_backbone(params, info, path=directory, chunk_size=chunk_size,
                             devices=devices)


# --- The "inception_v3" kind. -----------------------------------------------------------

INCEPTION_FILE = "pt_inception-2015-12-05.npz"
# pytorch-fid's release of the TF FID graph's weights, which tools/convert_inception.py reads.
INCEPTION_SOURCE_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                        "fid_weights/pt_inception-2015-12-05-6726825d.pth")
INCEPTION_CHUNK = 50  # Images per call: about 1.5 GB of activations at 299x299 on CPU.


def default_inception_path() -> str:
  """``$FAIRGEN_CACHE/pt_inception-2015-12-05.npz`` (the cache defaults to ~/.cache/fairgen)."""
  return storage.normalize(os.path.join(cache_dir(), INCEPTION_FILE))


def inception_variables(arrays: Mapping[str, np.ndarray], source: str = "") -> dict[str, Any]:
  """Checks flattened Inception arrays (``inception.flax_arrays_from_torch``'s layout)
  against the network's variables and returns them as a tree.

  Raises:
    ValueError: naming the missing, unexpected or mis-shaped arrays.
  """
  expected = jax.eval_shape(inception.FIDInceptionV3().init, jax.random.key(0),
                            jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3)))
  want = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]}
  got = {k: tuple(v.shape) for k, v in arrays.items() if not k.startswith("__")}
  where = f" in {source}" if source else ""
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise ValueError(f"Not the FID Inception-v3's weights{where}: {len(missing)} arrays "
                     f"missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}).")
  wrong = [f"{k} {got[k]} != {tuple(want[k])}" for k in want if got[k] != tuple(want[k])]
  if wrong:
    raise ValueError(f"Mis-shaped Inception arrays{where}: {'; '.join(wrong[:3])}.")
  return inception.unflatten({k: np.asarray(arrays[k], np.float32) for k in want})


def _inception_apply(resize: str, quantize: bool) -> ApplyFn:
  model = inception.FIDInceptionV3()

  def apply(variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    rows = inception.resize_matrix(resize, images.shape[1])
    cols = inception.resize_matrix(resize, images.shape[2])
    x = inception.preprocess(images, rows, cols, quantize=quantize,
                             clip=resize == "pil_bicubic")
    out = model.apply(variables, x)
    return out["pool"], jax.nn.softmax(out["logits"], axis=-1)

  return apply


@BACKBONES.register("inception_v3")
def load_inception(path: str, resize: str = "bilinear", quantize: bool = True,
                   chunk_size: int = INCEPTION_CHUNK, devices: int = 1) -> Backbone:
  """Loads the FID Inception-v3 from the ``.npz`` that ``tools/convert_inception.py`` wrote.

  On a CPU the network's convolutions run on Eigen (``parallel.cpu_convolution_options``):
  with XLA:CPU's default, YNNPACK, it ran at 0.83x pytorch-fid's images/s, with Eigen at
  1.91x (``tools/benchmark.py --compare inception``, docs/benchmarks.md); the outputs agree
  with pytorch-fid's to 1e-4 either way.

  Args:
    path: the ``.npz`` file (local or gs://); read without pickle.
    resize: ``'bilinear'`` (pytorch-fid) or ``'pil_bicubic'`` (clean-fid); see
      ``fairgen.classifiers.inception``.
    quantize: round samples to uint8 levels before resizing.
    chunk_size: images per jitted call.
    devices: how many local devices each call is split over (-1: all).

  Raises:
    BackboneNotFoundError: if the file is missing; the message says how to make it.
    ValueError: for an unknown resize or a file that is not these weights.
  """
  if resize not in inception.RESIZE_MODES:
    raise ValueError(f"Unknown Inception resize {resize!r}; valid: "
                     f"{', '.join(inception.RESIZE_MODES)}.")
  path = storage.normalize(path)
  if not storage.isfile(path):
    raise BackboneNotFoundError(
        f"No Inception weights at {path}. Nothing is downloaded at run time: fetch "
        f"{INCEPTION_SOURCE_URL} where there is internet, then run `python "
        f"tools/convert_inception.py --weights=<that .pth> --out={path}`.")
  raw = storage.read_bytes(path)
  with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
    arrays = {k: npz[k] for k in npz.files}
  variables = inception_variables(arrays, path)
  source = str(arrays["__source__"]) if "__source__" in arrays else ""
  info = {"dataset": "imagenet (inception-2015-12-05)", "source": source,
          "provenance": {"weights_sha256": hashlib.sha256(raw).hexdigest(),
                         "resize": resize, "quantize": bool(quantize),
                         "input_size": inception.INPUT_SIZE}}
  return inception_backbone(variables, resize, quantize, path=path, info=info,
                            chunk_size=chunk_size, devices=devices)


def inception_backbone(variables: Any, resize: str = "bilinear", quantize: bool = True, *,
                       path: str = "", info: Mapping[str, Any] | None = None,
                       chunk_size: int = INCEPTION_CHUNK, devices: int = 1,
                       compiler_options: Mapping[str, Any] | None = None) -> Backbone:
  """The ``inception_v3`` backbone over ``variables`` (``inception_variables``' tree).

  ``compiler_options``: the network's XLA compile options; None: Eigen convolutions on a CPU
  (``parallel.cpu_convolution_options``), none elsewhere. The other arguments are
  ``load_inception``'s, plus ``path`` and ``info`` for ``Backbone.describe``.
  """
  if compiler_options is None:
    compiler_options = parallel.cpu_convolution_options()
  return Backbone("inception_v3", path, info or {}, _inception_apply(resize, bool(quantize)),
                  variables, image_shape=None, feature_dim=inception.FEATURE_DIM,
                  num_classes=inception.NUM_CLASSES, chunk_size=chunk_size,
                  devices=devices, compiler_options=compiler_options)
