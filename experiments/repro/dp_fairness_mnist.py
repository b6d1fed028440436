r"""Privacy and fairness together: fair generation on biased MNIST with and without DP-SGD.

python experiments/repro/dp_fairness_mnist.py --out=/tmp/fg/dp_fair [--eps=10] [--seeds=1] [--quick]

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
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import choi2020_mnist  # noqa: E402
import choi_common  # noqa: E402

from fairgen import privacy  # noqa: E402

METHODS = ("baseline", "importance")
METRICS = ("fd_l2", "group_share_1", "fid", "fid_group_0", "fid_group_1", "epsilon")
WEIGHT_CLIP = 5.0


def make_config(method: str, dp: bool, eps: float, seed: int, classifiers: dict, quick: bool,
                steps: int | None):
  """The fair_mnist config of one run, with a privacy section when ``dp``."""
  c = choi2020_mnist.make_config(method, 0.25, seed, classifiers, quick, steps)
  c.eval.metrics = ("fid", "fairness_discrepancy", "group_quality")
  if method == "importance":
    c.fair.clip = WEIGHT_CLIP
  if dp:
    c.train.batch_size = 16 if quick else 96
    c.privacy = privacy.section(clip_norm=1.0, expected_batch_size=12 if quick else 64,
                                delta=1e-5)
    if quick:  # No solve: fast tests.
      c.privacy.noise_multiplier = 1.0
    else:
      c.privacy.target_epsilon = eps
  return c


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="/tmp/fg/dp_fair")
  parser.add_argument("--eps", type=float, default=10.0)
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--steps", type=int, default=None,
                      help="train.num_steps of every run (default: the config's)")
  parser.add_argument("--quick", action="store_true", help="tiny settings (tests)")
  args = parser.parse_args()
  if not args.eps > 0:
    sys.exit(f"--eps must be > 0, got {args.eps}.")
  seeds = 1 if args.quick else args.seeds
  start = time.time()
  os.makedirs(args.out, exist_ok=True)
  classifiers = choi2020_mnist.train_classifiers(args.out, args.quick)
  results = {}
  for seed in range(seeds):
    for dp in (False, True):
      for m in METHODS:
        name = f"{m}_{'dp' if dp else 'nondp'}_seed{seed}"
        config = make_config(m, dp, args.eps, seed, classifiers, args.quick, args.steps)
        results[(m, "dp" if dp else "non-DP", seed)] = choi_common.run_or_load(
            os.path.join(args.out, "runs", name), config, METRICS, label=name)
  lines = ["| method | DP | epsilon (delta 1e-5) | share of group 1 | FD-L2 | FID | "
           "FID group 0 | FID group 1 |", "|---" * 8 + "|"]
  for m in METHODS:
    for dp in ("non-DP", "dp"):
      rows = [results[(m, dp, s)] for s in range(seeds)]
      cells = [choi_common.cell([r[k] for r in rows], 1 if k.startswith("fid") else 3)
               for k in ("epsilon", "group_share_1", "fd_l2", "fid", "fid_group_0",
                         "fid_group_1")]
      lines.append(f"| {m} | {'yes' if dp == 'dp' else 'no'} | " + " | ".join(cells) + " |")
  lines += ["", "resample: refused under DP (no accountant for weighted sampling).",
            choi_common.run_time_line(results, seeds, time.time() - start)]
  choi_common.write_outputs(args.out, "\n".join(lines), ("method", "dp", "seed"), results,
                            (*METRICS, "seconds"))


if __name__ == "__main__":
  main()
