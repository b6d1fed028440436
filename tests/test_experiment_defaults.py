"""Experiments state only what differs from the defaults of the families they name (issue 38).

A key an experiment sets to the value its family would give it anyway is flagged, unless
``ALLOWED`` keeps it, with the reason. What an experiment *sets* is found by running its
``get_config`` a second time with every pre-filled default shifted (``base_config``,
``fair_section``, ``privacy.DEFAULTS``): a key whose value then differs from its shifted
default was written by the experiment (or a helper it calls). The ``model``, ``objective``
and ``data.options`` sections start empty, so every key in them is set. A variant that sets
a default over another value of the file's base variant, or of a file it loads, overrides
it and is not flagged. The defaults are ``fairgen.experiment.section_defaults``, which the
workdir check uses too: the second half of this file checks that a workdir written before
the experiments were trimmed still resumes, and that another value is still another
experiment.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob
import itertools
import json
import os
import sys
from typing import Any, Iterator

import pytest

from conftest import EXPERIMENTS, load_config
from fairgen import checkpoint
from fairgen import config as config_lib
from fairgen import experiment
from fairgen import fairness
from fairgen import privacy

# (experiment file, or a glob of them; dotted key): why the file states a default anyway.
_PAPER = "the paper's setting, spelled out in the docstring: pinned against default changes"
ALLOWED = {
    ("*adult*.py", "data.options.adult_dir"): "the README's and the loader's "
                                              "--config.data.options.adult_dir=DIR",
    ("*adult*.py", "data.options.audit_groups"): "the README's "
                                                 "--config.data.options.audit_groups=...",
    ("dp_*.py", "privacy.noise_multiplier"): "privacy.budget_section(eps) sets it: -1 (solved "
                                             "for eps)",
    ("dp_*.py", "privacy.target_epsilon"): "privacy.budget_section(eps) sets it: 0 for "
                                           "eps=inf (no noise)",
    ("dp_*.py", "privacy.clip_norm"): "DP-SGD's clip norm C, stated by every private run",
    ("dp_*.py", "privacy.delta"): "the delta of the (epsilon, delta) the docstring promises",
    ("adult_debias.py", "train.batch_size"): "AIF360's batch 128, which STEPS_PER_EPOCH "
                                             "divides by",
    ("fair_mnist.py", "data.options.attribute"): "the attribute= choice, passed through",
    ("beta_vae_mnist.py", "objective.beta"): "the beta= choice, passed through",
    ("fair_mnist.py", "objective.beta"): "tests/test_behaviour_fair.py reads "
                                         "c.objective.beta of the VAE variant",
    ("fair_celeba.py", "data.options.attribute"): "from the bias= choice's "
                                                  "bias.CHOI_CELEB_A setting",
    ("fair_celeba.py", "data.options.proportions"): "from the bias= choice's "
                                                    "bias.CHOI_CELEB_A setting",
    ("fair_celeba.py", "data.options.image_size"): "experiments/repro/choi2020_celeba.py "
                                                   "reads it; the paper's 64x64",
    **{("fair_celeba.py", key): _PAPER for key in (
        "model.g_ch", "model.d_ch", "model.latent_dim", "model.attention",
        "train.batch_size")},
    **{("ddpm_cifar10.py", key): _PAPER for key in (
        "model.num_res_blocks", "model.dropout", "objective.schedule", "objective.timesteps",
        "objective.beta_start", "objective.beta_end", "objective.prediction",
        "objective.ema_decay", "train.batch_size", "eval.iwae_k")},
    ("sngan_cifar10.py", "model.g_ch"): _PAPER,
    # --config.data.options.KEY=... overrides only a key the config has (ml_collections'
    # config_flags), and data.options is not completed from the loader's defaults.
    **{("image_folder.py", f"data.options.{key}"): "the docs' --config.data.options."
       f"{key}=... (config_flags overrides only existing keys)" for key in (
           "directory", "attributes", "label", "groups", "reference", "subset", "image_size",
           "channels", "test_fraction", "split_seed")},
}
# Keys that name the family rather than set one of its values.
NAMES = ("model.name", "objective.name", "fair.method")


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
  old = getattr(module, name)
  setattr(module, name, value)
  try:
    yield
  finally:
    setattr(module, name, old)


def variants(path: str) -> list[str | None]:
  """Every arg the experiment's ``get_config`` accepts: its ``check_variant`` variants, or
  every combination of its ``parse_arg`` choices and flags."""
  calls = []
  check_variant, parse_arg = config_lib.check_variant, config_lib.parse_arg

  def record_variant(arg, names):
    calls.append((tuple(names), None, ()))
    return check_variant(arg, names)

  def record_arg(arg, choices, flags=()):
    calls.append((None, {k: tuple(v) for k, v in choices.items()}, tuple(flags)))
    return parse_arg(arg, choices, flags)

  with _patched(config_lib, "check_variant", record_variant), \
       _patched(config_lib, "parse_arg", record_arg):
    config_lib.load_config_file(path, None)
  names, choices, flags = calls[0]  # The file's own parser (a base it loads comes later).
  if names is not None:
    return [None, *names]
  keys = list(choices)
  return [",".join([f"{k}={v}" for k, v in zip(keys, values)] + list(chosen))
          for values in itertools.product(*(choices[k] for k in keys))
          for n in range(len(flags) + 1) for chosen in itertools.combinations(flags, n)]


CASES = [(os.path.basename(path), arg)
         for path in sorted(glob.glob(os.path.join(EXPERIMENTS, "*.py")))
         for arg in variants(path)]


def _shift(value: Any) -> Any:
  """A different value of the same type (None stays: a typed placeholder takes no other)."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 7919
  if isinstance(value, float):
    return value + 0.123
  if isinstance(value, str):
    return value + "~"
  if isinstance(value, tuple):
    return value + (value[0] if value else 1,)
  return value


def _shift_all(section: Any, keep: tuple[str, ...] = ()) -> Any:
  """``section`` (a ConfigDict or dict) with every leaf shifted, in place."""
  for key in list(section.keys()):
    value = section[key]
    if hasattr(value, "keys"):
      _shift_all(value)
    elif key not in keep:
      section[key] = _shift(value)
  return section


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
  for key, value in node.items():
    if isinstance(value, dict) and value:
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _get(node: Any, key: str, missing: Any = KeyError) -> Any:
  for part in key.split("."):
    if not isinstance(node, dict) or part not in node:
      return missing
    node = node[part]
  return node


def _plain(value: Any) -> Any:
  return json.loads(json.dumps(value, default=str))


def _same(a: Any, b: Any) -> bool:
  a, b = _plain(a), _plain(b)
  return a == b and isinstance(a, bool) == isinstance(b, bool)


def _run(path: str, arg: str | None) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
  """``get_config(arg).to_dict()`` of ``path``, and (file name, its config as loaded) of
  each experiment file that ``get_config`` loads (e.g. dp_dcgan_mnist.py: dcgan_mnist.py)."""
  loads = []
  load_config_file = config_lib.load_config_file

  def record_load(file, variant=None):
    config = load_config_file(file, variant)
    loads.append((os.path.basename(file), config.to_dict()))
    return config

  # What the file states: before ``experiment.complete`` fills in every family default.
  with _patched(config_lib, "load_config_file", record_load), \
       _patched(experiment, "complete", lambda config: config):
    config = load_config_file(path, arg).to_dict()
  return config, loads


def set_keys(path: str, arg: str | None) -> set[str]:
  """The dotted keys that ``get_config(arg)`` of ``path`` (or a helper it calls) sets."""
  base_config, fair_section = config_lib.base_config, fairness.fair_section
  with _patched(config_lib, "base_config", lambda: _shift_all(base_config())), \
       _patched(fairness, "fair_section",
                lambda method="baseline": _shift_all(fair_section(method), ("method",))), \
       _patched(sys.modules[privacy.section.__module__], "DEFAULTS",
                {k: _shift(v) for k, v in privacy.DEFAULTS.items()}):
    shifted, _ = _run(path, arg)
  prefilled = base_config().to_dict()
  if "fair" in shifted:
    prefilled["fair"] = fair_section(shifted["fair"]["method"]).to_dict()
  if "privacy" in shifted:
    prefilled["privacy"] = dict(privacy.DEFAULTS)
  return {key for key, value in _leaves(shifted)
          if _get(prefilled, key) is KeyError or not _same(value, _shift(_get(prefilled, key)))}


def _at_other_value(ref: dict[str, Any], config: dict[str, Any], key: str) -> bool:
  """Whether ``ref``, a config that ``config`` starts from, has ``key`` in the same family
  at a value other than its default (so that ``config`` setting the default overrides it)."""
  section = key.split(".")[0]
  if _get(ref, f"{section}.name", None) != _get(config, f"{section}.name", None):
    return False
  value = _get(ref, key)
  return value is not KeyError and not _same(value, _get(experiment.section_defaults(ref), key))


@functools.lru_cache(maxsize=None)
def restated(path: str, arg: str | None) -> dict[str, Any]:
  """{dotted key: value} of the keys that ``path`` sets to their family's default.

  A variant that sets a default where the file's base variant (the same choices, no flags)
  or a file it loads has another value overrides that value: it is not counted.
  """
  config, loads = _run(path, arg)
  refs = [ref for _, ref in loads]
  base = ",".join(part for part in (arg or "").split(",") if "=" in part) or None
  if base != arg:
    refs.append(_run(path, base)[0])
  defaults = experiment.section_defaults(config)
  out = {}
  for key in sorted(set_keys(path, arg) - set(NAMES)):
    value, default = _get(config, key), _get(defaults, key)
    if (default is not KeyError and _same(value, default)
        and not any(_at_other_value(ref, config, key) for ref in refs)
        and not any(_same(_get(loaded, key), value) for _, loaded in loads)):
      out[key] = value  # (A value a loaded file set is that file's to answer for.)
  return out


def allowed(name: str, key: str) -> bool:
  """Whether ``ALLOWED`` keeps ``key`` in experiment file ``name``."""
  return any(k == key and fnmatch.fnmatch(name, pattern) for pattern, k in ALLOWED)


@pytest.mark.parametrize("name,arg", CASES)
def test_no_experiment_sets_a_key_to_its_default(name, arg):
  found = restated(os.path.join(EXPERIMENTS, name), arg)
  flagged = {k: v for k, v in found.items() if not allowed(name, k)}
  assert not flagged, (
      f"experiments/{name}:{arg or ''} sets keys to the value their family's default "
      f"already has: {flagged}. Leave them out (the family fills them in), or keep one as "
      f"documentation in ALLOWED of tests/test_experiment_defaults.py, with the reason.")


def test_every_allowed_entry_is_still_used():
  used = {(pattern, key) for name, arg in CASES
          for key in restated(os.path.join(EXPERIMENTS, name), arg)
          for pattern, k in ALLOWED if k == key and fnmatch.fnmatch(name, pattern)}
  assert not set(ALLOWED) - used, f"ALLOWED entries no experiment needs: " \
                                  f"{sorted(set(ALLOWED) - used)}"


# dcgan_mnist.py:smoke's model and objective sections as config.json held them before the
# experiments stopped stating defaults (every key spelled out).
BEFORE_TRIM = {
    "model": {"name": "dcgan", "latent_dim": 16, "width": 0.125, "conditional": False,
              "dropout": 0.3, "fast_conv": True, "dtype": "float32"},
    "objective": {"name": "gan", "loss": "nonsaturating", "n_disc": 1, "ema_decay": 0.999,
                  "gp_weight": 0.0, "r1_gamma": 0.0, "r1_every": 1, "label_smoothing": 0.1,
                  "diffaugment": "", "spectral_norm": "", "ema_batch_stats": False,
                  "standing_stats": 64},
}


def _write_before_trim(workdir: str) -> None:
  """A config.json of dcgan_mnist.py:smoke as the code before the trim wrote it."""
  config = load_config("dcgan_mnist", "smoke")
  config.model, config.objective = BEFORE_TRIM["model"], BEFORE_TRIM["objective"]
  checkpoint.check_and_write_config(workdir, config)


def test_a_workdir_written_before_the_trim_resumes_with_the_defaults_filled_in(tmp_path):
  _write_before_trim(str(tmp_path))
  config = load_config("dcgan_mnist", "smoke")
  checkpoint.check_and_write_config(str(tmp_path), config,
                                    defaults=experiment.section_defaults)
  # The trimmed config.json just written, and the old one, against each other both ways.
  _write_before_trim(str(tmp_path / "old"))
  checkpoint.check_config(str(tmp_path / "old"), config, experiment.section_defaults)
  # Keys compared as written (no defaults) would call it another experiment: the old file
  # lacks the builder's keys it left at their defaults, which ``experiment.complete`` adds.
  with pytest.raises(checkpoint.WorkdirError, match="model.condition_key: None -> 'label'"):
    checkpoint.check_config(str(tmp_path / "old"), config)


@pytest.mark.parametrize("key,value,change", [
    ("objective.loss", "hinge", "objective.loss: 'nonsaturating' -> 'hinge'"),
    ("objective.n_disc", 2, "objective.n_disc: 1 -> 2"),
    ("model.fast_conv", False, "model.fast_conv: True -> False"),
    ("model.dropout", 0.0, "model.dropout: 0.3 -> 0.0"),
])
def test_another_value_is_still_another_experiment(tmp_path, key, value, change):
  _write_before_trim(str(tmp_path))
  config = load_config("dcgan_mnist", "smoke", **{key: value})
  with pytest.raises(checkpoint.WorkdirError, match=change.replace(".", r"\.")):
    checkpoint.check_config(str(tmp_path), config, experiment.section_defaults)


def test_a_key_at_its_default_is_the_same_as_an_absent_key_in_every_fingerprint_section():
  """fingerprint(config, defaults) fills every absent key, nested and in fair and privacy
  too, so config.ADDED_KEYS needs no new entry when a family gains a key."""
  config = load_config("fair_mnist", "method=importance,smoke")
  config.privacy = privacy.section(expected_batch_size=8, noise_multiplier=1.0)
  bare = config.to_dict()
  del bare["fair"]["alpha"], bare["fair"]["ratio"]["noise_multiplier"]
  del bare["privacy"]["ghost_clipping"]
  config.objective.n_disc = 1  # Stated at their defaults.
  config.model.fast_conv = True
  defaults = experiment.section_defaults
  assert config_lib.fingerprint(bare, defaults(bare)) == config_lib.fingerprint(
      config, defaults(config))
  config.fair.ratio.noise_multiplier = 2.0
  assert config_lib.diff(config_lib.fingerprint(bare, defaults(bare)),
                         config_lib.fingerprint(config, defaults(config))) == [
      "fair.ratio.noise_multiplier: 3.0 -> 2.0"]


def test_section_defaults_of_an_unknown_family_are_empty():
  """A config.json naming a family fairgen no longer knows compares as written."""
  config = {"data": {"name": "gone"}, "model": {"name": "gone"},
            "objective": {"name": "gone"}}
  defaults = experiment.section_defaults(config)
  assert defaults["data"]["options"] == {} and "name" not in defaults["objective"]
  assert defaults["model"] == {} and defaults["objective"] == {}


def test_every_family_key_takes_a_command_line_override():
  """``experiment.complete`` fills the keys an experiment leaves out, so the launcher's
  ``--config.objective.gp_weight=...`` works for any key of the family, stated or not."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["main", f"--config={os.path.join(EXPERIMENTS, 'dcgan_mnist.py')}:smoke",
          "--config.objective.gp_weight=2.5", "--config.objective.loss=hinge",
          "--config.model.fast_conv=False", "--config.model.dtype=bfloat16"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  assert (config.objective.gp_weight, config.objective.loss) == (2.5, "hinge")
  assert (config.model.fast_conv, config.model.dtype) == (False, "bfloat16")
  stated = _run(os.path.join(EXPERIMENTS, "dcgan_mnist.py"), "smoke")[0]
  assert "gp_weight" not in stated["objective"] and "fast_conv" not in stated["model"]


def test_training_resumes_a_workdir_whose_config_json_spells_out_every_default(tmp_path):
  """The launcher's own path: a workdir written before the trim (its config.json states the
  defaults) trains on with the trimmed experiment, which ``experiment.complete`` fills with
  more keys still."""
  from fairgen import train
  workdir = str(tmp_path)
  _write_before_trim(workdir)
  summary = train.train_and_evaluate(load_config("dcgan_mnist", "smoke",
                                                 **{"train.num_steps": 2}), workdir)
  assert summary["final_step"] == 2
