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
============  =================================================================  ===========

Which objectives support a method is their registry entries' ``fair_methods``
(``fairgen/objectives/__init__.py``); ``validate`` refuses the others.

Modules: ``methods`` (the ``fair`` config section, targets, resampling, the data-side
dispatch ``prepare``), ``importance`` and ``density_ratio`` (importance weights), ``penalty``
(the generator penalty, a pure function called inside the jitted step).
"""

from fairgen.fairness.methods import (METHODS, attribute_classifier, fair_section, label_probs,
                                      make_smoke, method, prepare, private_prior,
                                      resample_probs, target_distribution, validate,
                                      weight_bound)
from fairgen.fairness.penalty import Penalty, attribute_penalty, generator_penalty

__all__ = ["METHODS", "Penalty", "attribute_classifier", "attribute_penalty", "fair_section",
           "generator_penalty", "label_probs", "make_smoke", "method", "prepare", "private_prior",
           "resample_probs", "target_distribution", "validate", "weight_bound"]
