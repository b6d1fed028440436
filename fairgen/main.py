r"""fairgen launcher: ``python -m fairgen.main --config=experiments/X.py --workdir=DIR``.

Overrides: ``--config.train.num_steps=300``; variants: ``--config=experiments/X.py:smoke``.
Bad input (unknown keys, ill-typed values, impossible settings, missing data, a workdir of
another experiment) ends with one line saying what to do, and exit status 2.
"""

from __future__ import annotations

import sys

import os

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from fairgen import config as config_lib
from fairgen import cli
from fairgen.cli import fail  # The one bad-input line, exit status 2, of every fairgen CLI.

CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (checkpoints, logs).")
_ALLOW_NEW = flags.DEFINE_bool(
    "allow_new_experiment", False,
    "Resume a workdir even if its config.json has different data/model/objective sections "
    "(the old config is kept as config.<time>.json).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None,
    "Local directory of JAX's persistent compilation cache (a later run, resume or "
    "evaluation of the same program loads it instead of compiling); default "
    "$JAX_COMPILATION_CACHE_DIR if set, else $FAIRGEN_CACHE/xla (~/.cache/fairgen/xla); "
    "'none': off. See fairgen/compile_cache.py for what its key covers.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "sample", "audit"],
                          "train (resumes), evaluate (eval.checkpoint: latest/best/step), "
                          "sample (writes grids and .npz under WORKDIR/sample/) or audit (a "
                          "DP config's one-run privacy audit: trains WORKDIR/audit/, writes "
                          "WORKDIR/eval/audit_step_N.json).")


def _config_path(argv: list[str]) -> str | None:
  """The file part of ``--config=FILE[:arg]`` (or ``--config FILE``), if given."""
  for i, arg in enumerate(argv):
    value = None
    if arg.startswith("--config="):
      value = arg[len("--config="):]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    if value is not None:
      return value.split(":", 1)[0]
  return None


def _load_error(error: BaseException, argv: list[str]) -> str:
  """One line saying why ``--config`` could not be loaded."""
  if isinstance(error, config_lib.ConfigError):
    return str(error)
  path = _config_path(argv)
  if isinstance(error, AttributeError) and "get_config" in str(error):
    return f"--config={path} has no get_config() function."
  return f"cannot load --config={path}: {config_lib.one_line(error)}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; every mistake becomes one ``fairgen: error:`` line and status 2."""
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path):
    fail(f"--config={path}: no such file" + (" (it is a directory)." if os.path.isdir(path)
                                              else "."))
  try:
    return flags.FLAGS(argv)
  except AttributeError as e:
    if "get_config" in str(e):
      fail(_load_error(e, argv))
    # ml_collections: an override names an unknown field.
    key = str(e.args[0]).strip("'\"") if e.args else str(e)
    culprits = [a.split("=")[0] for a in argv if a.startswith("--config.") and
                key in a.split("=")[0].split(".")] or ["--config"]
    fail(f"unknown config key '{key}' ({', '.join(culprits)}); see the config file for the "
          f"valid keys.")
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if "Traceback" in str(e) and lines:
      # ml_collections reports an error raised in get_config as its traceback text.
      kind, _, message = lines[-1].partition(": ")
      fail(message if kind.endswith("ConfigError") else
            f"cannot load --config={_config_path(argv)}: {kind.rpartition('.')[2]}: {message}")
    fail(str(e))
  except Exception as e:  # The config file raised while loading or in get_config.
    fail(_load_error(e, argv))
  return []


def main(argv: list[str]) -> None:
  """Runs the mode named by ``--mode`` on the parsed flags."""
  logging.get_absl_logger().addFilter(cli.QuietLibraries())
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if _WORKDIR.value is None:
    fail("--workdir is required.")
  try:
    config = CONFIG.value
  except Exception as e:  # A broken config file, reported when the value is first read.
    fail(_load_error(e, sys.argv))
  if not isinstance(config, ml_collections.ConfigDict):
    fail(f"--config={_config_path(sys.argv)}: get_config() returned "
          f"{type(config).__name__}, not a ConfigDict.")
  from fairgen import storage  # The standard library only: a bad path fails fast.
  try:
    workdir = storage.normalize(_WORKDIR.value)
  except storage.StorageError as e:
    fail(f"--workdir={e}")
  try:
    config_lib.validate_mesh(config.mesh)
  except config_lib.ConfigError as e:
    fail(str(e))
  # Heavy imports after flag checks, so bad flags fail fast.
  import jax
  from fairgen import compile_cache, parallel, peers

  try:
    cache = compile_cache.enable(_COMPILATION_CACHE.value)
  except storage.StorageError as e:
    fail(f"--compilation_cache={e}")
  cache_counts = compile_cache.counter()

  watchdog = None
  if config.mesh.distributed or parallel.launched_locally():
    timeout = config.mesh.get("peer_timeout_seconds", config_lib.PEER_TIMEOUT_SECONDS)
    try:
      parallel.initialize_distributed(peers.jax_heartbeat_seconds(timeout))
    except parallel.MeshError as e:
      fail(str(e))
    if jax.process_count() > 1:
      watchdog = peers.Watchdog(workdir, timeout).start()
  logging.info("fairgen on %d process(es), %d device(s): %s", jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  finished = False
  try:
    run_mode(config, workdir)
    finished = True
  except Exception as e:  # In a multi-process job, a lost peer explains most errors.
    if watchdog is not None:
      watchdog.explain(e)
    raise
  finally:
    if watchdog is not None:
      watchdog.stop(finished)
    if cache is not None and finished:  # A failure's own line stays the last.
      counts = cache_counts()
      logging.info("Compilation cache %s: %d program(s) loaded, %d compiled.", cache,
                   counts["hits"], counts["misses"])


def run_mode(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Runs ``--mode`` on ``config``; bad input ends in ``fail``."""
  from fairgen import audit, checkpoint, data, parallel, registry, robust, storage, train
  from fairgen.classifiers import backbones
  from fairgen.evaluation import context, modes

  try:
    if _MODE.value == "train":
      summary = train.train_and_evaluate(config, workdir, _ALLOW_NEW.value)
      if summary["preempted"]:
        print(f"fairgen: stopped by a signal at step {summary['final_step']}; the checkpoint "
              f"is committed. Run the same command to resume.", file=sys.stderr)
      else:
        logging.info("Done: step %d, %s", summary["final_step"], summary["scalars"])
    elif _MODE.value == "evaluate":
      modes.evaluate(config, workdir)
    elif _MODE.value == "audit":
      audit.run(config, workdir)
    else:
      modes.sample(config, workdir)
  except (config_lib.ConfigError, data.DataError, checkpoint.WorkdirError,
          parallel.MeshError, registry.UnknownNameError, robust.NonFiniteError,
          robust.WorkdirLockedError, storage.StorageError,
          context.EvalError, backbones.BackboneNotFoundError) as e:
    fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
