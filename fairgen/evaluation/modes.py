"""``--mode=evaluate`` and ``--mode=sample``: read a workdir's checkpoint, never write to it.

Both refuse a workdir whose config.json belongs to another experiment, and write only under
``WORKDIR/eval/`` and ``WORKDIR/sample/``.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
from absl import logging

from fairgen import checkpoint
from fairgen import data
from fairgen import experiment
from fairgen import sampling
from fairgen import storage
from fairgen.evaluation import runner
from fairgen.evaluation.context import RealData


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates ``eval.checkpoint`` of ``workdir`` with every evaluator in ``eval.metrics``.

  Writes ``WORKDIR/eval/step_NNNNNN.json`` (``reference_train_data.json`` when
  ``eval.generator='train_data'``, which needs no checkpoint) and prints a table.
  """
  experiment.validate(config)
  runner.validate(config.eval)
  workdir = storage.normalize(workdir)
  checkpoint.check_config(workdir, config, experiment.section_defaults)
  # The experiment is built from the held-out split's spec: evaluation reads neither the
  # training split (except as eval.generator='train_data') nor the penalty's classifier.
  real = RealData(config)
  exp = experiment.build(config, real.source.spec, for_training=False)
  evaluator = runner.Evaluator(exp, out_dir=os.path.join(workdir, "eval"), real=real)
  if config.eval.generator == "train_data":
    state, step, which, name = None, 0, "none", "reference_train_data.json"
  else:
    which = str(config.eval.checkpoint)
    state, step = experiment.restore_checkpoint(exp, workdir, which)
    name = f"step_{step:06d}.json" if which != "best" else f"best_step_{step:06d}.json"
  checkpoint.ensure_writable(os.path.join(workdir, "eval"), "the eval directory")
  results = evaluator(state, step)
  provenance = evaluator.provenance()
  path = runner.report_path(os.path.join(workdir, "eval", name), provenance)
  runner.write_report(path, step, which, results, provenance)
  print(f"Evaluation of {workdir} ({which} checkpoint, step {step}):")
  print(runner.format_table(results))
  print(f"Provenance: {provenance}")
  logging.info("Wrote %s.", path)
  return {"step": step, "metrics": results, "path": path, "provenance": provenance}


def sample(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Writes sample, interpolation and (conditional) per-class grids as PNG and .npz."""
  experiment.validate(config)
  workdir = storage.normalize(workdir)
  checkpoint.check_config(workdir, config, experiment.section_defaults)
  exp = experiment.build(config, data.load_eval(config.data).spec, for_training=False)
  cfg = config.sample
  state, step = experiment.restore_checkpoint(exp, workdir, str(cfg.checkpoint))
  out_dir = os.path.join(workdir, "sample", f"step_{step:06d}")
  checkpoint.ensure_writable(out_dir, "the sample directory")
  files = sampling.write_samples(exp, state, step, out_dir, cfg.num, cfg.seed, cfg.truncation,
                                 cfg.interpolation_steps)
  print("\n".join(files))
  return files
