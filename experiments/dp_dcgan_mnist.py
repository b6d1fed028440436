"""DP-SGD for the DCGAN's discriminator (the main job's network) on offline MNIST.

python -m fairgen.main --config=experiments/dp_dcgan_mnist.py:eps=10 --workdir=/tmp/fg/dp_gan10

The discriminator is the only network that sees data, so it alone trains with DP-SGD: the
gradient of each real example's loss is clipped to ``privacy.clip_norm`` and Gaussian noise
is added to their sum; its fake-image term sees no data and keeps its exact gradient. The
generator learns only from the discriminator, so it and its samples are post-processing
(as in DP-GAN, Xie et al. 2018, and GS-WGAN, Chen et al. 2020). ``eps`` is the budget of the
whole run at delta = 1e-5 (``1``, ``10``; the noise multiplier is solved for it) or ``inf``
(the same clipping and Poisson sampling without noise). Flags: ``conditional`` (a
class-conditional GAN, as DP-CGAN: the real term uses each example's label, the fakes take
uniformly drawn labels, so their term stays free of private data; its samples carry labels
for ``tstr_images``), ``smoke`` (tiny, for tests: sigma = 1 given, not solved).
"""

import os

from fairgen import config as config_lib
from fairgen import experiment
from fairgen import privacy

EPSILONS = ("10", "1", "inf")


def get_config(arg=None):
  args = config_lib.parse_arg(arg, {"eps": EPSILONS}, flags=("conditional", "smoke"))
  # The main job's recipe and network (dcgan_mnist.py: no D dropout; D has no batch norm,
  # so per-example gradients exist), or its smoke variant.
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_lib.load_config_file(os.path.join(here, "dcgan_mnist.py"),
                                  "smoke" if args["smoke"] else None)
  if args["conditional"]:
    c.model.conditional = True
  c.train.num_steps = 2000
  # Poisson batches of 128 examples on average, padded to 176 rows (4.3 standard deviations
  # above the mean); the accountant knows the rare larger draw is cut to 176.
  c.train.batch_size = 176
  c.train.checkpoint_every_steps = 500
  c.log.sample_every_steps = 500
  # Utility (train on 10k samples, test on real digits), quality, and the privacy audit.
  c.eval.metrics = ("fid", "tstr_images", "membership", "memorisation")
  c.eval.num_samples = 10000
  c.eval.every_steps = c.train.num_steps  # One evaluation, at the end.
  c.privacy = privacy.budget_section(
      args["eps"], clip_norm=1.0, expected_batch_size=128, delta=1e-5, microbatch_size=88)
  if args["smoke"]:
    config_lib.make_smoke(c)
    c.eval.update(every_steps=0, num_samples=200, tstr_steps=20, audit_examples=200)
    c.privacy.update(expected_batch_size=12, microbatch_size=8, noise_multiplier=1.0,
                     target_epsilon=0.0)  # No solve: fast tests.
  return experiment.complete(c)
