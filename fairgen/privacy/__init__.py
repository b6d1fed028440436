"""Differential privacy: DP-SGD (``dpsgd``), its accountant (``accounting``) and the
``privacy`` config section.

A config with a ``privacy`` section trains the networks that see data with DP-SGD (Abadi et
al. 2016): every example's gradient is clipped to ``clip_norm``, the clipped gradients are
summed, Gaussian noise of standard deviation ``noise_multiplier * clip_norm`` is added to the
sum, and the result is divided by the expected batch size. Which networks those are is the
objective's business: a GAN's discriminator (the generator only sees the discriminator, so
its samples are post-processing), the whole VAE.

Batches are drawn by Poisson sampling: each training example independently with probability
``q = expected_batch_size / N`` (per discriminator update, for ``n_disc`` > 1), padded with
masked rows to ``train.batch_size`` so that the step compiles once, and cut down to a
random subset of ``train.batch_size`` examples when more are drawn (rarely, by choosing
``train.batch_size`` a few standard deviations above the expected size). The accountant
(``dp-accounting``'s PLD accountant by default) accounts for exactly this: Poisson sampling
with truncation. With the RDP accountant, which has no truncated event, the probability that
any step truncates is added to delta. Shuffled (epoch) batches are refused: no accountant
in dp-accounting covers them, and accounting them as Poisson underestimates epsilon (Chua et
al. 2024, "How Private are DP-SGD Implementations?").

What the guarantee covers: the weights of the private networks and everything computed
from them (the generator, samples, evaluation). The training metrics logged from private
batches (losses, ``d_real``) are not privatised; they stay in the workdir. Epsilon is a pure
function of the step, recomputed (not accumulated) wherever it is reported.

Modules: ``settings`` (the config section, its checks, and ``DpSettings``: the resolved
mechanism, which reports its own epsilon), ``accounting`` (the accountants), ``dpsgd`` (the
private gradient every private objective calls through one ``DpGradient``), ``ghost`` (ghost
clipping) and ``ledger`` (what the training loop records and reports: the one hook).
"""

from fairgen.privacy import accounting
from fairgen.privacy.dpsgd import DpGradient
from fairgen.privacy.settings import (ACCOUNTANTS, DEFAULTS, MECHANISM_FIELDS, SAMPLINGS,
                                      DpSettings, budget_section, check_record, check_section,
                                      epsilon, mechanism, padded_batch_size, resolve,
                                      resolve_section, section, validate)

__all__ = ["ACCOUNTANTS", "DEFAULTS", "DpGradient", "DpSettings", "MECHANISM_FIELDS",
           "SAMPLINGS", "accounting", "budget_section", "check_record", "check_section",
           "epsilon", "mechanism", "padded_batch_size", "resolve", "resolve_section", "section",
           "validate"]
