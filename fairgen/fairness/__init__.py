"""Fairness mitigations as config switches, for any GAN or VAE objective (``config.fair``).

A researcher has a *biased* dataset in which one group of a sensitive attribute is
under-represented, plus a small balanced *reference* set (``fairgen/data/bias.py``). They
want samples whose groups follow ``fair.target`` (uniform by default). ``fair.method``:

============  =================================================================  ===========
method        what changes                                                        objectives
============  =================================================================  ===========
baseline      nothing: train on ``data.options.subset`` ('biased' or 'union')     all
importance    Choi et al. 2020: a density-ratio classifier tells reference from   all
              biased examples; ``w(x) = p_ref(x) / p_bias(x)``, flattened to
              ``w**alpha``, weights each biased example's real-data loss (the D
              loss on reals, the VAE's ELBO), self-normalised per batch.
              Reference examples have weight 1.
resample      batches drawn with probability ``target[g] / count[g]`` per example  all
              of group ``g``: every group appears at its target rate.
conditional   the generator is conditioned on the group (``model.conditional``,    gan
              ``model.condition_key='attr'``) and sampled with the target prior.
penalty       ``L_G + lambda * L_F``: ``L_F`` is KL or L2 between the batch-mean   gan
              predicted group distribution of generated samples (a frozen
              attribute classifier) and the target.
guidance      at sampling, each denoised estimate moves up the frozen attribute    edm
              classifier's log-probability of the sample's target group.
============  =================================================================  ===========

Each method is one module that registers a ``registry.Method``: its own ``fair`` keys and
checks, the objective capabilities it needs (``conditional``, ``generator_penalty``: an
objective's registry entry declares its ``capabilities``; ``validate`` refuses a method the
objective cannot run), and its hooks (``prepare`` the data, a generator ``penalty``, what
DP-SGD must know). A new method is one new module that registers itself; the package lists
its own methods below.

Modules: ``registry`` (``Method``, ``METHODS``), ``methods`` (the ``fair`` config section,
targets, the calls into the chosen method), one module per method (``baseline``,
``importance`` with ``density_ratio``, ``resample``, ``conditional``, ``penalty``,
``guidance``).
"""

# The one list of the package's methods, in the order they are listed; each registers itself.
from fairgen.fairness import baseline  # noqa: F401
from fairgen.fairness import importance  # noqa: F401
from fairgen.fairness import resample  # noqa: F401
from fairgen.fairness import conditional  # noqa: F401
from fairgen.fairness import penalty  # noqa: F401
from fairgen.fairness import guidance  # noqa: F401
from fairgen.fairness.methods import (attribute_classifier, fair_section, generator_penalty,
                                      label_probs, make_smoke, method, prepare, private_prior,
                                      sampler_guidance, target_distribution, validate,
                                      weight_bound)
from fairgen.fairness.penalty import Penalty, attribute_penalty
from fairgen.fairness.registry import CAPABILITIES, METHODS, Method
from fairgen.fairness.resample import resample_probs

__all__ = ["CAPABILITIES", "METHODS", "Method", "Penalty", "attribute_classifier",
           "attribute_penalty", "fair_section", "generator_penalty", "label_probs", "make_smoke",
           "method", "prepare", "private_prior", "resample_probs", "sampler_guidance",
           "target_distribution",
           "validate", "weight_bound"]
