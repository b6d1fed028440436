"""Adversarial debiasing (Zhang et al. 2018) on UCI Adult, sex protected, as in AIF360's demo.

python -m fairgen.main --config=experiments/adult_debias.py --workdir=/tmp/fg/debias
Variants: ``:plain`` (no adversary), ``:smoke``, ``:full_features`` (fairgen's ``adult``
encoding: all 13 columns, standardised continuous ones; sex not among the features).
"""

from ml_collections import config_dict

from fairgen import config as config_lib
from fairgen import experiment

# AIF360's demo: 50 epochs of batch 128 over the 70% training split (34,189 rows).
STEPS_PER_EPOCH = 34189 // 128


def get_config(arg=None):
  variant = config_lib.check_variant(arg, ("plain", "smoke", "full_features"))
  c = config_lib.base_config()
  c.data.name = "adult_aif360"
  c.data.options = dict(adult_dir=config_dict.placeholder(str))
  # The fair_mlp's and the objective's defaults are AIF360's: a 200-unit predictor with
  # dropout 0.2, an equalized-odds adversary, adversary weight 0.1.
  c.model = dict(name="fair_mlp")
  c.objective = dict(name="adversarial_debiasing")
  if variant == "plain":
    c.objective.debias = False
  # AIF360: Adam, lr 0.001 decayed by 0.96 every 1,000 steps (staircase).
  c.optim = dict(name="adam", lr=1e-3, b1=0.9, b2=0.999, decay_steps=1000, decay_rate=0.96)
  c.train.batch_size = 128
  c.train.num_steps = 50 * STEPS_PER_EPOCH
  c.train.checkpoint_every_steps = 10 * STEPS_PER_EPOCH
  c.log.every_steps = STEPS_PER_EPOCH
  c.eval.metrics = ("classification_fairness",)
  c.eval.every_steps = 10 * STEPS_PER_EPOCH
  c.eval.best_metric = "accuracy"
  c.eval.best_mode = "max"
  c.eval.batch_size = 4096
  if variant == "full_features":
    c.data.name = "adult"
    # audit_groups: e.g. ('sex', 'race'), evaluated as k-way intersectional groups.
    c.data.options = dict(adult_dir=config_dict.placeholder(str), audit_groups=())
  elif variant == "smoke":
    config_lib.make_smoke(c, num_steps=6, batch_size=32, every=3)
    c.eval.every_steps = 6
  return experiment.complete(c)
