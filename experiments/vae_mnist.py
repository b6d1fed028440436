"""An MLP VAE (784-512-256-32, Bernoulli likelihood on binarized pixels) on offline MNIST.

python -m fairgen.main --config=experiments/vae_mnist.py --workdir=/tmp/fg/vae
Variants: ``:smoke`` (tiny, for tests), ``:conv`` (convolutional encoder/decoder),
``:digits`` (sklearn's 8x8 digits), ``:conditional`` (a class-conditional VAE: the label
into encoder and decoder; samples of a chosen digit, and ``log p(x | y)`` in evaluation).
"""

from fairgen import config as config_lib
from fairgen import experiment


def get_config(arg=None):
  variant = config_lib.check_variant(arg, ("smoke", "conv", "digits", "conditional"))
  c = config_lib.base_config()
  c.model = dict(name="vae")  # The defaults: a 784-512-256-32 MLP.
  c.objective = dict(name="vae")
  c.optim = dict(name="adam", lr=1e-3, b1=0.9, b2=0.999)
  c.train.num_steps = 3000
  # Eight steps per dispatch: its ~4 ms step is no longer paced by the Python loop (README
  # "Benchmarks"); for the MLP, the same bits as one step per dispatch.
  c.train.steps_per_dispatch = 8
  c.train.checkpoint_every_steps = 1000
  c.log.every_steps = 100
  c.log.sample_every_steps = 1000
  if variant == "conv":
    c.model.arch = "conv"
    c.model.hidden = (32, 64)
  elif variant == "conditional":
    c.model.conditional = True
  elif variant == "digits":
    c.data.name = "digits"
    c.model.hidden = (256, 128)
    c.model.latent_dim = 8
  elif variant == "smoke":
    c.model.hidden = (64, 32)
    c.model.latent_dim = 8
    config_lib.make_smoke(c)
  return experiment.complete(c)
