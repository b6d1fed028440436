r"""The beta-VAE's rate-distortion trade-off on offline MNIST, as a table and a plot.

python experiments/repro/beta_vae_rate_distortion.py --out=/tmp/fg/rate_distortion [--quick]

Trains ``experiments/beta_vae_mnist.py`` at each beta of ``--betas`` (KL annealed over the
first 1,000 steps) and evaluates the test set's rate R = KL(q(z|x) || p(z)) and distortion
D = -log p(x|z) (nats per digit, binarised pixels). The ELBO is -(D + R); beta weighs R
against D in training (Higgins et al. 2017; Alemi et al. 2018, "Fixing a Broken ELBO", plot
the same plane): beta < 1 buys lower distortion with more rate, beta > 1 the reverse. Writes
``OUT/results.md``, ``OUT/results.csv`` and ``OUT/rate_distortion.png`` (D against R, one
point per beta, with the lines D + R = const through the beta = 1 run). A run whose workdir
holds its result is not repeated. ``--quick``: the smoke variant at two betas (tests).
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np

from fairgen import cli
from fairgen import config as config_lib
from fairgen import storage

choi_common = cli.import_beside(__file__, "choi_common")  # experiments/repro/

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "beta_vae_mnist.py")
METRICS = ("rate", "distortion", "neg_elbo", "nll_iwae")


def plot(results: dict[float, dict[str, float]], path: str) -> str:
  """D against R, one labelled point per beta; dashed lines of constant D + R through the
  beta = 1 point (the negative ELBO, when present)."""
  from matplotlib import figure  # Heavy import, only when plotting.
  from matplotlib.backends import backend_agg

  fig = figure.Figure(figsize=(5.0, 4.0), dpi=100)
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  betas = sorted(results)
  rate = np.array([results[b]["rate"] for b in betas])
  dist = np.array([results[b]["distortion"] for b in betas])
  ax.plot(rate, dist, "o-", color="tab:blue")
  for b, r, d in zip(betas, rate, dist):
    ax.annotate(f"beta={b:g}", (r, d), textcoords="offset points", xytext=(5, 5))
  if 1.0 in results:
    elbo = results[1.0]["rate"] + results[1.0]["distortion"]
    r = np.linspace(0.0, elbo, 2)
    ax.plot(r, elbo - r, "--", color="tab:gray", label=f"D + R = {elbo:.1f} (beta = 1)")
    ax.legend()
  ax.set_xlabel("rate R = KL(q(z|x) || p(z)), nats")
  ax.set_ylabel("distortion D = -log p(x|z), nats")
  ax.set_title("beta-VAE on mnist_5k test digits")
  ax.set_xlim(left=0.0)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  storage.write_atomic(path, buf.getvalue())
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="/tmp/fg/rate_distortion")
  parser.add_argument("--betas", default="0.25,0.5,1,2,4",
                      help="comma-separated betas, each one of beta_vae_mnist.py's")
  parser.add_argument("--quick", action="store_true", help="smoke runs at two betas (tests)")
  args = parser.parse_args()
  betas = args.betas.split(",")[:2] if args.quick else args.betas.split(",")
  start = time.time()
  os.makedirs(args.out, exist_ok=True)
  results = {}
  for beta in betas:
    arg = f"beta={beta}" + (",smoke" if args.quick else "")
    try:
      config = config_lib.load_config_file(CONFIG, arg)
    except config_lib.ConfigError as e:
      cli.fail(f"--betas: {e}")
    name = f"beta_{beta}"
    results[float(beta)] = choi_common.run_or_load(os.path.join(args.out, "runs", name),
                                                   config, METRICS, label=name)
  lines = ["| beta | rate R (nats) | distortion D (nats) | -ELBO = D + R | IWAE NLL |",
           "|---|---|---|---|---|"]
  for b in sorted(results):
    r = results[b]
    lines.append(f"| {b:g} | {r['rate']:.2f} | {r['distortion']:.2f} | {r['neg_elbo']:.2f} "
                 f"| {r['nll_iwae']:.2f} |")
  chart = plot(results, os.path.join(args.out, "rate_distortion.png"))
  lines += ["", f"Plot: {chart}",
            choi_common.run_time_line({(b,): r for b, r in results.items()}, 1,
                                      time.time() - start)]
  choi_common.write_outputs(args.out, "\n".join(lines), ("beta",),
                            {(b,): r for b, r in results.items()}, (*METRICS, "seconds"))


if __name__ == "__main__":
  main()
