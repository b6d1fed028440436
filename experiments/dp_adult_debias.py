"""Adversarial debiasing on UCI Adult with both networks trained by DP-SGD.

python -m fairgen.main --config=experiments/dp_adult_debias.py:eps=1 --workdir=/tmp/fg/dp_debias1

``adult_debias.py`` (AIF360's demo: sex protected, equalized odds) with the predictor and the
adversary trained by DP-SGD as one mechanism (each example's gradients clipped jointly, see
``fairgen.objectives.debias``), Poisson batches of 512 rows on average from the 34,189
training rows, delta = 1e-5. ``eps`` is the whole run's budget (``1``, ``10``; the noise
multiplier is solved for it) or ``inf`` (the same clipping and sampling without noise).
Flags: ``plain`` (no adversary: the private plain classifier), ``smoke`` (tiny, for tests:
sigma = 1 given, not solved).
"""

import os

from fairgen import config as config_lib
from fairgen import experiment
from fairgen import privacy

EPSILONS = ("1", "10", "inf")


def get_config(arg=None):
  args = config_lib.parse_arg(arg, {"eps": EPSILONS}, flags=("plain", "smoke"))
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_lib.load_config_file(os.path.join(here, "adult_debias.py"),
                                  "plain" if args["plain"] else None)
  # About 30 epochs of 512-row expected batches: DP-SGD prefers fewer, larger batches than
  # the demo's 50 epochs of 128 (the noise is divided by the batch).
  steps_per_epoch = 34189 // 512
  c.train.num_steps = 30 * steps_per_epoch
  # Padded to 608 rows, 4.2 standard deviations above the mean draw.
  c.train.batch_size = 608
  c.train.checkpoint_every_steps = 10 * steps_per_epoch
  c.log.every_steps = steps_per_epoch
  c.eval.every_steps = 10 * steps_per_epoch
  c.privacy = privacy.budget_section(
      args["eps"], clip_norm=1.0, expected_batch_size=512, delta=1e-5,
      # An MLP: no per-example kernel gradients (fairgen/privacy/ghost.py).
      ghost_clipping=True)
  if args["smoke"]:
    config_lib.make_smoke(c, num_steps=6, batch_size=32, every=3)
    c.eval.every_steps = 6
    c.privacy.update(expected_batch_size=24, noise_multiplier=1.0, target_epsilon=0.0)
  return experiment.complete(c)
