r"""Privacy and fairness together: fair generation on biased MNIST with and without DP-SGD.

python experiments/repro/dp_fairness_mnist.py --out=/tmp/fg/dp_fair [--eps=10,inf] [--seeds=3] [--quick]

The setting of ``choi2020_mnist.py`` (digits 0-4 group 0, 5-9 group 1, a 90/10 biased set of
1,400 digits plus a balanced reference set of a quarter of that size; the small DCGAN of
``experiments/fair_mnist.py``, 2,000 steps), trained with the baseline (the union, equal
weights) and with importance weighting, each without DP and with the discriminator trained
by DP-SGD at ``--eps`` (delta 1e-5, Poisson batches of 64 on average padded to 96). Both
importance runs clip the weights to [1/5, 5] (``fair.clip``), which DP needs to bound each
example's contribution. Resampling is not run under DP: Poisson sampling's accountant does
not cover weighted sampling, and fairgen refuses it.

DP is known to hurt under-represented groups most (Bagdasaryan et al., NeurIPS 2019,
"Differential Privacy Has Disparate Impact on Model Accuracy"). The table shows, per run,
the generated share of group 1 (the minority, 10% of the biased set) and its FD-L2 to the
uniform target, FID overall and per group, and the epsilon spent.

Writes ``OUT/results.md`` and ``OUT/results.csv``; a run whose workdir holds its result is
not repeated. ``--quick`` runs tiny settings (the test suite runs it; its numbers mean
nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

from fairgen import cli
from fairgen import privacy

# experiments/repro/, beside this script.
choi2020_mnist = cli.import_beside(__file__, "choi2020_mnist")
choi_common = cli.import_beside(__file__, "choi_common")

METHODS = ("baseline", "importance")
METRICS = ("fd_l2", "group_share_1", "fid", "fid_group_0", "fid_group_1", "epsilon")
COLUMNS = ("epsilon", "group_share_1", "fd_l2", "fid", "fid_group_0", "fid_group_1")
WEIGHT_CLIP = 5.0


def make_config(method: str, dp: bool, eps: float, seed: int, classifiers: dict, quick: bool,
                steps: int | None):
  """The fair_mnist config of one run, with a privacy section when ``dp`` (``eps`` inf:
  clipping and Poisson sampling without noise)."""
  c = choi2020_mnist.make_config(method, 0.25, seed, classifiers, quick, steps)
  c.eval.metrics = ("fid", "fairness_discrepancy", "group_quality")
  if method == "importance":
    c.fair.clip = WEIGHT_CLIP
  if dp:
    c.train.batch_size = 16 if quick else 96
    c.privacy = privacy.budget_section(eps, clip_norm=1.0, delta=1e-5,
                                       expected_batch_size=12 if quick else 64)
    if math.isinf(eps):
      c.fair.ratio.noise_multiplier = 0.0
    elif quick:  # No solve: fast tests.
      c.privacy.update(noise_multiplier=1.0, target_epsilon=0.0)
  return c


def ratio_epsilon(config, workdir: str) -> dict[str, float]:
  """The epsilon the run's DP density-ratio classifier spent (nan: none)."""
  del config
  path = os.path.join(workdir, "density_ratio", "info.json")
  if not os.path.exists(path):
    return {"ratio_epsilon": float("nan")}
  with open(path) as f:
    record = json.load(f).get("privacy") or {}
  value = record.get("epsilon")
  return {"ratio_epsilon": float("nan") if value is None else float(value)}


def eps_label(eps: float) -> str:
  """A run name's and the table's name of a privacy level."""
  return "inf" if math.isinf(eps) else f"{eps:g}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="/tmp/fg/dp_fair")
  parser.add_argument("--eps", default="10,inf",
                      help="comma-separated epsilons of the DP runs; inf: clipping only")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=None,
                      help="train.num_steps of every run (default: the config's)")
  parser.add_argument("--quick", action="store_true",
                      help="tiny settings, one seed, the first --eps only (tests)")
  args = parser.parse_args()
  try:
    epsilons = [float(e) for e in args.eps.split(",")]
  except ValueError:
    epsilons = []
  if not epsilons or not all(e > 0 for e in epsilons):
    cli.fail(f"--eps must be positive numbers or inf, got {args.eps!r}.")
  seeds = 1 if args.quick else args.seeds
  epsilons = epsilons[:1] if args.quick else epsilons
  start = time.time()
  os.makedirs(args.out, exist_ok=True)
  classifiers = choi2020_mnist.train_classifiers(args.out, args.quick)
  levels = [None] + epsilons  # None: no DP.
  results = {}
  for seed in range(seeds):
    for eps in levels:
      for m in METHODS:
        level = "nondp" if eps is None else f"eps{eps_label(eps)}"
        name = f"{m}_{level}_seed{seed}"
        config = make_config(m, eps is not None, eps, seed, classifiers, args.quick,
                             args.steps)
        results[(m, level, seed)] = choi_common.run_or_load(
            os.path.join(args.out, "runs", name), config, METRICS, extra=ratio_epsilon,
            label=name)
  lines = ["| method | DP | epsilon (delta 1e-5) | share of group 1 | FD-L2 | FID | "
           "FID group 0 | FID group 1 |", "|---" * 8 + "|"]
  notes = []
  for m in METHODS:
    for eps in levels:
      level = "nondp" if eps is None else f"eps{eps_label(eps)}"
      rows = [results[(m, level, s)] for s in range(seeds)]
      cells = [choi_common.cell([r[k] for r in rows], 1 if k.startswith("fid") else 3)
               for k in COLUMNS]
      if eps is not None and math.isinf(eps):
        cells[0] = "inf"
      dp = "no" if eps is None else ("clip only" if math.isinf(eps) else "yes")
      lines.append(f"| {m} | {dp} | " + " | ".join(cells) + " |")
      spent = [r.get("ratio_epsilon", float("nan")) for r in rows]
      if eps is not None and not math.isinf(eps) and any(math.isfinite(v) for v in spent):
        notes.append(f"importance at epsilon {eps_label(eps)}: the DP density-ratio "
                     f"classifier spends {choi_common.cell(spent, 3)} of it.")
  lines += ["", *notes, "resample: refused under DP (no accountant for weighted sampling).",
            choi_common.run_time_line(results, seeds, time.time() - start)]
  choi_common.write_outputs(args.out, "\n".join(lines), ("method", "dp", "seed"), results,
                            (*METRICS, "ratio_epsilon", "seconds"))


if __name__ == "__main__":
  main()
