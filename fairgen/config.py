"""Config files, the shared sections' defaults and checks, and the experiment fingerprint.

A leaf module: it imports no other part of fairgen. Every config is a plain
``ml_collections.ConfigDict`` with the sections below. ``validate`` checks the sections
every run shares (``train``, ``log``, ``mesh``, ``sample``); each family checks its own
(``fairgen.experiment.validate`` calls them all), and every check raises one ``ConfigError``
line. ``fingerprint`` is the part of a config that must not change when a workdir is
resumed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any, Iterable

import ml_collections

REQUIRED_SECTIONS = ("data", "model", "objective", "optim", "train", "mesh", "log")
# A workdir may only be resumed with a config whose sections here are unchanged.
FINGERPRINT_SECTIONS = ("data", "model", "objective", "fair", "privacy", "latent")
# Keys of those sections that only affect evaluation, so evaluating with other values is
# not "another experiment".
EVAL_ONLY_KEYS = ("data.eval_split", "data.eval_options", "fair.bootstrap",
                  "fair.group_samples", "objective.standing_stats",
                  # The iterative samplers' settings and the ODE likelihood's: a trained
                  # model may be sampled and evaluated with any of them.
                  "objective.sampler", "objective.sample_steps", "objective.guidance",
                  "objective.ddim_eta", "objective.clip_denoised", "objective.sigma_min",
                  "objective.sigma_max", "objective.rho", "objective.s_churn",
                  "objective.s_tmin", "objective.s_tmax", "objective.s_noise",
                  "objective.sample_tol", "objective.temperature", "objective.top_k",
                  "objective.likelihood_probes", "objective.likelihood_tol")
# Keys added to the configs after workdirs were written without them, at the value those
# workdirs ran with: left out of the fingerprint at that value, so that such a workdir still
# resumes, and a run with another value is still another experiment. Only for a fingerprint
# taken without the families' defaults: with them (``fingerprint(config, defaults)``, as
# ``fairgen.checkpoint.check_config`` is given them) a key at its default and an absent key
# are the same already, so a new key needs no entry here. Frozen; to go once every caller
# of ``check_config`` passes the defaults.
ADDED_KEYS = {"model.dtype": "float32", "objective.loss": "nonsaturating",
              "objective.gp_weight": 0.0, "objective.r1_gamma": 0.0, "objective.r1_every": 1,
              "objective.label_smoothing": 0.0, "objective.diffaugment": "",
              "objective.spectral_norm": "", "objective.ema_batch_stats": False,
              "fair.ratio.noise_multiplier": 3.0, "privacy.ghost_clipping": False}


# mesh.peer_timeout_seconds's default: fairgen.peers' detection bound for a dead or hung peer.
PEER_TIMEOUT_SECONDS = 10.0

# jax.random's key implementations a run may use (config.rng_impl); the first is JAX's default.
RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


class ConfigError(ValueError):
  """A config value is missing, unknown or impossible; the message names the key."""


def require(cond: bool, message: str) -> None:
  """Raises ``ConfigError(message)`` unless ``cond`` (the validators' one check)."""
  if not cond:
    raise ConfigError(message)


def validate_mesh(mesh: ml_collections.ConfigDict) -> None:
  """Checks the ``mesh`` section (``fairgen.main`` checks it before joining a job)."""
  require(mesh.data == -1 or mesh.data >= 1,
          f"mesh.data must be -1 (all devices) or >= 1, got {mesh.data}.")
  for key in ("distributed", "fsdp"):
    require(isinstance(mesh.get(key, False), bool),
            f"mesh.{key} must be True or False, got {mesh.get(key)!r}.")
  timeout = mesh.get("peer_timeout_seconds", PEER_TIMEOUT_SECONDS)
  require(isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0,
          f"mesh.peer_timeout_seconds must be a number of seconds > 0, got {timeout!r}.")


def _check_checkpoint_name(value: Any, key: str) -> None:
  which = str(value)
  require(which in ("latest", "best") or which.isdigit(),
          f"{key} must be 'latest', 'best' or a step number, got {which!r}.")


def check_finite(node: Any, key: str = "") -> None:
  """Raises ConfigError naming the first NaN or +-inf number anywhere in a config.

  Walks every section, nested section and tuple or list, so that no family has to remember
  it: a NaN passes every ``x >= 0`` check (and would reach the step, where the non-finite
  guard stops step 1), and no option means anything at inf (an unbounded setting has a
  value of its own, e.g. ``fair.clip=0``).

  Args:
    node: a ConfigDict, or a mapping, sequence or value within one.
    key: ``node``'s dotted key, for the message ('' for a whole config); an item of a
      tuple or list is named ``key[i]``.
  """
  if isinstance(node, (Mapping, ml_collections.ConfigDict)):
    for name, value in node.items():
      check_finite(value, f"{key}.{name}" if key else str(name))
  elif isinstance(node, (tuple, list)):
    for i, value in enumerate(node):
      check_finite(value, f"{key}[{i}]")
  elif isinstance(node, numbers.Real) and not isinstance(node, bool):
    require(math.isfinite(node), f"{key}={float(node)!r} is not a finite number.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first impossible value of the sections every run shares.

  Every section's numbers must be finite (``check_finite``). The other checks of the
  families' sections (``data``, ``model``, ``objective``, ``optim``, ``fair``, ``eval``)
  are their owners'; ``fairgen.experiment.validate`` calls them all.
  """
  check_finite(config)
  for section in REQUIRED_SECTIONS:
    require(section in config, f"The config has no '{section}' section.")
  require(isinstance(config.get("seed"), int) and not isinstance(config.get("seed"), bool),
          f"seed must be an integer, got {config.get('seed')!r}.")
  require(config.get("rng_impl", RNG_IMPLS[0]) in RNG_IMPLS,
          f"Unknown rng_impl={config.get('rng_impl')!r}; valid: {', '.join(RNG_IMPLS)}.")
  train = config.train
  require(train.num_steps >= 1, f"train.num_steps must be >= 1, got {train.num_steps}.")
  require(train.batch_size >= 1, f"train.batch_size must be >= 1, got {train.batch_size}.")
  for key in ("log.every_steps", "train.checkpoint_every_steps", "log.sample_every_steps",
              "log.num_samples"):
    section, field = key.split(".")
    value = config[section].get(field)
    require(value is None or value >= 1, f"{key} must be >= 1, got {value}.")
  require(train.max_to_keep >= 1, f"train.max_to_keep must be >= 1, got {train.max_to_keep}.")
  require(train.nan_policy in ("halt", "skip"),
          f"train.nan_policy must be 'halt' or 'skip', got {train.nan_policy!r}.")
  require(train.max_nan_skips >= 1,
          f"train.max_nan_skips must be >= 1, got {train.max_nan_skips}.")
  xla_options(train.get("xla_options", ""))
  spd = train.get("steps_per_dispatch", 1)
  require(isinstance(spd, int) and not isinstance(spd, bool) and spd >= 1,
          f"train.steps_per_dispatch must be an integer >= 1, got {spd!r}.")
  require(isinstance(train.get("unroll_dispatch", False), bool),
          f"train.unroll_dispatch must be True or False, got {train.get('unroll_dispatch')!r}.")
  profile = tuple(train.get("profile_steps") or ())
  require(profile == () or (len(profile) == 2 and all(isinstance(v, int) for v in profile)
                            and 0 <= profile[0] < profile[1]),
          f"train.profile_steps must be () or (start, stop) with 0 <= start < stop, got "
          f"{train.get('profile_steps')!r}.")
  validate_mesh(config.mesh)
  if "sample" in config:
    sample = config.sample
    require(sample.num >= 1, f"sample.num must be >= 1, got {sample.num}.")
    require(sample.truncation >= 0, f"sample.truncation must be >= 0, got {sample.truncation}.")
    require(sample.interpolation_steps >= 2,
            f"sample.interpolation_steps must be >= 2, got {sample.interpolation_steps}.")
    _check_checkpoint_name(sample.checkpoint, "sample.checkpoint")


def xla_options(text: str) -> dict[str, bool | int | float | str]:
  """``train.xla_options`` ('--xla_NAME=VALUE ...') as the compile options ``jax.jit`` takes.

  Values: ``true``/``false`` become booleans and numbers ints or floats (XLA refuses them as
  strings); the rest stay strings. Whether XLA knows a name and value is checked by compiling
  (``fairgen.train.validate``).

  Raises:
    ConfigError: for a token that is not ``--xla_NAME=VALUE``, or a name given twice.
  """
  require(isinstance(text, str), f"train.xla_options must be a string, got {text!r}.")
  options: dict[str, bool | int | float | str] = {}
  for token in text.split():
    name, sep, value = token.removeprefix("--").partition("=")
    require(token.startswith("--xla_") and sep == "=" and value != "" and name not in options,
            f"train.xla_options must be '--xla_NAME=VALUE ...' with each name once, got "
            f"{token!r} in {text!r}.")
    if value.lower() in ("true", "false"):
      options[name] = value.lower() == "true"
      continue
    for kind in (int, float):
      try:
        options[name] = kind(value)
        break
      except ValueError:
        pass
    else:
      options[name] = value
  return options


def fingerprint(config: ml_collections.ConfigDict | Mapping[str, Any],
                defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The sections that identify an experiment (a resumed workdir must match them).

  Args:
    config: a config, or its dict (e.g. a workdir's config.json).
    defaults: the defaults of the families ``config`` names, section by section
      (``fairgen.experiment.section_defaults(config)``; this module knows no family). Every
      key the config leaves out takes its default, so a key at its default and an absent key
      are the same experiment: an experiment may stop stating a default, and a family may
      gain a key at the value its runs had, without refusing the workdirs written before;
      another value is still another experiment. None: keys compare as given, except
      ``ADDED_KEYS`` at their values.

  Returns:
    The ``FINGERPRINT_SECTIONS`` as nested JSON values, without ``EVAL_ONLY_KEYS``.
  """
  as_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  sections = {k: as_dict.get(k) for k in FINGERPRINT_SECTIONS}
  if defaults is not None:
    sections = {k: _with_defaults(v, defaults.get(k)) for k, v in sections.items()}
  out = json.loads(json.dumps(sections, sort_keys=True, default=str))
  for key in EVAL_ONLY_KEYS:
    section, field = key.split(".")
    if isinstance(out.get(section), dict):
      out[section].pop(field, None)
  for key, value in ({} if defaults is not None else ADDED_KEYS).items():
    *parents, field = key.split(".")
    node = out
    for name in parents:
      node = node.get(name) if isinstance(node, dict) else None
    if isinstance(node, dict) and field in node and node[field] == value:
      node.pop(field)
  return out


def _with_defaults(given: Any, default: Any) -> Any:
  """``given`` with the keys it lacks taken from ``default``, at every depth (a section the
  config does not have stays absent)."""
  if not isinstance(given, Mapping) or not isinstance(default, Mapping):
    return given
  out = dict(default)
  for key, value in given.items():
    out[key] = _with_defaults(value, default.get(key))
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


def _data_section() -> ml_collections.ConfigDict:
  """The ``data`` section: the dataset, its splits and options."""
  return ml_collections.ConfigDict(dict(
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


def _train_section() -> ml_collections.ConfigDict:
  """The ``train`` section: the run's length, batch, checkpoints and step options."""
  return ml_collections.ConfigDict(dict(
      num_steps=1000,
      batch_size=128,
      checkpoint_every_steps=500,
      max_to_keep=3,
      # Non-finite loss or gradient norm: 'halt' at the first, or 'skip' the update and
      # halt after max_nan_skips in a row (fairgen/robust.py).
      nan_policy="halt",
      max_nan_skips=10,
      # (start, stop): trace steps [start, stop) with jax.profiler into WORKDIR/profile
      # (fairgen.logs.Profiler); () for none.
      profile_steps=(),
      # XLA compile options of the train step, in XLA_FLAGS' syntax ('--xla_NAME=VALUE ...'),
      # recorded in config.json with the run. Unlike XLA_FLAGS they need no restart of the
      # backend and apply to this program only. Enum values take their full names, e.g.
      # '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT' (XLA:CPU
      # convolutions on Eigen, not YNNPACK: faster DCGAN steps, other rounding).
      xla_options="",
      # Train steps per dispatch: k > 1 runs k consecutive steps in one jitted program (a
      # lax.scan of the same step; bit-identical states for the MLP VAE, other rounding for
      # convolutional models), so a small step pays the dispatch and loop cost once per k
      # steps. Logs, checkpoints, samples, evaluation and profiles stay at their steps: a
      # dispatch never crosses one (fairgen.train.dispatch_size).
      steps_per_dispatch=1,
      # Unroll a dispatch's k steps into straight-line code instead of a loop. XLA:CPU runs
      # convolutions 5-10x slower inside a loop (issue 41: the conv VAE at k=4, 2.2 vs 10.5
      # steps/s unrolled, 11.4 at k=1), while the MLP VAE's loop is faster (155 vs 110
      # steps/s at k=8). Compilation grows with k when unrolled.
      unroll_dispatch=False,
  ))


def _eval_section() -> ml_collections.ConfigDict:
  """The ``eval`` section: evaluators, their sizes and backbones (see the comment)."""
  # Evaluation (fairgen/evaluation/). metrics: evaluator names. every_steps: periodic
  # evaluation during training (0: never). backbone_dir: the feature/attribute classifier
  # (default: ~/.cache/fairgen/classifier_<dataset>_label, made by tools/train_classifier.py).
  # checkpoint: which one --mode=evaluate/sample loads: 'latest', 'best' or a step number.
  # generator: 'model', or 'train_data' for the copy-of-the-training-data reference.
  # backbone: 'classifier' (backbone_dir) or 'inception_v3' (inception_weights, default
  # $FAIRGEN_CACHE/pt_inception-2015-12-05.npz from tools/convert_inception.py), whose
  # preprocessing is resize ('bilinear': pytorch-fid; 'pil_bicubic': clean-fid) and quantize
  # (round samples to uint8 levels first). reference_stats: an .npz of (mu, sigma) (pytorch-fid's
  # layout, tools/fid_stats.py) that FID uses in place of real images' features.
  return ml_collections.ConfigDict(dict(
      metrics=("fid", "kid", "prdc", "is"),
      every_steps=0,
      num_samples=1000,
      batch_size=250,
      seed=0,
      truncation=0.0,
      generator="model",
      backbone="classifier",
      backbone_dir=ml_collections.config_dict.placeholder(str),
      inception_weights=ml_collections.config_dict.placeholder(str),
      reference_stats=ml_collections.config_dict.placeholder(str),
      resize="bilinear",
      quantize=True,
      checkpoint="latest",
      best_metric="fid",
      best_mode="min",
      kid_subsets=100,
      kid_subset_size=500,
      is_splits=10,
      prdc_k=5,
      cleam_batches=10,  # CLEAM's s: batches of the samples whose shares give its interval.
      iwae_k=1000,
      likelihood_examples=0,  # 0: the whole eval split.
      # Privacy audits: training members and held-out non-members each (membership), and
      # the held-out images whose distances calibrate memorisation's near copies.
      audit_examples=1000,
      tstr_steps=1000,  # tstr_images: Adam steps of the classifier fitted on samples.
  ))


def base_config() -> ml_collections.ConfigDict:
  """The sections every experiment shares, with defaults; experiments fill in the rest."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # JAX's PRNG of the run's keys (init, every step's dropout/noise/latents): 'threefry2x32'
  # (JAX's default: the same bits on any device count), or the counter-based 'rbg' and
  # 'unsafe_rbg' (XLA's RngBitGenerator: faster on TPU; other bits, which JAX does not
  # promise across its versions or shardings). Either way a step's randomness is a function
  # of (seed, step), so resume stays exact.
  c.rng_impl = RNG_IMPLS[0]
  c.data = _data_section()
  c.model = ml_collections.ConfigDict()
  c.objective = ml_collections.ConfigDict()
  c.optim = ml_collections.ConfigDict()
  c.train = _train_section()
  # mesh.data: devices on the data axis (-1: all). distributed: call
  # jax.distributed.initialize() first (multi-host; arguments from the environment).
  # fsdp: shard parameters and optimizer state over the data axis (fairgen/parallel.py).
  # peer_timeout_seconds: in a multi-process job, how long a silent process may go unanswered
  # before the others stop with one line (fairgen/peers.py); detection takes at most this
  # plus two heartbeats (a tenth of it each, at least 0.5 s).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, distributed=False, fsdp=False,
                                          peer_timeout_seconds=PEER_TIMEOUT_SECONDS))
  c.log = ml_collections.ConfigDict(dict(every_steps=50, sample_every_steps=500, num_samples=64))
  c.eval = _eval_section()
  # --mode=sample: num images, a fixed seed, truncation (> 0: truncated normal latents).
  c.sample = ml_collections.ConfigDict(dict(num=64, seed=0, truncation=0.0,
                                            interpolation_steps=8, checkpoint="latest"))
  # --mode=audit (fairgen/audit.py): a one-run privacy audit of a DP config with this many
  # canaries of each kind (white-box gradient canaries, black-box input canaries), each in
  # the training data with probability 1/2; the lower bound's confidence; the canaries' seed.
  # active: set by --mode=audit in its own run (WORKDIR/audit/), whose DP-SGD step then
  # privatises the white-box canaries' coordinates too.
  c.audit = ml_collections.ConfigDict(dict(canaries=1000, confidence=0.95, seed=0,
                                           active=False))
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


def parse_arg(arg: str | None, choices: Mapping[str, Iterable[str]],
              flags: tuple[str, ...] = ()) -> dict[str, Any]:
  """Parses ``--config=FILE:key=value,flag,...`` into a dict (flags map to True).

  Args:
    arg: the text after the colon (None or '' for the defaults).
    choices: the valid values of every key; its first value is the default.
    flags: bare words that may appear (e.g. 'smoke'); absent flags map to False.

  Raises:
    ConfigError: for an unknown key, value or flag.
  """
  out: dict[str, Any] = {k: next(iter(v)) for k, v in choices.items()}
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
  """Loads ``get_config(arg)`` from an experiment file, as ``--config=path:arg`` does.

  Raises:
    ConfigError: one line, for a missing or unreadable file, a file that is not Python or
      raises on import, one without ``get_config``, or a ``get_config`` that raises or
      returns something other than a ConfigDict.
  """
  if not os.path.isfile(path):
    raise ConfigError(f"Config file {path} does not exist or is not a file.")
  name = "fairgen_config_" + os.path.splitext(os.path.basename(path))[0]
  try:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
      raise ConfigError(f"Config file {path} is not a Python file.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except ConfigError:
    raise
  except Exception as e:  # SyntaxError, ImportError, anything the file raises.
    raise ConfigError(f"Config file {path} cannot be loaded: {one_line(e)}") from None
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"Config file {path} has no get_config() function.")
  try:
    config = module.get_config(arg)
  except ConfigError:
    raise
  except Exception as e:
    raise ConfigError(f"{path}: get_config({arg!r}) failed: {one_line(e)}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not a "
                      f"ConfigDict.")
  return config


def load_spec(spec: str) -> ml_collections.ConfigDict:
  """The config of ``PATH[:ARG]``, the launcher's ``--config=`` value (``load_config_file``
  of ``PATH`` with ``ARG``, or with None when there is no ``:ARG``)."""
  path, _, arg = spec.partition(":")
  return load_config_file(path, arg or None)


def one_line(error: BaseException) -> str:
  """``Type: first line of the message`` of an exception, for one-line error reports."""
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
