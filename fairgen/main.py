r"""fairgen launcher: ``python -m fairgen.main --config=experiments/X.py --workdir=DIR``.

Overrides: ``--config.train.num_steps=300``; variants: ``--config=experiments/X.py:smoke``.
Bad input (unknown keys, ill-typed values, impossible settings, missing data, a workdir of
another experiment) ends with one line saying what to do, and exit status 2.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (checkpoints, logs).")
_ALLOW_NEW = flags.DEFINE_bool(
    "allow_new_experiment", False,
    "Resume a workdir even if its config.json has different data/model/objective sections "
    "(the old config is kept as config.<time>.json).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "sample"],
                          "train (resumes), evaluate (eval.checkpoint: latest/best/step) or "
                          "sample (writes grids and .npz under WORKDIR/sample/).")


def _fail(message: str) -> None:
  print(f"fairgen: error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with config override errors turned into one clear line."""
  try:
    return flags.FLAGS(argv)
  except AttributeError as e:  # ml_collections: an override names an unknown field.
    key = str(e.args[0]).strip("'\"") if e.args else str(e)
    culprits = [a.split("=")[0] for a in argv if a.startswith("--config.") and
                key in a.split("=")[0].split(".")] or ["--config"]
    _fail(f"unknown config key '{key}' ({', '.join(culprits)}); see the config file for the "
          f"valid keys.")
  except flags.Error as e:
    _fail(f"{e}")
  return []


class _QuietLibraries(logging.logging.Filter):
  """Drops the INFO chatter of Orbax and TFDS (several lines per checkpoint)."""

  def filter(self, record) -> bool:
    noisy = "/orbax/" in record.pathname or "/tensorflow_datasets/" in record.pathname
    return record.levelno >= logging.logging.WARNING or not noisy


def main(argv: list[str]) -> None:
  logging.get_absl_logger().addFilter(_QuietLibraries())
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if _WORKDIR.value is None:
    _fail("--workdir is required.")
  try:
    config = _CONFIG.value
    config.to_dict()
  except Exception as e:  # A missing or broken config file.
    _fail(f"cannot load --config: {e}")
  # Heavy imports after flag checks, so bad flags fail fast.
  import jax
  from fairgen import checkpoint, config as config_lib, data, evaluate, modes, parallel
  from fairgen import registry, robust, train
  from fairgen.metrics import backbones

  if config.mesh.distributed:
    jax.distributed.initialize()
  logging.info("fairgen on %d process(es), %d device(s): %s", jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  try:
    if _MODE.value == "train":
      summary = train.train_and_evaluate(config, _WORKDIR.value, _ALLOW_NEW.value)
      if summary["preempted"]:
        print(f"fairgen: stopped by a signal at step {summary['final_step']}; the checkpoint "
              f"is committed. Run the same command to resume.", file=sys.stderr)
      else:
        logging.info("Done: step %d, %s", summary["final_step"], summary["scalars"])
    elif _MODE.value == "evaluate":
      modes.evaluate(config, _WORKDIR.value)
    else:
      modes.sample(config, _WORKDIR.value)
  except (config_lib.ConfigError, data.DataError, checkpoint.WorkdirError,
          parallel.MeshError, registry.UnknownNameError, robust.NonFiniteError,
          robust.WorkdirLockedError,
          evaluate.EvalError, backbones.BackboneNotFoundError) as e:
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
