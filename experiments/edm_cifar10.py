"""EDM on CIFAR-10 in the paper's setting (Karras et al. 2022, Table 7: unconditional
CIFAR-10, DDPM++ with the EDM preconditioning).

The 55.73M-parameter DDPM++ (``model.name='ddpmpp'``: 128 base channels, multipliers 2, 2,
2, four residual blocks per resolution, self-attention at 16x16, dropout 0.13); EDM's
preconditioning, log-normal noise levels (P_mean -1.2, P_std 1.2) and loss weights; Adam at
1e-3 ramped up over 10M images (19,531 steps of 512), batch 512, an EMA with a half-life of
0.5M images (decay 0.5^(512/500,000) = 0.99929 per step), 200M images (390,625 steps);
samples by the 18-step Heun sampler (35 network evaluations). Not here: the paper's
non-leaking augmentation (probability 0.12; fairgen's data pipeline does not augment).
Published: FID 1.97 (unconditional, 50,000 samples; fairgen's paper-comparable backbone is
``eval.backbone='inception_v3'``).

CIFAR-10 comes from TFDS (``tfds build cifar10 --file_format=array_record`` on a machine
with internet, then --config.data.tfds_data_dir=DIR); nothing is downloaded at run time.

python -m fairgen.main --config=experiments/edm_cifar10.py --workdir=/tmp/fg/edm_cifar \
  --config.data.tfds_data_dir=DIR
Variants: ``:smoke`` (tiny, for tests; runs on TFDS mock data).
"""

from fairgen import config as config_lib
from fairgen import experiment


def get_config(arg=None):
  variant = config_lib.check_variant(arg, ("smoke",))
  c = config_lib.base_config()
  c.data.name = "cifar10"
  c.model = dict(name="ddpmpp")  # Its defaults are the paper's CIFAR-10 network.
  c.objective = dict(name="edm", ema_decay=0.99929)
  c.optim = dict(name="adam", lr=1e-3, b1=0.9, b2=0.999, warmup_steps=19_531)
  c.train.num_steps = 390_625
  c.train.batch_size = 512
  c.train.checkpoint_every_steps = 10_000
  c.log.every_steps = 1000
  c.log.sample_every_steps = 50_000
  c.eval.num_samples = 50_000
  c.eval.metrics = ("fid", "is", "likelihood")
  if variant == "smoke":
    c.model.update(ch=8, ch_mult=(1, 2), num_blocks=1, dropout=0.0)
    c.objective.update(sample_steps=3, likelihood_tol=1e-2)
    c.optim.warmup_steps = 2
    c.eval.num_samples = 64
    c.eval.likelihood_examples = 8
    c.eval.metrics = ("likelihood",)
    config_lib.make_smoke(c)
  return experiment.complete(c)
