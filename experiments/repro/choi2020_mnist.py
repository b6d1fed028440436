r"""Reproduces Choi et al. 2020's comparison of fair-generation methods on biased MNIST.

python experiments/repro/choi2020_mnist.py --out=/tmp/fg/choi [--seeds=3] [--quick]
  [--models=dcgan,ddpm,edm,flow]

Setting ("Fair Generative Modeling via Weak Supervision", ICML 2020, on fairgen's offline
MNIST): digits 0-4 are group 0, digits 5-9 group 1. The biased set has 1,400 digits at
90/10; the balanced reference set is ``ref_fraction`` of that size. Every method trains
``experiments/fair_mnist.py`` (the small DCGAN, 2,000 steps by default) on the union of both
sets, through fairgen's own loop:

  baseline     equal weights on biased + reference;
  importance   density-ratio importance weights (Choi et al.);
  resample     batches balanced by the group labels;
  conditional  a group-conditional generator sampled with the uniform prior;
  penalty      L_G + lambda * KL(mean predicted groups || uniform), the frozen classifier.

``--models=dcgan,ddpm`` adds DDPM rows (``fair_mnist.py:model=ddpm``: the small U-Net,
sampled by 50-step DDIM) for the methods DDPM supports (all but the penalty and guidance;
its conditional is classifier-free guidance on the group). They are named ``ddpm <method>``.
``edm`` and ``flow`` add rows of ``fair_mnist.py:model=edm|flow`` (the same U-Net, Heun at
35 evaluations), which also run ``guidance`` (the sampler steered toward each sample's
target group by the attribute classifier; it trains as the baseline does).
``--models=dcgan,ddpm:baseline+importance`` runs DDPM for those two methods only.

Each run is evaluated on the balanced held-out digits: FD-L2/FD-KL (the attribute
classifier's hard labels over 1,000 samples), FID, per-group FID (generated group g
against real group g), and CLEAM's FD-L2 and group-1 share (the shares corrected for the
attribute classifier's confusion matrix on the held-out digits, ``fairgen.metrics.cleam``). The script first trains the attribute classifier and the FID
classifier into ``OUT/classifiers/`` and reports their accuracy.

Writes ``OUT/results.csv`` (one row per run), ``OUT/results.md`` (mean ± std over seeds per
method and ref_fraction, with the reference anchors and the target check) and keeps each
run's workdir under ``OUT/runs/``. A run whose workdir already holds its final evaluation is
not repeated, so an interrupted reproduction resumes where it stopped. ``--quick`` runs
tiny settings on one seed and one ref_fraction (the test suite runs it; its numbers mean
nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

from fairgen import cli
from fairgen import config as config_lib
from fairgen import data
from fairgen import fairness
from fairgen import objectives
from fairgen.classifiers import backbones
from fairgen.classifiers import fit
from fairgen.evaluation import modes
from fairgen.fairness import importance

choi_common = cli.import_beside(__file__, "choi_common")  # experiments/repro/

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "fair_mnist.py")
REF_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
METRICS = ("fd_l2", "cleam_fd_l2", "fd_kl", "fid", "fid_group_0", "fid_group_1",
           "group_share_1", "cleam_share_1")
COPY_FD_L2 = math.sqrt(2) * 0.4  # A generator that copies the 90/10 split: 0.566.
# fair_mnist.py's model= and its objective; a model runs the methods whose needs its
# objective's capabilities meet (the DCGAN: all but guidance; DDPM: all but the penalty and
# guidance; EDM and flow matching: all but the penalty).
OBJECTIVE_OF = {"dcgan": "gan", "ddpm": "diffusion", "edm": "edm", "flow": "flow"}
MODELS = {model: tuple(fairness.registry.supported(objectives.OBJECTIVES.get(name).capabilities))
          for model, name in OBJECTIVE_OF.items()}
CHOI_REDUCTION = 0.346  # Choi et al.: importance weighting reduces bias by up to 34.6%.


def train_classifiers(out: str, quick: bool) -> dict[str, dict]:
  """Trains (or reuses) the attribute and the FID classifiers; returns their records."""
  records = {}
  for label, subset in (("attr", "balanced"), ("label", "all")):
    directory = os.path.join(out, "classifiers", label)
    info_path = os.path.join(directory, backbones.INFO_FILE)
    if not os.path.exists(info_path):
      options = {"attribute": "digit_group", "subset": subset}
      train_src = data.load({"name": "biased_mnist", "options": options}, "train")
      test_src = data.load({"name": "biased_mnist", "options": options}, "test")
      params, info = fit.train_classifier(
          train_src, test_src, label_key=label, num_classes=2 if label == "attr" else None,
          steps=30 if quick else 1000, width=8 if quick else 32)
      backbones.save_classifier(directory, params, info, overwrite=True)
    with open(info_path) as f:
      info = json.load(f)
    records[label] = {"dir": directory, "test_accuracy": info["test_accuracy"],
                      "num_test": info["num_test"]}
    print(f"{label} classifier: test accuracy {info['test_accuracy']:.4f} on "
          f"{info['num_test']} balanced test digits ({directory})", flush=True)
  return records


def make_config(method: str, ref_fraction: float, seed: int, classifiers: dict,
                quick: bool, steps: int | None, model: str = "dcgan"):
  """The fair_mnist config of one run."""
  c = config_lib.load_config_file(CONFIG, f"method={method},model={model}"
                                  + (",smoke" if quick else ""))
  c.seed = seed
  c.data.options.seed = seed
  c.data.options.ref_fraction = ref_fraction
  c.fair.ratio.seed = seed
  c.fair.classifier_dir = classifiers["attr"]["dir"]
  c.eval.backbone_dir = classifiers["label"]["dir"]
  c.eval.metrics = ("fid", "fairness_discrepancy", "group_quality", "cleam")
  if steps:
    c.train.num_steps = steps
  c.eval.every_steps = c.train.num_steps  # One evaluation, at the end.
  c.log.sample_every_steps = c.train.num_steps
  return c


def row_name(model: str, method: str) -> str:
  """A run's method column: the method for the DCGAN, ``<model> <method>`` otherwise."""
  return method if model == "dcgan" else f"{model} {method}"


def run(method: str, ref_fraction: float, seed: int, out: str, classifiers: dict,
        quick: bool, steps: int | None, model: str = "dcgan") -> dict[str, float]:
  """Trains and evaluates one run, or reads the result of a finished one."""
  prefix = "" if model == "dcgan" else f"{model}_"
  workdir = os.path.join(out, "runs", f"{prefix}{method}_ref{ref_fraction}_seed{seed}")

  def extra(config, workdir: str) -> dict[str, float]:
    result = {}
    if method == "baseline" and model == "dcgan":
      # The copy-of-the-training-data reference: the union's own groups and FD.
      config.eval.generator = "train_data"
      copy = modes.evaluate(config, workdir)["metrics"]
      result["data_fd_l2"] = float(copy["fd_l2"])
      result["data_share_1"] = float(copy["group_share_1"])
    ratio_info = os.path.join(workdir, importance.RATIO_DIR, "info.json")
    if os.path.exists(ratio_info):
      with open(ratio_info) as f:
        diag = json.load(f).get("diagnostics", {})
      result["weighted_share_1"] = float(
          diag.get("effective_proportions", [0, float("nan")])[1])
    return result

  config = make_config(method, ref_fraction, seed, classifiers, quick, steps, model)
  return choi_common.run_or_load(workdir, config, METRICS, extra,
                                 label=f"{row_name(model, method):<16} ref {ref_fraction:<4} "
                                       f"seed {seed}")


def table(results: dict, methods: tuple[str, ...], fractions: tuple[float, ...],
          seeds: int) -> list[str]:
  """The markdown table (mean ± std over seeds) and the target check lines."""
  lines = ["| ref_fraction | method | FD-L2 | FD-L2 (CLEAM) | FD-KL | FID | FID group 0 | "
           "FID group 1 | share of group 1 | (CLEAM) |", "|---" * 10 + "|"]
  for rf in fractions:
    if "baseline" in methods:
      rows = [results[("baseline", rf, s)] for s in range(seeds)]
      lines.append(f"| {rf} | training data (copy) | {choi_common.cell([r['data_fd_l2'] for r in rows])} "
                   "| – | – | – | – | – | "
                   f"{choi_common.cell([r['data_share_1'] for r in rows])} | – |")
    for m in methods:
      rows = [results[(m, rf, s)] for s in range(seeds)]
      cells = [choi_common.cell([r[k] for r in rows], 1 if k.startswith("fid") else 3) for k in METRICS]
      lines.append(f"| {rf} | {m} | " + " | ".join(cells) + " |")
  lines += ["", "Reference anchors:",
            f"- a generator that copies the 90/10 split: FD-L2 = {COPY_FD_L2:.3f} "
            f"(two groups, uniform target);",
            f"- Choi et al. 2020: importance weighting reduces bias by up to "
            f"{100 * CHOI_REDUCTION:.1f}% on average over baselines.", "",
            "Target: importance reduces FD-L2 vs the baseline by >= 30% at ref_fraction >= 0.25,"
            " with FID <= 1.25x the baseline's:"]
  for model in MODELS:
    baseline, weighted = row_name(model, "baseline"), row_name(model, "importance")
    if baseline not in methods or weighted not in methods:
      continue
    for rf in fractions:
      base = [results[(baseline, rf, s)] for s in range(seeds)]
      imp = [results[(weighted, rf, s)] for s in range(seeds)]
      b_fd, i_fd = np.mean([r["fd_l2"] for r in base]), np.mean([r["fd_l2"] for r in imp])
      b_fid, i_fid = np.mean([r["fid"] for r in base]), np.mean([r["fid"] for r in imp])
      reduction = 1.0 - i_fd / b_fd if b_fd > 0 else float("nan")
      ok = reduction >= 0.30 and i_fid <= 1.25 * b_fid
      scope = "" if rf >= 0.25 else " (outside the target's range)"
      lines.append(f"- {model}, ref_fraction {rf}: FD-L2 reduction {100 * reduction:.1f}% "
                   f"(Choi et al.: up to {100 * CHOI_REDUCTION:.1f}%), FID ratio "
                   f"{i_fid / b_fid:.2f}: {'met' if ok else 'NOT met'}{scope}")
  return lines


def parse_runs(models: str, methods: tuple[str, ...]) -> list[tuple[str, str]]:
  """The (model, method) runs of ``--models``: each of ``methods`` the model supports, or for
  ``MODEL:M1+M2``, M1 and M2 instead (``dcgan,ddpm:importance``)."""
  runs = []
  for entry in models.split(","):
    model, _, only = entry.partition(":")
    if model not in MODELS:
      cli.fail(f"unknown model {model!r} in --models={models}; valid: {', '.join(MODELS)}.")
    chosen = only.split("+") if only else methods
    refused = [m for m in chosen if only and m not in MODELS[model]]
    if refused:
      cli.fail(f"--models={models}: {model} does not support {refused}; it supports "
               f"{', '.join(MODELS[model])}.")
    runs += [(model, m) for m in MODELS[model] if m in chosen]
  return runs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="/tmp/fg/choi")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--ref_fractions", default=",".join(str(r) for r in REF_FRACTIONS))
  parser.add_argument("--methods", default=",".join(fairness.METHODS))
  parser.add_argument("--steps", type=int, default=None,
                      help="train.num_steps of every run (default: the config's)")
  parser.add_argument("--models", default="dcgan",
                      help="dcgan, ddpm, edm and/or flow (each runs the methods of --methods "
                      "its objective supports); "
                      "MODEL:M1+M2 runs that model for M1 and M2 instead of --methods")
  parser.add_argument("--quick", action="store_true",
                      help="tiny settings, 1 seed, ref_fraction 0.25 (tests)")
  args = parser.parse_args()
  seeds = 1 if args.quick else args.seeds
  fractions = (0.25,) if args.quick else tuple(float(r) for r in args.ref_fractions.split(","))
  methods = tuple(args.methods.split(","))
  unknown = [m for m in methods if m not in fairness.METHODS]
  if unknown:
    cli.fail(f"unknown methods {unknown}; valid: {', '.join(fairness.METHODS)}.")
  runs = parse_runs(args.models, methods)
  start = time.time()
  os.makedirs(args.out, exist_ok=True)
  classifiers = train_classifiers(args.out, args.quick)
  results = {}
  for seed in range(seeds):
    for rf in fractions:
      for model, m in runs:
        results[(row_name(model, m), rf, seed)] = run(m, rf, seed, args.out, classifiers,
                                                      args.quick, args.steps, model)
  lines = table(results, tuple(row_name(model, m) for model, m in runs), fractions, seeds)
  lines += ["", f"Attribute classifier: test accuracy {classifiers['attr']['test_accuracy']:.4f}; "
            f"FID classifier: {classifiers['label']['test_accuracy']:.4f}.",
            choi_common.run_time_line(results, seeds, time.time() - start)]
  extra = ["weighted_share_1", "data_fd_l2", "data_share_1", "seconds"]
  choi_common.write_outputs(args.out, "\n".join(lines), ("method", "ref_fraction", "seed"),
                            results, (*METRICS, *extra))


if __name__ == "__main__":
  main()
