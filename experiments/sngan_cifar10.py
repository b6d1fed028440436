"""SNGAN on CIFAR-10 in the paper's setting (Miyato et al. 2018, the ResNet of Table 2).

The SNGAN ResNet (G 256 channels, D 128: ``resnet_gan`` at 32x32 with g_ch=64, d_ch=32), the
hinge loss, spectral normalisation of D only, n_disc = 5, Adam lr 2e-4 with betas (0, 0.9)
for both nets, decayed linearly to 0 over the 50,000 generator updates (and D's 250,000),
D batches of 64 (``train.batch_size``; each of the 5 D updates takes its own), as in the
official code (pfnet-research/sngan_projection). Published: IS 8.22, FID 21.7 (Inception
metrics; fairgen's paper-comparable Inception backbone is issue 14's).

CIFAR-10 comes from TFDS (``tfds build cifar10 --file_format=array_record`` on a machine
with internet, then --config.data.tfds_data_dir=DIR); nothing is downloaded at run time.

python -m fairgen.main --config=experiments/sngan_cifar10.py --workdir=/tmp/fg/sngan \
  --config.data.tfds_data_dir=DIR
Variants: ``:smoke`` (tiny, for tests; runs on TFDS mock data).
"""

from fairgen import config as config_lib
from fairgen import experiment

G_STEPS = 50_000
N_DISC = 5


def get_config(arg=None):
  variant = config_lib.check_variant(arg, ("smoke",))
  c = config_lib.base_config()
  c.data.name = "cifar10"
  c.model = dict(name="resnet_gan", g_ch=64, d_ch=32, weight_init="xavier")
  c.objective = dict(name="gan", loss="hinge", n_disc=N_DISC, ema_decay=0.0,
                     spectral_norm="disc")
  c.optim = dict(gen=dict(name="adam", lr=2e-4, b1=0.0, b2=0.9, linear_decay_steps=G_STEPS),
                 disc=dict(name="adam", lr=2e-4, b1=0.0, b2=0.9,
                           linear_decay_steps=G_STEPS * N_DISC))
  c.train.num_steps = G_STEPS
  c.train.batch_size = 64
  c.train.checkpoint_every_steps = 5000
  c.log.every_steps = 500
  c.log.sample_every_steps = 5000
  c.eval.num_samples = 50_000
  if variant == "smoke":
    c.model.update(latent_dim=16, g_ch=4, d_ch=4)
    c.objective.n_disc = 2
    c.optim.gen.linear_decay_steps = 4
    c.optim.disc.linear_decay_steps = 8
    c.eval.num_samples = 64
    config_lib.make_smoke(c)
  return experiment.complete(c)
