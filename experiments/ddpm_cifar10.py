"""DDPM on CIFAR-10 in the paper's setting (Ho et al. 2020, the unconditional CIFAR-10 model).

The 35.7M-parameter U-Net (128 base channels, multipliers 1, 2, 2, 2, two residual blocks
per resolution, self-attention at 16x16, dropout 0.1), the linear schedule from 1e-4 to 0.02
over T = 1,000, eps-prediction (``L_simple``), Adam at 2e-4 warmed up over 5,000 steps with
gradients clipped at norm 1, batch 128, EMA 0.9999, 800,000 steps are the paper's; samples
by the 1,000-step ancestral sampler. Not here: the paper's random horizontal flips (fairgen's
data pipeline does not augment).
Published: FID 3.17, IS 9.46, NLL <= 3.75 bits/dim (Inception metrics on 50,000 samples:
fairgen's paper-comparable Inception backbone is ``eval.backbone='inception_v3'``).

CIFAR-10 comes from TFDS (``tfds build cifar10 --file_format=array_record`` on a machine
with internet, then --config.data.tfds_data_dir=DIR); nothing is downloaded at run time.

python -m fairgen.main --config=experiments/ddpm_cifar10.py --workdir=/tmp/fg/ddpm_cifar \
  --config.data.tfds_data_dir=DIR
Variants: ``:smoke`` (tiny, for tests; runs on TFDS mock data).
"""

from fairgen import config as config_lib
from fairgen import experiment


def get_config(arg=None):
  variant = config_lib.check_variant(arg, ("smoke",))
  c = config_lib.base_config()
  c.data.name = "cifar10"
  c.model = dict(name="unet", ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1)
  c.objective = dict(name="diffusion", schedule="linear", timesteps=1000, beta_start=1e-4,
                     beta_end=0.02, prediction="eps", ema_decay=0.9999, sampler="ancestral",
                     sample_steps=1000)
  c.optim = dict(name="adam", lr=2e-4, b1=0.9, b2=0.999, warmup_steps=5000, clip_norm=1.0)
  c.train.num_steps = 800_000
  c.train.batch_size = 128
  c.train.checkpoint_every_steps = 10_000
  c.log.every_steps = 1000
  c.log.sample_every_steps = 50_000
  c.eval.num_samples = 50_000
  c.eval.metrics = ("fid", "is", "likelihood")
  c.eval.iwae_k = 1000  # Every timestep of the variational bound.
  if variant == "smoke":
    c.model.update(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,))
    c.objective.update(timesteps=10, sample_steps=10)
    c.optim.warmup_steps = 2
    c.eval.num_samples = 64
    c.eval.iwae_k = 3
    c.eval.likelihood_examples = 8
    c.eval.metrics = ("likelihood",)
    config_lib.make_smoke(c)
  return experiment.complete(c)
