"""DP-SGD for the whole VAE (the MLP VAE of ``vae_mnist.py``) on offline MNIST.

python -m fairgen.main --config=experiments/dp_vae_mnist.py:eps=10 --workdir=/tmp/fg/dp_vae10

``eps`` is the privacy budget of the whole run at delta = 1e-5: the noise multiplier is
solved for it (``1``, ``10``), or ``inf`` trains with the same clipping and Poisson sampling
and no noise. Every example's ELBO gradient is clipped to ``privacy.clip_norm`` and Gaussian
noise is added to the sum (``fairgen/privacy``). Flags: ``smoke`` (tiny, for tests: sigma = 1
given, not solved).
"""

import os

from fairgen import config as config_lib
from fairgen import experiment
from fairgen import privacy

EPSILONS = ("10", "1", "inf")


def get_config(arg=None):
  args = config_lib.parse_arg(arg, {"eps": EPSILONS}, flags=("smoke",))
  # vae_mnist.py's model and optimizer (or its smoke variant), with Poisson batches.
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_lib.load_config_file(os.path.join(here, "vae_mnist.py"),
                                  "smoke" if args["smoke"] else None)
  # Poisson batches of 256 examples on average, padded to 320 rows: a batch of more than
  # 320 (3.9 standard deviations above the mean) is cut down, and the accountant knows it.
  c.train.batch_size = 320
  # Utility (train on 10k samples, pseudo-labelled), quality, likelihood, and the audit.
  c.eval.metrics = ("fid", "tstr_images", "likelihood", "membership", "memorisation")
  c.eval.num_samples = 10000
  c.eval.every_steps = c.train.num_steps  # One evaluation, at the end.
  c.privacy = privacy.budget_section(
      args["eps"], clip_norm=1.0, expected_batch_size=256, delta=1e-5,
      # An MLP: no per-example kernel gradients (fairgen/privacy/ghost.py).
      ghost_clipping=True)
  if args["smoke"]:
    config_lib.make_smoke(c)
    c.eval.update(every_steps=0, num_samples=200, tstr_steps=20, audit_examples=200)
    c.privacy.update(expected_batch_size=12, noise_multiplier=1.0,
                     target_epsilon=0.0)  # No solve: fast tests.
  return experiment.complete(c)
