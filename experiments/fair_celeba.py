"""Fair generation on biased CelebA at 64x64: Choi et al. 2020's CelebA setting.

The training data is the union of a biased set and a balanced reference set
(``ref_fraction`` of the biased set's size) drawn from TFDS CelebA's training split:
``bias=90_10`` or ``80_20`` groups by ``Male``; ``bias=multi`` by Black_Hair x Male, four
intersectional groups (``group = 2 * Black_Hair + Male``) at the reference code's shares
(``fairgen.data.bias.CHOI_CELEB_A``). The generator should produce every group equally
often (``fair.target``: uniform). Evaluation is against the balanced held-out test split.

The model is the BigGAN of Choi et al.'s code (ermongroup/fairgen, from BigGAN-PyTorch):
``resnet_gan`` at 64x64 with G_ch = D_ch = 64, z 128, no attention, N(0, 0.02) init, spectral
norm on G and D, the hinge loss, 4 D steps per G step, Adam lr 2e-4 betas (0, 0.999) for
both, batch 128, a G EMA of decay 0.9999. Deviations: the EMA warms up with
min(decay, (1 + t) / (10 + t)) instead of starting at step 1,000, and samples use the EMA's
own running BN statistics (``ema_batch_stats``) where the reference code samples in
training mode; 50,000 G steps stand for their 150 epochs (~50k steps of 4 x 128 images at
90_10, perc 1.0).

  python -m fairgen.main --config=experiments/fair_celeba.py:method=importance,bias=90_10 \
    --workdir=... --config.data.tfds_data_dir=DIR

``method``: baseline | importance | resample | conditional | penalty. ``bias``: 90_10 |
80_20 | multi. Flag ``smoke``: a tiny run for tests, on 32x32 faces. CelebA comes from TFDS
(``tfds build celeb_a --file_format=array_record`` on a machine with internet); nothing is
downloaded at run time. The fairness evaluators and the penalty need the attribute
classifier (a ResNet: ``tools/train_classifier.py --dataset=biased_celeb_a --label=attr
--arch=resnet --option subset=balanced --option attribute=Male``, or
``attribute=Black_Hair+Male``); FID uses the classifier backbone at ``eval.backbone_dir``, or
with ``eval.backbone=inception_v3`` pytorch-fid's Inception (``tools/convert_inception.py``).
"""

from fairgen import config as config_lib
from fairgen import experiment
from fairgen import fairness
from fairgen.data import bias as bias_lib

CHOICES = {"method": fairness.METHODS, "bias": tuple(bias_lib.CHOI_CELEB_A)}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, CHOICES, flags=("smoke",))
  method, setting = args["method"], bias_lib.CHOI_CELEB_A[args["bias"]]
  attribute = setting["attribute"]
  c = config_lib.base_config()
  c.data.name = "biased_celeb_a"
  c.data.options = dict(
      attribute=attribute if isinstance(attribute, str) else "+".join(attribute),
      proportions=tuple(setting["proportions"]), subset="union", image_size=64)
  c.data.eval_options = dict(subset="balanced")
  c.model = dict(name="resnet_gan", latent_dim=128, g_ch=64, d_ch=64, attention=0,
                 condition_key="attr", weight_init="N02")
  if method == "conditional":
    c.model.conditional = True
  c.objective = dict(name="gan", loss="hinge", n_disc=4, ema_decay=0.9999,
                     spectral_norm="gen,disc", ema_batch_stats=True)
  c.optim = dict(gen=dict(name="adam", lr=2e-4, b1=0.0, b2=0.999),
                 disc=dict(name="adam", lr=2e-4, b1=0.0, b2=0.999))
  c.train.num_steps = 50_000
  c.train.batch_size = 128
  c.train.checkpoint_every_steps = 1000
  c.log.every_steps = 100
  c.log.sample_every_steps = 1000
  c.eval.metrics = ("fid", "fairness_discrepancy", "group_quality")
  c.eval.num_samples = 10_000
  c.eval.best_metric = "fd_l2"
  c.fair = fairness.fair_section(method)
  # The density-ratio classifier sees 64x64 faces: wider than MNIST's.
  c.fair.ratio.width = 32
  c.fair.ratio.feature_dim = 128
  if args["smoke"]:
    config_lib.make_smoke(c)
    c.model.update(latent_dim=16, g_ch=2, d_ch=2)
    c.data.options.image_size = 32  # One ResNet block fewer per net: a faster compile.
    c.objective.n_disc = 1  # Several D steps: the generic step's, tested on the DCGAN.
    c.objective.ema_decay = 0.99
    # The multi-attribute shares are exact in thousandths only.
    c.data.options.biased_size = 1000 if args["bias"] == "multi" else 40
    fairness.make_smoke(c)
  return experiment.complete(c)
