"""A beta-VAE with KL annealing on offline MNIST: one point of the rate-distortion curve.

python -m fairgen.main --config=experiments/beta_vae_mnist.py:beta=4 --workdir=/tmp/fg/bvae4

``vae_mnist.py``'s MLP VAE trained on ``distortion + beta * rate`` (Higgins et al. 2017), the
KL weight rising linearly from 0 to beta over the first 1,000 of 3,000 steps (Bowman et al.
2016's annealing, ``objective.kl_warmup_steps``). The evaluation at the end reports the test
set's rate (KL(q(z|x) || p(z)), nats) and distortion (-log p(x|z), nats) beside the ELBO
and the IWAE bound. ``experiments/repro/beta_vae_rate_distortion.py`` sweeps beta and plots
the curve. Variants: ``beta=`` one of ``BETAS``; ``smoke`` (tiny, for tests).
"""

import os

from fairgen import config as config_lib
from fairgen import experiment

BETAS = ("1", "0.25", "0.5", "2", "4")


def get_config(arg=None):
  args = config_lib.parse_arg(arg, {"beta": BETAS}, flags=("smoke",))
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_lib.load_config_file(os.path.join(here, "vae_mnist.py"),
                                  "smoke" if args["smoke"] else None)
  c.objective.beta = float(args["beta"])
  c.objective.kl_warmup_steps = 1000
  c.eval.metrics = ("likelihood",)
  c.eval.best_metric = "nll_iwae"
  c.eval.every_steps = c.train.num_steps  # One evaluation, at the end.
  if args["smoke"]:
    c.objective.kl_warmup_steps = 2
    c.eval.update(iwae_k=4, likelihood_examples=64)
  return experiment.complete(c)
