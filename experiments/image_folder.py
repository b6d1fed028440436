"""Your own images: a ResNet GAN on a folder of PNG/JPEG files (``data.name='image_folder'``).

  python -m fairgen.main --config=experiments/image_folder.py --workdir=/tmp/fg/mine \\
      --config.data.options.directory=/path/to/images
  # With an attribute file, fair training on its sensitive attribute:
  python -m fairgen.main --config=experiments/image_folder.py:method=resample \\
      --workdir=/tmp/fg/mine_fair --config.data.options.directory=/path/to/images \\
      --config.data.options.attributes=/path/to/attributes.csv \\
      --config.data.options.groups=smiling

Every option of the loader (``fairgen/data/image_folder.py``) is a key here, so each takes
a ``--config.data.options.KEY=...`` override: ``directory``, ``attributes`` (a CSV or
JSON-lines file with a ``file`` column), ``label``, ``groups`` (comma-separated: intersectional),
``reference`` and ``subset`` (importance weighting), ``image_size`` (32 or 64 for this
network), ``channels``, ``test_fraction``, ``split_seed``. The network is
``resnet_gan_mnist.py``'s recipe at 64x64: the SNGAN/BigGAN ResNets, hinge loss, spectral
norm on D, a G EMA and DiffAugment (small datasets need it).

``method``: a fairness method of ``fairgen/fairness/`` (needs ``groups``); ``importance``
also needs ``reference`` and ``subset=union``, and ``penalty`` an attribute classifier
(``tools/train_classifier.py --dataset=image_folder --label=attr --option directory=...
--option groups=...``). ``:smoke``: tiny networks, 4 steps (the docs' commands run
it on a folder that a test writes).
"""

from fairgen import config as config_lib
from fairgen import experiment
from fairgen import fairness

CHOICES = {"method": ("none",) + tuple(fairness.METHODS.names())}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, CHOICES, flags=("smoke",))
  c = config_lib.base_config()
  c.data.name = "image_folder"
  # Spelled out (the loader's defaults) so that --config.data.options.KEY=... finds each.
  c.data.options = dict(directory="", attributes="", label="", groups="", reference="",
                        subset="all", image_size=64, channels=3, test_fraction=0.1,
                        split_seed=0)
  c.model = dict(name="resnet_gan", g_ch=32, d_ch=32)
  c.objective = dict(name="gan", loss="hinge", n_disc=2, diffaugment="color,translation",
                     spectral_norm="disc", ema_batch_stats=True)
  c.optim = dict(gen=dict(name="adam", lr=2e-4, b1=0.0, b2=0.9),
                 disc=dict(name="adam", lr=2e-4, b1=0.0, b2=0.9))
  c.train.num_steps = 20000
  c.train.batch_size = 64
  c.train.checkpoint_every_steps = 2000
  c.log.every_steps = 100
  c.log.sample_every_steps = 2000
  c.eval.metrics = ("fid", "kid")
  if args["method"] != "none":
    c.fair = fairness.fair_section(args["method"])
    if args["method"] == "conditional":
      c.model.update(conditional=True, condition_key="attr")
    if args["method"] == "importance":  # The biased rows and the reference rows, weighted.
      c.data.options.subset = "union"
  if args["smoke"]:
    config_lib.make_smoke(c)
    c.model.update(latent_dim=16, g_ch=4, d_ch=4)
    c.objective.n_disc = 1
    if args["method"] != "none":
      fairness.make_smoke(c)
  return experiment.complete(c)
