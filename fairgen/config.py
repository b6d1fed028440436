"""Config checks that run before anything compiles, and the experiment fingerprint.

Every config is a plain ``ml_collections.ConfigDict`` with the sections below. ``validate``
turns impossible values and unknown names into one ``ConfigError`` line; ``fingerprint``
is the part of a config that must not change when a workdir is resumed.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable

import ml_collections

REQUIRED_SECTIONS = ("data", "model", "objective", "optim", "train", "mesh", "log")
# A workdir may only be resumed with a config whose sections here are unchanged.
FINGERPRINT_SECTIONS = ("data", "model", "objective", "fair")
# Keys of those sections that only affect evaluation, so evaluating with other values is
# not "another experiment".
EVAL_ONLY_KEYS = ("data.eval_split", "data.eval_options", "fair.bootstrap",
                  "fair.group_samples")


class ConfigError(ValueError):
  """A config value is missing, unknown or impossible; the message names the key."""


def require(cond: bool, message: str) -> None:
  """Raises ``ConfigError(message)`` unless ``cond`` (the validators' one check)."""
  if not cond:
    raise ConfigError(message)


def _check_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], section: str) -> None:
  params = inspect.signature(fn).parameters
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return
  for key in kwargs:
    require(key in params, f"Unknown key {section}.{key}; {section} takes: "
            f"{', '.join(k for k in params if k != 'spec')}.")


def _check_optimizer(cfg: Any, path: str) -> None:
  require(cfg.get("lr") is not None and cfg.lr > 0, f"{path}.lr must be > 0, got {cfg.get('lr')}.")
  for b in ("b1", "b2"):
    if b in cfg:
      require(0 <= cfg[b] < 1, f"{path}.{b} must be in [0, 1), got {cfg[b]}.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first impossible or unknown value in ``config``."""
  # Imported here: the registries import jax and flax, the checks above do not.
  from fairgen.data import DATASETS
  from fairgen.models import MODELS
  from fairgen.objectives import OBJECTIVES

  for section in REQUIRED_SECTIONS:
    require(section in config, f"The config has no '{section}' section.")
  for section, registry in (("data", DATASETS), ("model", MODELS), ("objective", OBJECTIVES)):
    name = config[section].get("name")
    require(name in registry,
            f"Unknown {section}.name={name!r}; valid names: {', '.join(registry.names())}.")
  model_kwargs = {k: v for k, v in config.model.items() if k != "name"}
  _check_kwargs(MODELS.get(config.model.name), model_kwargs, "model")

  train = config.train
  require(train.num_steps >= 1, f"train.num_steps must be >= 1, got {train.num_steps}.")
  require(train.batch_size >= 1, f"train.batch_size must be >= 1, got {train.batch_size}.")
  for key in ("log.every_steps", "train.checkpoint_every_steps", "log.sample_every_steps"):
    section, field = key.split(".")
    value = config[section].get(field)
    require(value is None or value >= 1, f"{key} must be >= 1, got {value}.")
  require(train.max_to_keep >= 1, f"train.max_to_keep must be >= 1, got {train.max_to_keep}.")
  require(train.nan_policy in ("halt", "skip"),
          f"train.nan_policy must be 'halt' or 'skip', got {train.nan_policy!r}.")
  require(train.max_nan_skips >= 1, "train.max_nan_skips must be >= 1.")
  if "eval" in config:
    _validate_eval(config.eval)
  if "fair" in config:
    from fairgen import fair  # pylint: disable=g-import-not-at-top
    fair.validate(config)
  if "sample" in config:
    require(config.sample.num >= 1, f"sample.num must be >= 1, got {config.sample.num}.")
    require(config.sample.truncation >= 0, "sample.truncation must be >= 0.")

  objective = config.objective
  if objective.name == "gan":
    require(objective.n_disc >= 1, f"objective.n_disc must be >= 1, got {objective.n_disc}.")
    require(0 <= objective.ema_decay < 1,
            f"objective.ema_decay must be in [0, 1), got {objective.ema_decay}.")
    for net in ("gen", "disc"):
      require(net in config.optim, f"The GAN objective needs optim.{net}.")
  elif objective.name == "vae":
    require(objective.beta >= 0, f"objective.beta must be >= 0, got {objective.beta}.")
  # Every optimizer section (optim itself, or nested ones such as optim.gen) needs lr > 0.
  if "lr" in config.optim:
    _check_optimizer(config.optim, "optim")
  for key, value in config.optim.items():
    if isinstance(value, ml_collections.ConfigDict) and "lr" in value:
      _check_optimizer(value, f"optim.{key}")


def _validate_eval(cfg: Any) -> None:
  from fairgen.evaluate import EVALUATORS, GENERATORS
  from fairgen.metrics.backbones import BACKBONES
  for name in cfg.metrics:
    require(name in EVALUATORS,
            f"Unknown evaluator {name!r} in eval.metrics; valid: {', '.join(EVALUATORS.names())}.")
  require(cfg.backbone in BACKBONES,
          f"Unknown eval.backbone={cfg.backbone!r}; valid: {', '.join(BACKBONES.names())}.")
  require(cfg.generator in GENERATORS, f"eval.generator must be one of {GENERATORS}.")
  require(cfg.every_steps >= 0, f"eval.every_steps must be >= 0, got {cfg.every_steps}.")
  require(cfg.num_samples >= 2, f"eval.num_samples must be >= 2, got {cfg.num_samples}.")
  require(cfg.batch_size >= 1, f"eval.batch_size must be >= 1, got {cfg.batch_size}.")
  require(cfg.best_mode in ("min", "max"), "eval.best_mode must be 'min' or 'max'.")
  require(cfg.iwae_k >= 1, f"eval.iwae_k must be >= 1, got {cfg.iwae_k}.")
  which = str(cfg.checkpoint)
  require(which in ("latest", "best") or which.isdigit(),
          f"eval.checkpoint must be 'latest', 'best' or a step number, got {which!r}.")


def fingerprint(config: ml_collections.ConfigDict | dict[str, Any]) -> dict[str, Any]:
  """The sections that identify an experiment (a resumed workdir must match them)."""
  as_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  out = json.loads(json.dumps({k: as_dict.get(k) for k in FINGERPRINT_SECTIONS}, sort_keys=True))
  for key in EVAL_ONLY_KEYS:
    section, field = key.split(".")
    if isinstance(out.get(section), dict):
      out[section].pop(field, None)
  return out


def diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
  """Dotted keys whose values differ between two nested dicts."""
  keys = sorted(set(old) | set(new))
  out = []
  for k in keys:
    a, b = old.get(k), new.get(k)
    path = f"{prefix}{k}"
    if isinstance(a, dict) and isinstance(b, dict):
      out.extend(diff(a, b, path + "."))
    elif a != b:
      out.append(f"{path}: {a!r} -> {b!r}")
  return out


def base_config() -> ml_collections.ConfigDict:
  """The sections every experiment shares, with defaults; experiments fill in the rest."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      name="mnist_5k",
      split="train",
      eval_split="test",
      tfds_data_dir=ml_collections.config_dict.placeholder(str),
      options=ml_collections.ConfigDict(),  # Dataset-specific (e.g. celeb_a image_size).
      # Options that replace ``options`` for the held-out real data of evaluation (e.g.
      # subset='balanced': FID against the target distribution, not the biased one).
      eval_options=ml_collections.ConfigDict(),
      prefetch=2,
  ))
  c.model = ml_collections.ConfigDict()
  c.objective = ml_collections.ConfigDict()
  c.optim = ml_collections.ConfigDict()
  c.train = ml_collections.ConfigDict(dict(
      num_steps=1000,
      batch_size=128,
      checkpoint_every_steps=500,
      max_to_keep=3,
      # Non-finite loss or gradient norm: 'halt' at the first, or 'skip' the update and
      # halt after max_nan_skips in a row (fairgen/robust.py).
      nan_policy="halt",
      max_nan_skips=10,
  ))
  # mesh.data: devices on the data axis (-1: all). distributed: call
  # jax.distributed.initialize() first (multi-host; arguments from the environment).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, distributed=False))
  c.log = ml_collections.ConfigDict(dict(every_steps=50, sample_every_steps=500, num_samples=64))
  # Evaluation (fairgen/evaluate.py). metrics: evaluator names. every_steps: periodic
  # evaluation during training (0: never). backbone_dir: the feature/attribute classifier
  # (default: ~/.cache/fairgen/classifier_<dataset>_label, made by tools/train_classifier.py).
  # checkpoint: which one --mode=evaluate/sample loads: 'latest', 'best' or a step number.
  # generator: 'model', or 'train_data' for the copy-of-the-training-data reference.
  c.eval = ml_collections.ConfigDict(dict(
      metrics=("fid", "kid", "prdc", "is"),
      every_steps=0,
      num_samples=1000,
      batch_size=250,
      seed=0,
      truncation=0.0,
      generator="model",
      backbone="classifier",
      backbone_dir=ml_collections.config_dict.placeholder(str),
      checkpoint="latest",
      best_metric="fid",
      best_mode="min",
      kid_subsets=100,
      kid_subset_size=500,
      is_splits=10,
      prdc_k=5,
      iwae_k=1000,
      likelihood_examples=0,  # 0: the whole eval split.
  ))
  # --mode=sample: num images, a fixed seed, truncation (> 0: truncated normal latents).
  c.sample = ml_collections.ConfigDict(dict(num=64, seed=0, truncation=0.0,
                                            interpolation_steps=8, checkpoint="latest"))
  return c


def make_smoke(c: ml_collections.ConfigDict, num_steps: int = 4, batch_size: int = 16,
               every: int = 2) -> ml_collections.ConfigDict:
  """Shrinks the run-length sections of ``c`` for a ``:smoke`` variant (tests, CI)."""
  c.train.num_steps = num_steps
  c.train.batch_size = batch_size
  c.train.checkpoint_every_steps = every
  c.log.every_steps = every
  c.log.sample_every_steps = num_steps
  c.log.num_samples = 16
  return c


def check_variant(arg: str | None, variants: tuple[str, ...]) -> str:
  """The config variant named by ``--config=FILE:variant`` ('' for the default)."""
  variant = arg or ""
  if variant and variant not in variants:
    raise ConfigError(f"Unknown config variant {variant!r}; valid: {', '.join(variants)}.")
  return variant


def parse_arg(arg: str | None, choices: dict[str, tuple[str, ...]],
              flags: tuple[str, ...] = ()) -> dict[str, Any]:
  """Parses ``--config=FILE:key=value,flag,...`` into a dict (flags map to True).

  Args:
    arg: the text after the colon (None or '' for the defaults).
    choices: the valid values of every key; its first value is the default.
    flags: bare words that may appear (e.g. 'smoke'); absent flags map to False.

  Raises:
    ConfigError: for an unknown key, value or flag.
  """
  out: dict[str, Any] = {k: v[0] for k, v in choices.items()}
  out.update({f: False for f in flags})
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      if key not in flags:
        raise ConfigError(f"Unknown config flag {key!r}; valid flags: {', '.join(flags)}; "
                          f"valid keys: {', '.join(f'{k}=' for k in choices)}.")
      out[key] = True
      continue
    if key not in choices:
      raise ConfigError(f"Unknown config key {key!r}; valid keys: {', '.join(choices)}.")
    if value not in choices[key]:
      raise ConfigError(f"Unknown {key}={value!r}; valid: {', '.join(choices[key])}.")
    out[key] = value
  return out


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Loads ``get_config(arg)`` from an experiment file, as ``--config=path:arg`` does."""
  import importlib.util
  import os
  if not os.path.exists(path):
    raise ConfigError(f"Config file {path} does not exist.")
  name = "fairgen_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
