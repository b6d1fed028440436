"""``--mode=audit``: a lower bound on a DP-SGD config's epsilon from one training run.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023):
train once on the data plus ``m`` canaries, each in the training data with probability 1/2,
score every canary after training, and turn the number of correct membership guesses into a
lower bound on epsilon at a stated confidence (``metrics.privacy_audit.one_run_audit``). A
correct DP-SGD keeps the bound below its accountant's epsilon; one that adds too little
noise, clips wrongly or lets rows outside its Poisson draws through does not.

Two kinds of canaries (``audit.canaries`` of each), each audited on its own (the two sets'
inclusions are independent, so each bound holds by itself):

- white-box gradient canaries, the tightest kind for DP-SGD: a canary row contributes the
  Dirac gradient ``C e_j`` at its own coordinate ``j`` instead of its loss gradient, in ``m``
  coordinates that DP-SGD privatises with the network's gradient (the same noise and
  divisor) but that no example's loss touches (``fairgen.privacy.dpsgd``), so no data
  gradient hides it. Its score is the sum of that coordinate's privatised values over the
  run (``state['canary_scores']``, kept by the audit run's step): ``(k C + noise) / E`` for a
  canary drawn ``k`` times. On the network's own coordinates, the data's gradients (aligned
  over steps, ``T C / sqrt(d)`` per coordinate against the canary's ``q T C / E``) hid the
  canaries of a run without noise (the smoke DP VAE, 50 steps, 200 canaries, claiming
  epsilon = 1: bound 0.36);
- black-box input canaries: held-out examples (the eval split's) added as ordinary rows,
  scored by the trained model's membership score (``Objective.member_score``: the
  discriminator's logit, the VAE's ELBO). Objectives without one get none.

The audit run is an ordinary, resumable run of the config in ``WORKDIR/audit/``, on the
training split plus the included canaries: its N is larger, so its accountant's epsilon
(``epsilon`` in the report, the claim being audited) is its own; ``epsilon_config`` is what
the config spends on its own data. The report: ``WORKDIR/eval/audit_step_NNNNNN.json``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from fairgen import data
from fairgen import experiment
from fairgen import storage
from fairgen import train
from fairgen.config import require
from fairgen.evaluation import runner
from fairgen.metrics import privacy_audit

AUDIT_DIR = "audit"


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError unless ``config`` is a DP-SGD run this audit can insert canaries in."""
  experiment.validate(config)
  runner.validate(config.eval)
  require("privacy" in config, "--mode=audit audits a DP-SGD run, and the config has no "
          "privacy section.")
  fair = config.get("fair")
  require(fair is None or fair.method == "baseline",
          f"--mode=audit inserts canaries into the training data, which "
          f"fair.method={fair.method if fair is not None else ''!r} would reweight or "
          f"resample; audit the run without a mitigation (fair.method='baseline').")
  audit = config.get("audit") or {}
  m = audit.get("canaries", 0)
  require(isinstance(m, int) and not isinstance(m, bool) and m >= 10,
          f"audit.canaries must be an integer >= 10, got {m!r}.")
  require(0 < audit.get("confidence", 0) < 1,
          f"audit.confidence must be in (0, 1), got {audit.get('confidence')!r}.")
  require(isinstance(audit.get("seed"), int), f"audit.seed must be an integer, got "
          f"{audit.get('seed')!r}.")


@dataclasses.dataclass(frozen=True)
class Canaries:
  """The audit's canaries and which of them are in the training data.

  Attributes:
    coords: ``[m]`` the white-box canaries' coordinates (``0 .. m-1``).
    white_in: ``[m]`` whether each white-box canary is in the data.
    black: ``[m_b]`` held-out example rows (black-box), or None.
    black_in: ``[m_b]`` whether each black-box canary is in the data.
  """

  coords: np.ndarray
  white_in: np.ndarray
  black: dict[str, np.ndarray] | None
  black_in: np.ndarray


def draw_canaries(held_out: data.Source | None, count: int, seed: int) -> Canaries:
  """``count`` canaries of each kind, each included with probability 1/2 (seeded)."""
  rng = np.random.default_rng([seed, 0x5A17])
  coords = np.arange(count, dtype=np.int32)
  white_in = rng.random(count) < 0.5
  if held_out is None:
    return Canaries(coords, white_in, None, np.zeros(0, bool))
  rows = np.sort(rng.choice(len(held_out), min(count, len(held_out)), replace=False))
  return Canaries(coords, white_in, held_out.get(rows), rng.random(len(rows)) < 0.5)


class CanarySource:
  """The training split followed by the included canaries, with a ``canary`` column: the
  white-box coordinate of a gradient canary's row, -1 for every other row."""

  def __init__(self, base: data.Source, extra: dict[str, np.ndarray], canary: np.ndarray):
    self.base, self.spec, self.extra = base, base.spec, extra
    self.canary = np.asarray(canary, np.int32)

  def __len__(self) -> int:
    return len(self.base) + len(self.canary)

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    n = len(self.base)
    inside = indices < n
    out = self.base.get(np.where(inside, indices, 0))
    if not len(self.canary):  # Every canary left out (a 2^-2m chance): the split itself.
      return {**out, "canary": np.full(len(indices), -1, np.int32)}
    rows = np.where(inside, 0, indices - n)
    for key, values in out.items():
      shape = (-1,) + (1,) * (values.ndim - 1)
      out[key] = np.where(inside.reshape(shape), values, self.extra[key][rows])
    out["canary"] = np.where(inside, -1, self.canary[rows]).astype(np.int32)
    return out


def canary_source(base: data.Source, canaries: Canaries) -> CanarySource:
  """``base`` plus the included canaries: white-box rows (zeros: their content is never
  used) and black-box rows (the held-out examples, their other columns zero)."""
  white = np.flatnonzero(canaries.white_in)
  black = np.flatnonzero(canaries.black_in)
  template = base.get(np.zeros(len(white) + len(black), np.int64))
  extra = {k: np.zeros_like(v) for k, v in template.items()}
  for key, values in (canaries.black or {}).items():
    if key in extra:
      extra[key][len(white):] = values[black]
  coords = np.r_[canaries.coords[white], np.full(len(black), -1, np.int32)]
  return CanarySource(base, extra, coords)


def black_box_scores(exp: experiment.Experiment, state: Any, rows: dict[str, np.ndarray],
                     batch_size: int) -> np.ndarray:
  """The trained model's membership score of each black-box canary."""
  score = jax.jit(exp.objective.member_score)
  key = exp.objective.condition_key if exp.objective.num_classes else "label"
  out = []
  for start in range(0, len(rows["image"]), batch_size):
    part = slice(start, start + batch_size)
    labels = np.asarray(rows.get(key, np.zeros(len(rows["image"])))[part], np.int32)
    out.append(np.asarray(score(state, rows["image"][part], labels), np.float64))
  return np.concatenate(out)


def _bounds(prefix: str, scores: np.ndarray, included: np.ndarray, delta: float,
            confidence: float) -> dict[str, float]:
  found = privacy_audit.one_run_audit(scores, included, delta, 1.0 - confidence)
  return {f"{prefix}_epsilon_lb": float(found["epsilon_lb"]),
          f"{prefix}_guesses": float(found["guesses"]),
          f"{prefix}_correct": float(found["correct"]),
          f"{prefix}_canaries": float(len(scores))}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the audit run of ``config`` in ``WORKDIR/audit/`` and writes the bounds.

  Returns:
    ``{'step', 'metrics', 'path'}`` of the report (``metrics``: the audit run's accountant
    epsilon, the config's own, and each kind's bound, guesses and correct guesses); without
    a report (``path`` None) when a signal stopped the audit run: run it again to resume.
  """
  validate(config)
  workdir = storage.normalize(workdir)
  base = data.load(config.data, config.data.split)
  claim = experiment.build(config, base.spec, for_training=False, num_examples=len(base))
  held_out = (data.load_eval(config.data) if claim.objective.member_score is not None
              else None)
  audit = config.audit
  canaries = draw_canaries(held_out, audit.canaries, audit.seed)
  source = canary_source(base, canaries)
  run_config = config.copy_and_resolve_references()
  run_config.eval.every_steps = 0  # The audit run is scored once, below.
  run_config.audit.active = True
  run_dir = os.path.join(workdir, AUDIT_DIR)
  summary = train.train_and_evaluate(run_config, run_dir, source=source)
  if summary["preempted"]:
    return {"step": summary["final_step"], "metrics": {}, "path": None}
  exp = experiment.build(run_config, base.spec, num_examples=len(source))
  state, step = experiment.restore_checkpoint(exp, run_dir)
  delta = exp.privacy.delta
  results = {"epsilon": exp.privacy.epsilon(step),
             "epsilon_config": claim.privacy.epsilon(step)}
  results.update(_bounds("audit_white_box",
                         np.asarray(state[experiment.CANARY_SCORES], np.float64),
                         canaries.white_in, delta, audit.confidence))
  if canaries.black is not None:
    results.update(_bounds("audit_black_box", black_box_scores(
        exp, state, canaries.black, config.eval.batch_size), canaries.black_in, delta,
        audit.confidence))
  provenance = {"privacy": exp.privacy.mechanism(),
                "audit": {k: audit[k] for k in ("canaries", "confidence", "seed")},
                "num_examples_config": len(base), "method": "steinke2023_one_run"}
  path = os.path.join(workdir, "eval", f"audit_step_{step:06d}.json")
  runner.write_report(path, step, "audit", results, provenance)
  print(f"Privacy audit of {workdir} (audit run: {run_dir}, step {step}):")
  print(runner.format_table(results))
  logging.info("Wrote %s.", path)
  return {"step": step, "metrics": results, "path": path}
