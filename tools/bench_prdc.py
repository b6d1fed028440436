"""PRDC's nearest-neighbour cost at paper scale: seconds and peak memory per feature count.

  python tools/bench_prdc.py --rows 10000,50000

For each count N (one fresh process each, so that peak memory is that count's alone):
N real and N generated 2048-d features (two unit Gaussian clouds, one shifted by 0.02,
float32), then
``fairgen.metrics.quality.prdc`` with k=5, as ``eval.metrics=('prdc',)`` runs it: the k-th
neighbour radii of both sets and the real-by-generated ball tests, in row blocks of
``--chunk`` (peak memory about chunk x N floats per block, besides the features). Compare
the seconds with the Inception features of the same 2N images
(``tools/bench_inception.py``: images/s).

Output: one JSON line per count, {"rows", "dim", "seconds" (the call, compilation
included), "compile_seconds" (a first call on 64 rows), "peak_rss_mib", "precision",
"recall", "density", "coverage"}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Sequence

import numpy as np

from fairgen import cli


def measure(rows: int, dim: int, chunk: int) -> dict[str, float]:
  """Times one PRDC call on ``rows`` x ``dim`` features per set (in this process)."""
  from fairgen.metrics import quality  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  real = rng.normal(size=(rows, dim)).astype(np.float32)
  fake = (rng.normal(size=(rows, dim)) + 0.02).astype(np.float32)  # A slightly shifted cloud.
  start = time.perf_counter()
  quality.prdc(real[:64], fake[:64], chunk_size=chunk)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  values = quality.prdc(real, fake, chunk_size=chunk)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {"rows": rows, "dim": dim, "chunk": chunk, "seconds": round(seconds, 2),
          "compile_seconds": round(compile_s, 2), "peak_rss_mib": round(peak),
          **{k: round(v, 4) for k, v in values.items()}}


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", default="10000,50000", help="feature rows per set, comma-separated")
  p.add_argument("--dim", type=int, default=2048)
  p.add_argument("--chunk", type=int, default=1024, help="rows per distance block")
  p.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # A child's count.
  args = p.parse_args(argv)
  if args.one:
    print(json.dumps(measure(args.one, args.dim, args.chunk)), flush=True)
    return
  try:
    counts = [int(r) for r in args.rows.split(",") if r.strip()]
  except ValueError:
    counts = []
  if not counts or min(counts) < 6 or min(args.dim, args.chunk) < 1:
    cli.fail(f"--rows must be integers >= 6 (comma-separated), --dim and --chunk >= 1; got "
             f"--rows={args.rows} --dim={args.dim} --chunk={args.chunk}.")
  for rows in counts:
    subprocess.run([sys.executable, __file__, f"--one={rows}", f"--dim={args.dim}",
                    f"--chunk={args.chunk}"], check=True)


if __name__ == "__main__":
  main()
