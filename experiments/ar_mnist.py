"""A GPT-style pixel transformer on binarised offline MNIST (exact NLL, raster order).

python -m fairgen.main --config=experiments/ar_mnist.py --workdir=/tmp/fg/ar
The test NLL (``--mode=evaluate``, evaluator ``likelihood``) is in nats per image of the
binarised digits (pixel > 0), the same data as the Bernoulli VAE's IWAE bound of
``vae_mnist.py``. Local attention (``window=28``: each pixel attends to its own row-long block
and the one before, so always to the pixel above) trains several times faster on a CPU than
full attention over 784 pixels; dropout is off because its random bits cost a third of a
step here. Variants: ``:smoke`` (tiny, for tests), ``:sinusoidal`` (fixed sinusoidal
position encodings), ``:full_attention`` (window 0), ``:conditional`` (``p(x | y)``: the
label is the start token).
"""

from fairgen import config as config_lib
from fairgen import experiment


def get_config(arg=None):
  variant = config_lib.check_variant(
      arg, ("smoke", "sinusoidal", "full_attention", "conditional"))
  c = config_lib.base_config()
  # Binarised pixels (levels=2), 4 layers of 4 heads: the pixel_transformer's defaults.
  c.model = dict(name="pixel_transformer", embed_dim=64, mlp_dim=256, dropout=0.0, window=28)
  c.objective = dict(name="autoregressive")  # Samples at temperature 1, no top-k.
  c.train.num_steps = 1200
  c.train.batch_size = 32
  c.optim = dict(name="adamw", lr=2e-3, b1=0.9, b2=0.99, weight_decay=1e-4,
                 linear_decay_steps=c.train.num_steps)
  c.train.checkpoint_every_steps = 400
  c.log.sample_every_steps = 600
  # The exact NLL of all 1,000 test digits (nats per image and bits/dim) every 400 steps.
  c.eval.update(metrics=("likelihood",), every_steps=400, batch_size=100, best_metric="nll")
  if variant == "sinusoidal":
    c.model.positional = "sinusoidal"
  elif variant == "full_attention":
    c.model.window = 0
  elif variant == "conditional":
    c.model.conditional = True
  elif variant == "smoke":  # Dropout on: its keys are part of resume and sharding tests.
    c.model.update(num_layers=1, num_heads=2, embed_dim=16, mlp_dim=32, dropout=0.1)
    c.eval.update(likelihood_examples=32, batch_size=16, every_steps=0)
    config_lib.make_smoke(c)
  return experiment.complete(c)
