r"""Reproduces AIF360's adversarial-debiasing demo on Adult (sex), with the published rows.

python experiments/repro/aif360_adversarial_debiasing.py [--out=DIR] [--seeds=5] [--quick]

The demo (AIF360 ``examples/demo_adversarial_debiasing.ipynb``): AIF360's preprocessed
Adult (``adult_aif360``), a random 70/30 split, 50 epochs, batch 128, 200 hidden units,
adversary weight 0.1, with and without debiasing. Every run goes through fairgen's own
loop (``experiments/adult_debias.py``); seed ``s`` sets both the split and the
initialisation. Prints mean ± std over seeds beside the published numbers and writes
``results.csv`` and ``results.md`` to ``--out``. ``--quick`` runs a few steps on 2 seeds (the
test suite runs it; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import numpy as np

from fairgen import config as config_lib
from fairgen import train

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "adult_debias.py")
METRICS = ("accuracy", "statistical_parity_difference", "equal_opportunity_difference",
           "average_odds_difference")
SHORT = {"accuracy": "acc", "statistical_parity_difference": "SPD",
         "equal_opportunity_difference": "EOD", "average_odds_difference": "AOD"}
PUBLISHED = {"plain": (0.805, -0.221, -0.471, -0.291),
             "debiased": (0.792, -0.095, -0.091, -0.054)}


def run(method: str, seed: int, out: str, quick: bool) -> dict[str, float]:
  """Trains one model through fairgen's loop; returns its test-split metrics."""
  config = config_lib.load_config_file(CONFIG, "plain" if method == "plain" else None)
  config.seed = seed
  config.data.options.split_seed = seed
  if quick:
    config.train.num_steps = 20
    config.train.checkpoint_every_steps = 20
    config.log.every_steps = 10
  config.eval.every_steps = config.train.num_steps  # evaluate once, at the end
  summary = train.train_and_evaluate(config, os.path.join(out, f"{method}_seed{seed}"))
  return {k: summary["eval"][k] for k in METRICS}


def check_targets(ours: dict[str, np.ndarray]) -> list[tuple[str, bool]]:
  """The reproduction targets and whether our means meet them."""
  plain, debiased = ours["plain"].mean(0), ours["debiased"].mean(0)
  return [
      ("plain accuracy within ±0.02 of 0.805", abs(plain[0] - 0.805) <= 0.02),
      ("debiased accuracy within ±0.02 of 0.792", abs(debiased[0] - 0.792) <= 0.02),
      ("debiased |SPD| <= 0.10", abs(debiased[1]) <= 0.10),
      ("debiased |AOD| <= 0.08", abs(debiased[3]) <= 0.08),
  ]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="/tmp/fg/aif360_adversarial_debiasing")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="a few steps, 2 seeds (tests)")
  args = parser.parse_args()
  seeds = 2 if args.quick else args.seeds
  start = time.time()
  ours = {m: np.array([list(run(m, s, args.out, args.quick).values()) for s in range(seeds)])
          for m in ("plain", "debiased")}
  lines = [f"| | {' | '.join(SHORT[m] for m in METRICS)} |", "|---" * (len(METRICS) + 1) + "|"]
  for method in ("plain", "debiased"):
    lines.append(f"| {method} (AIF360, published) | "
                 + " | ".join(f"{v:.3f}" for v in PUBLISHED[method]) + " |")
    mean, std = ours[method].mean(0), ours[method].std(0)
    lines.append(f"| {method} (fairgen, {seeds} seeds) | "
                 + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(mean, std)) + " |")
  targets = check_targets(ours)
  lines += ["", *[f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in targets],
            "", f"Total time: {time.time() - start:.0f} s"]
  table = "\n".join(lines)
  print(table)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["method", "seed", *METRICS])
    for method, rows in ours.items():
      for seed, row in enumerate(rows):
        writer.writerow([method, seed, *row])


if __name__ == "__main__":
  main()
