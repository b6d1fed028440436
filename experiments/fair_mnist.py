"""Fair generation on biased MNIST: one mitigation per run (Choi et al. 2020's setting).

The training data is the union of a *biased* set, in which digits 5-9 (group 1) are 10% of
the examples, and a small balanced *reference* set (``ref_fraction`` of the biased set's
size). The generator should produce both groups equally often (``fair.target``: uniform)
without losing quality. Evaluation is against the balanced held-out digits.

  python -m fairgen.main --config=experiments/fair_mnist.py:method=baseline --workdir=...
  python -m fairgen.main --config=experiments/fair_mnist.py:method=importance --workdir=...

``method``: baseline | importance | resample | conditional | penalty (``fairgen/fairness/``).
``model``: dcgan (default) | vae (baseline, importance, resample, and conditional: a
conditional VAE on the group, sampled with the target prior) | ddpm (the same four; its
conditional is classifier-free guidance on the group, w = 1, the group drawn from the
target prior; ``experiments/ddpm_mnist.py``'s U-Net and 50-step DDIM sampler) | edm | flow
(the same four, as ddpm, and guidance: the unconditional model's sampler steered toward
the target groups by the attribute classifier; ``edm_mnist.py``'s and ``flow_mnist.py``'s
35-evaluation Heun samplers).
``attribute``: digit_group (default) | color (two stroke colours, shape-independent).
Flag ``smoke``: a tiny run for tests. The penalty and the fairness evaluators need the
attribute classifier (``tools/train_classifier.py --dataset=biased_mnist --label=attr
--option subset=balanced``) and FID the label classifier (``--option subset=all``); a
missing one fails before training with the exact command.
"""

from fairgen import config as config_lib
from fairgen import experiment
from fairgen import fairness

CHOICES = {"method": fairness.METHODS, "model": ("dcgan", "vae", "ddpm", "edm", "flow"),
           "attribute": ("digit_group", "color")}


def _dcgan(c, method):
  """The smallest DCGAN that still draws recognisable digits in 2,000 steps on a CPU (35
  steps/s). Tuned for short runs: no D dropout, lr 1e-3, a short EMA (0.999 would average in
  the generators of the first 1,000 steps)."""
  c.model = dict(name="dcgan", latent_dim=64, width=0.25, dropout=0.0)
  c.objective = dict(name="gan", ema_decay=0.99)
  c.optim = dict(gen=dict(name="adam", lr=1e-3, b1=0.5, b2=0.999),
                 disc=dict(name="adam", lr=1e-3, b1=0.5, b2=0.999))
  if method == "conditional":
    c.model.update(conditional=True, condition_key="attr")


def _ddpm(c, method):
  """ddpm_mnist.py's U-Net and 50-step DDIM sampler; guidance w = 1 for the conditional
  method (classifier-free guidance on the group)."""
  c.model = dict(name="unet", ch=16, num_res_blocks=1, attn_resolutions=(7,),
                 condition_key="attr")
  c.objective = dict(name="diffusion", ema_decay=0.999, sample_steps=50, guidance=1.0)
  c.optim = dict(name="adam", lr=1e-3, b1=0.9, b2=0.999)
  if method == "conditional":
    c.model.conditional = True


def _edm_or_flow(name):
  """edm_mnist.py's or flow_mnist.py's U-Net and 18-step Heun sampler (35 evaluations);
  guidance w = 1 for the conditional method (classifier-free guidance on the group)."""
  def section(c, method):
    c.model = dict(name="unet", ch=16, num_res_blocks=1, attn_resolutions=(7,), dropout=0.0,
                   condition_key="attr")
    c.objective = dict(name=name, guidance=1.0)
    c.optim = dict(name="adam", lr=1e-3, b1=0.9, b2=0.999)
    if method == "conditional":
      c.model.conditional = True
  return section


def _vae(c, method):
  """An MLP VAE with a Bernoulli likelihood; a conditional VAE on the group for the
  conditional method."""
  c.model = dict(name="vae", latent_dim=16, hidden=(256, 128))
  c.objective = dict(name="vae", beta=1.0)
  c.optim = dict(name="adam", lr=1e-3, b1=0.9, b2=0.999)
  if method == "conditional":
    c.model.update(conditional=True, condition_key="attr")


MODEL_SECTIONS = {"dcgan": _dcgan, "ddpm": _ddpm, "vae": _vae, "edm": _edm_or_flow("edm"),
                  "flow": _edm_or_flow("flow")}
# The smoke variant's model sizes.
SMOKE_SIZES = {"dcgan": dict(width=0.125, latent_dim=16),
               "ddpm": dict(ch=8, ch_mult=(1, 2), attn_resolutions=(14,), dropout=0.0),
               "vae": dict(hidden=(32, 16), latent_dim=4),
               "edm": dict(ch=8, ch_mult=(1, 2), attn_resolutions=(14,)),
               "flow": dict(ch=8, ch_mult=(1, 2), attn_resolutions=(14,))}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, CHOICES, flags=("smoke",))
  method = args["method"]
  c = config_lib.base_config()
  # A fixed biased-set size for every ref_fraction (1,400 still leaves room for a
  # reference set as large as the biased set: 1,260 + 700 of the 2,000 group-0 digits).
  c.data.name = "biased_mnist"
  c.data.options = dict(attribute=args["attribute"], subset="union", biased_size=1400)
  c.data.eval_options = dict(subset="balanced")
  MODEL_SECTIONS[args["model"]](c, method)
  c.train.num_steps = 2000
  # The diffusion families: their own configs' batch of 32.
  c.train.batch_size = 32 if args["model"] in ("ddpm", "edm", "flow") else 64
  c.train.checkpoint_every_steps = 1000
  c.log.every_steps = 100
  c.log.sample_every_steps = 1000
  c.eval.metrics = ("fid", "prdc", "fairness_discrepancy", "group_quality")
  c.eval.best_metric = "fd_l2"
  c.fair = fairness.fair_section(method)
  if args["smoke"]:
    config_lib.make_smoke(c)
    fairness.make_smoke(c)
    c.data.options.biased_size = 200
    c.model.update(SMOKE_SIZES[args["model"]])
    if args["model"] == "ddpm":
      c.objective.update(timesteps=20, sample_steps=4)
    elif args["model"] in ("edm", "flow"):
      c.objective.sample_steps = 3
  return experiment.complete(c)
