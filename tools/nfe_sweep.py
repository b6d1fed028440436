"""FID against network evaluations (NFE): one trained diffusion or flow checkpoint sampled by
each of its samplers at several budgets.

  python tools/nfe_sweep.py --config=experiments/edm_mnist.py --workdir=/tmp/fg/edm \\
      --samplers=heun,euler --nfe=5,10,20,35,50

For each sampler and budget, ``--mode=evaluate`` of the workdir's latest checkpoint with
``eval.metrics=('fid',)`` and the sampler's steps set for that budget (the samplers'
settings are evaluation-only keys, so the checkpoint's experiment is unchanged): Heun's
2N - 1 evaluations take N = (NFE + 1) // 2 steps (NFE 10 and 20 become 9 and 19), Euler's
and DDIM's N = NFE. Prints one Markdown row per sampler (the NFE actually used in
brackets where it differs) and the date, machine and command; each evaluation also writes
its JSON under ``WORKDIR/eval/``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import Sequence

from fairgen import cli

# Network evaluations of ``steps`` steps of each sampler.
EVALUATIONS = {"heun": lambda n: 2 * n - 1, "euler": lambda n: n, "ddim": lambda n: n}


def steps_for(sampler: str, nfe: int) -> int:
  """The sampler's steps for a budget of ``nfe`` network evaluations (at least 1)."""
  return max(1, (nfe + 1) // 2) if sampler == "heun" else max(1, nfe)


def sweep(config_path: str, workdir: str, samplers: Sequence[str], budgets: Sequence[int],
          seed: int = 0) -> dict[str, list[tuple[int, float]]]:
  """``{sampler: [(nfe used, FID), ...]}`` for each budget."""
  from fairgen import config as config_lib  # pylint: disable=g-import-not-at-top
  from fairgen.evaluation import modes  # pylint: disable=g-import-not-at-top
  out: dict[str, list[tuple[int, float]]] = {}
  for sampler in samplers:
    if sampler not in EVALUATIONS:
      cli.fail(f"--samplers: unknown sampler {sampler!r}; valid: {', '.join(EVALUATIONS)}")
    for nfe in budgets:
      path, _, arg = config_path.partition(":")
      config = config_lib.load_config_file(path, arg or None)
      steps = steps_for(sampler, nfe)
      config.objective.update(sampler=sampler, sample_steps=steps)
      config.eval.update(metrics=("fid",), seed=seed)
      result = modes.evaluate(config, workdir)
      out.setdefault(sampler, []).append((EVALUATIONS[sampler](steps),
                                          float(result["metrics"]["fid"])))
  return out


def table(results: dict[str, list[tuple[int, float]]], budgets: Sequence[int]) -> str:
  """A Markdown table: one row per sampler, one column per budget."""
  lines = ["| sampler | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
           "|---" * (len(budgets) + 1) + "|"]
  for sampler, row in results.items():
    cells = [f"{fid:.1f}" + ("" if used == b else f" ({used})")
             for b, (used, fid) in zip(budgets, row)]
    lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="PATH[:ARG] of the trained experiment.")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--samplers", default="heun,euler")
  parser.add_argument("--nfe", default="5,10,20,35,50")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    budgets = [int(b) for b in args.nfe.split(",")]
  except ValueError:
    cli.fail(f"--nfe must be comma-separated integers, got {args.nfe!r}")
  if any(b < 1 for b in budgets):
    cli.fail(f"--nfe must be positive, got {args.nfe!r}")
  from fairgen import checkpoint, config as config_lib  # pylint: disable=g-import-not-at-top
  from fairgen.classifiers import backbones  # pylint: disable=g-import-not-at-top
  try:
    results = sweep(args.config, args.workdir, args.samplers.split(","), budgets, args.seed)
  except (config_lib.ConfigError, checkpoint.WorkdirError,
          backbones.BackboneNotFoundError, OSError) as e:
    cli.fail(e)
  print(table(results, budgets))
  machine = cli.import_beside(__file__, "compare_peers").machine()
  print(f"{datetime.date.today()}, {machine}, `python tools/nfe_sweep.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`")
  return 0


if __name__ == "__main__":
  sys.exit(main())
