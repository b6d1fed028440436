"""VFAE (Louizos et al. 2016) on UCI Adult, sex as the nuisance variable s.

python -m fairgen.main --config=experiments/vfae_adult.py --workdir=/tmp/fg/vfae
Variants: ``:no_mmd`` (the VAE without the MMD penalty, for comparison), ``:smoke``.
The representation is judged by logistic-regression probes on z1 (evaluator
``vfae_probe``): predicting y should stay accurate, predicting s should fall to the
majority rate.
"""

from ml_collections import config_dict

from fairgen import config as config_lib
from fairgen import experiment


def get_config(arg=None):
  variant = config_lib.check_variant(arg, ("no_mmd", "smoke"))
  c = config_lib.base_config()
  c.data.name = "adult"
  # audit_groups: e.g. ('sex', 'race'), evaluated as k-way intersectional groups.
  # Sex is the sensitive column, left out of the features (the loader's defaults).
  c.data.options = dict(adult_dir=config_dict.placeholder(str), audit_groups=())
  # The builder's defaults: one hidden layer of 100 units (the paper's), a 32-unit z1.
  c.model = dict(name="vfae")
  c.objective = dict(name="vfae", mmd_weight=0.0 if variant == "no_mmd" else 1000.0)
  c.optim = dict(name="adam", lr=1e-3, b1=0.9, b2=0.999)
  c.train.batch_size = 256
  c.train.num_steps = 6000
  c.train.checkpoint_every_steps = 2000
  c.log.every_steps = 500
  c.eval.metrics = ("vfae_probe", "classification_fairness")
  c.eval.every_steps = 2000
  c.eval.batch_size = 4096
  c.eval.best_metric = "probe_y_accuracy"
  c.eval.best_mode = "max"
  if variant == "smoke":
    config_lib.make_smoke(c, num_steps=4, batch_size=32)
    c.eval.every_steps = 4
  return experiment.complete(c)
