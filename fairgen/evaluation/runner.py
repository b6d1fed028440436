"""The ``eval`` config section's checks and the evaluation runner.

``EVALUATORS`` (``fairgen.evaluation.registry``) maps a name listed in ``config.eval.metrics``
to an ``Entry``: the function and what it needs loaded, so nothing switches on evaluator
names; the evaluator modules imported below register theirs. The same
``Evaluator`` runs periodically during training (``eval.every_steps``) and in
``--mode=evaluate`` (``fairgen.evaluation.modes``); both write
``WORKDIR/eval/step_NNNNNN.json`` (numbers and provenance).

``eval.generator='train_data'`` evaluates training images in place of generated ones: the
"copy of the training data" upper bound that a generator's numbers should be read against.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from fairgen import experiment
from fairgen import storage
from fairgen.classifiers import backbones
from fairgen.classifiers import inception
from fairgen.config import require
# The package's evaluator modules, each registering its evaluators.
from fairgen.evaluation import audit  # noqa: F401
from fairgen.evaluation import groups
from fairgen.evaluation import image  # noqa: F401
from fairgen.evaluation import tabular  # noqa: F401
from fairgen.evaluation.context import EvalContext, RealData
from fairgen.evaluation.registry import EVALUATORS, Entry  # noqa: F401 (re-exported)

GENERATORS = ("model", "train_data")




def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for an impossible ``eval`` section."""
  for name in cfg.metrics:
    require(name in EVALUATORS,
            f"Unknown evaluator {name!r} in eval.metrics; valid: {', '.join(EVALUATORS.names())}.")
  require(cfg.backbone in backbones.BACKBONES,
          f"Unknown eval.backbone={cfg.backbone!r}; valid: "
          f"{', '.join(backbones.BACKBONES.names())}.")
  require(cfg.resize in inception.RESIZE_MODES,
          f"eval.resize must be one of {inception.RESIZE_MODES}, got {cfg.resize!r}.")
  require(isinstance(cfg.quantize, bool),
          f"eval.quantize must be True or False, got {cfg.quantize!r}.")
  require(cfg.generator in GENERATORS,
          f"eval.generator must be one of {GENERATORS}, got {cfg.generator!r}.")
  require(cfg.every_steps >= 0, f"eval.every_steps must be >= 0, got {cfg.every_steps}.")
  require(cfg.num_samples >= 2, f"eval.num_samples must be >= 2, got {cfg.num_samples}.")
  require(cfg.batch_size >= 1, f"eval.batch_size must be >= 1, got {cfg.batch_size}.")
  require(cfg.best_mode in ("min", "max"),
          f"eval.best_mode must be 'min' or 'max', got {cfg.best_mode!r}.")
  require(cfg.iwae_k >= 1, f"eval.iwae_k must be >= 1, got {cfg.iwae_k}.")
  require(cfg.kid_subsets >= 1, f"eval.kid_subsets must be >= 1, got {cfg.kid_subsets}.")
  require(cfg.kid_subset_size >= 2,
          f"eval.kid_subset_size must be >= 2, got {cfg.kid_subset_size}.")
  require(cfg.is_splits >= 1, f"eval.is_splits must be >= 1, got {cfg.is_splits}.")
  require("is" not in cfg.metrics or cfg.num_samples >= cfg.is_splits,
          f"eval.num_samples={cfg.num_samples} cannot be split into eval.is_splits="
          f"{cfg.is_splits} Inception Score splits.")
  require(cfg.prdc_k >= 1, f"eval.prdc_k must be >= 1, got {cfg.prdc_k}.")
  require(cfg.cleam_batches >= 2, f"eval.cleam_batches must be >= 2, got {cfg.cleam_batches}.")
  require("cleam" not in cfg.metrics or cfg.cleam_batches <= cfg.num_samples,
          f"eval.cleam_batches={cfg.cleam_batches} batches need eval.num_samples >= that, got "
          f"{cfg.num_samples}.")
  require(cfg.truncation >= 0, f"eval.truncation must be >= 0, got {cfg.truncation}.")
  require(cfg.likelihood_examples >= 0,
          f"eval.likelihood_examples must be >= 0, got {cfg.likelihood_examples}.")
  require(cfg.get("tstr_steps", 1000) >= 1,
          f"eval.tstr_steps must be >= 1, got {cfg.get('tstr_steps')}.")
  require(cfg.get("audit_examples", 1000) >= 2,
          f"eval.audit_examples must be >= 2, got {cfg.get('audit_examples')}.")
  which = str(cfg.checkpoint)
  require(which in ("latest", "best") or which.isdigit(),
          f"eval.checkpoint must be 'latest', 'best' or a step number, got {which!r}.")


class Evaluator:
  """Runs ``config.eval.metrics`` on train states; real-data features are computed once."""

  def __init__(self, exp: experiment.Experiment, out_dir: str | None = None,
               real: RealData | None = None):
    self.exp = exp
    self.out_dir = out_dir
    self.cfg = exp.config.eval
    self.evaluators = [(name, EVALUATORS.get(name)) for name in self.cfg.metrics]
    self.real = real or RealData(exp.config)
    self.needs_backbone = any(e.needs_backbone for _, e in self.evaluators)
    self.needs_groups = any(e.needs_attribute_classifier for _, e in self.evaluators)

  def check(self) -> None:
    """Loads what the evaluators need now, so a missing backbone or statistics file fails
    before training."""
    if self.needs_backbone:
      self.real.reference  # pylint: disable=pointless-statement
    if self.needs_groups:
      # Loads the attribute classifier and checks fair.target against its groups.
      groups.describe(self.exp.config, self.real.attribute_classifier)

  def __call__(self, state: Any, step: int) -> dict[str, float]:
    ctx = EvalContext(self.exp, state, self.real, step, self.out_dir)
    results: dict[str, float] = {}
    for name, entry in self.evaluators:
      start = time.perf_counter()
      for key, value in entry.fn(ctx):
        results[key] = float(value)
      logging.info("Evaluator %s took %.1f s.", name, time.perf_counter() - start)
    if self.exp.privacy is not None and self.cfg.generator == "model":
      # The privacy the evaluated weights were trained with: epsilon of ``step`` steps.
      results.update(self.exp.privacy.spent(step))
    return results

  def provenance(self) -> dict[str, Any]:
    """Which backbone, data and sample count produced the numbers."""
    out = {"num_samples": self.cfg.num_samples, "generator": self.cfg.generator,
           "real_split": self.exp.config.data.eval_split, "seed": self.cfg.seed}
    if self.cfg.generator == "model":  # How the samples were drawn.
      out["truncation"] = self.cfg.truncation
      out["standing_stats"] = self.exp.config.objective.get("standing_stats", 0)
    if self.needs_backbone:
      out["backbone"] = self.real.backbone.describe()
      out["num_real"] = len(self.real.indices)
      if self.real.reference is not None:
        out["reference_stats"] = self.real.reference.describe()
    if "likelihood" in self.cfg.metrics:
      out["iwae_k"] = self.cfg.iwae_k
    if self.needs_groups:
      out.update(groups.describe(self.exp.config, self.real.attribute_classifier))
    if self.exp.privacy is not None and self.cfg.generator == "model":
      out["privacy"] = self.exp.privacy.mechanism()
    return out


def format_table(results: dict[str, float]) -> str:
  """A two-column text table of metric values."""
  width = max((len(k) for k in results), default=6)
  return "\n".join([f"{'metric':<{width}}  value", "-" * (width + 14)] +
                   [f"{k:<{width}}  {v:.6g}" for k, v in results.items()])


def report_path(path: str, provenance: dict[str, Any]) -> str:
  """``path``, or ``<stem>-<digest>.json`` when ``path`` holds a report of another
  provenance: an evaluation with another backbone, preprocessing or sample count never
  replaces an earlier one (the digest is of the provenance's JSON)."""
  if storage.exists(path):
    old = json.loads(storage.read_text(path)).get("provenance")
    if json.loads(json.dumps(old)) != json.loads(json.dumps(provenance)):
      digest = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:8]
      return f"{path[:-len('.json')]}-{digest}.json"
  return path


def write_report(path: str, step: int, checkpoint: str, results: dict[str, float],
                 provenance: dict[str, Any]) -> None:
  """Writes one evaluation as JSON (atomically; process 0 only)."""
  if jax.process_index() != 0:
    return
  storage.write_atomic(path, json.dumps(
      {"step": step, "checkpoint": checkpoint, "metrics": results, "provenance": provenance,
       "time": time.time()}, indent=2, sort_keys=True))
