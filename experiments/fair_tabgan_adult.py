"""A fair tabular WGAN-GP on UCI Adult with TabFairGAN's demographic-parity penalty.

python -m fairgen.main --config=experiments/fair_tabgan_adult.py --workdir=/tmp/fg/tabgan
Variants: ``:plain`` (no fairness penalty), ``:smoke``. As in TabFairGAN, the generator
first learns the data (plain WGAN-GP), and the penalty lambda_fair * |E[y|s=0] - E[y|s=1]|
on the generated rows applies from ``objective.fair_start_step``. Judged by
train-on-synthetic-test-on-real (evaluator ``tstr``): accuracy and statistical parity of a
classifier trained on synthetic rows, plus marginal fidelity.
"""

from ml_collections import config_dict

from fairgen import config as config_lib
from fairgen import experiment


def get_config(arg=None):
  variant = config_lib.check_variant(arg, ("plain", "smoke"))
  c = config_lib.base_config()
  c.data.name = "adult"
  # audit_groups: e.g. ('sex', 'race'), evaluated as k-way intersectional groups.
  # Sex is the sensitive column, left out of the features (the loader's defaults).
  c.data.options = dict(adult_dir=config_dict.placeholder(str), audit_groups=())
  c.model = dict(name="tabgan", latent_dim=64)
  c.objective = dict(name="tabgan", n_critic=2, fair_start_step=3000,
                     lambda_fair=0.0 if variant == "plain" else 0.5)
  c.optim = dict(gen=dict(name="adam", lr=2e-4, b1=0.5, b2=0.9),
                 disc=dict(name="adam", lr=2e-4, b1=0.5, b2=0.9))
  c.train.batch_size = 256
  c.train.num_steps = 5000
  c.train.checkpoint_every_steps = 1000
  c.log.every_steps = 250
  c.eval.metrics = ("tstr",)
  c.eval.num_samples = 30000
  c.eval.every_steps = 2500
  c.eval.best_metric = "tstr_accuracy"
  c.eval.best_mode = "max"
  if variant == "smoke":
    config_lib.make_smoke(c, num_steps=4, batch_size=32)
    c.objective.fair_start_step = 2
    c.eval.num_samples = 256
    c.eval.every_steps = 4
  return experiment.complete(c)
