"""The ``privacy`` config section and a run's resolved DP-SGD mechanism (``DpSettings``).

``check_section`` checks what needs no data; ``resolve`` (at the composition root, once per
run) checks what needs the training split's size, solves sigma for a target epsilon, and
checks the budget. ``DpSettings`` then answers for the run: its epsilon at a step, the
mechanism's record, and what a release (samples, an evaluation) spent.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import ml_collections

from fairgen.config import ConfigError, require
from fairgen.privacy import accounting

SAMPLINGS = ("poisson",)
ACCOUNTANTS = ("pld", "rdp")
DEFAULTS = {
    "clip_norm": 1.0,  # Per-example gradient norm bound C.
    # Noise standard deviation / clip_norm (sigma). -1: solved from target_epsilon.
    "noise_multiplier": -1.0,
    "target_epsilon": 0.0,  # > 0: solve sigma so that the whole run spends this epsilon.
    "delta": 1e-5,  # Must be below 1 / N.
    "expected_batch_size": 0,  # q * N, the mean Poisson batch (<= train.batch_size).
    "sampling": "poisson",  # How batches are drawn (must match the accountant).
    "accountant": "pld",  # 'pld' (exact for truncated Poisson sampling) or 'rdp'.
    "epsilon_budget": 0.0,  # > 0: refuse a run whose epsilon would exceed it.
    "microbatch_size": 0,  # Per-example gradients this many at a time (0: the batch).
    # Clip Dense layers by ghost clipping (fairgen/privacy/ghost.py): the same update
    # without their per-example gradients; other layers keep them.
    "ghost_clipping": False,
}
# A run's truncation probability (any step drawing more than train.batch_size) above this
# share of delta is refused for the RDP accountant, which has to add it to delta.
MAX_TRUNCATION_SHARE = 0.1


def section(**overrides: Any) -> ml_collections.ConfigDict:
  """A ``privacy`` config section: ``DEFAULTS`` with ``overrides``."""
  unknown = sorted(set(overrides) - set(DEFAULTS))
  if unknown:
    raise ConfigError(f"Unknown privacy keys {unknown}; valid: {', '.join(DEFAULTS)}.")
  return ml_collections.ConfigDict({**DEFAULTS, **overrides})


def budget_section(eps: str | float, **overrides: Any) -> ml_collections.ConfigDict:
  """A ``privacy`` section spending ``eps`` over the run: a number (sigma is solved for it)
  or ``'inf'`` (the same clipping and Poisson sampling without noise); with ``overrides``."""
  eps = float(eps)
  if math.isinf(eps):
    return section(noise_multiplier=0.0, target_epsilon=0.0, **overrides)
  return section(noise_multiplier=-1.0, target_epsilon=eps, **overrides)


@dataclasses.dataclass(frozen=True)
class DpSettings:
  """A run's resolved DP-SGD parameters (``resolve``).

  Attributes:
    clip_norm: C.
    noise_multiplier: sigma (0: clipping only, epsilon is infinite).
    expected_batch_size: q * N, what the noisy sum is divided by.
    batch_size: rows per draw (the padded, truncated Poisson batch).
    num_examples: N, the training split's size.
    draws_per_step: Poisson batches per train step (``n_disc`` for a GAN).
    num_steps: the run's train steps.
    delta: the target delta.
    accountant: 'pld' or 'rdp'.
    microbatch_size: examples per vmapped per-example-gradient call.
    ghost_clipping: Dense layers by ghost clipping (not part of the mechanism).
    audit_canaries: white-box canaries of a ``--mode=audit`` run (0: none).
    weight_bound: importance weights are divided by this before they scale the clipped
      gradients, so each example's contribution stays within C (1: no weights).
    prior: mechanisms spent on the same data before the first step (e.g. the DP
      density-ratio classifier of importance weighting), each ``(noise_multiplier, rate,
      draws, batch_size)``; epsilon composes them with the run's draws.
    mesh: the mesh the step runs on (None: one device).
  """

  clip_norm: float
  noise_multiplier: float
  expected_batch_size: int
  batch_size: int
  num_examples: int
  draws_per_step: int
  num_steps: int
  delta: float
  accountant: str = "pld"
  microbatch_size: int = 0
  weight_bound: float = 1.0
  ghost_clipping: bool = False
  prior: tuple[accounting.Prior, ...] = ()
  # The run's mesh (set by fairgen.experiment.setup): where per-example gradients are
  # computed. Not part of the mechanism, nor of equality.
  mesh: Any = dataclasses.field(default=None, compare=False, repr=False)
  # White-box canaries of a --mode=audit run (fairgen.audit; 0: none): coordinates of the
  # privatised vector that no example's gradient touches. Not part of the mechanism.
  audit_canaries: int = dataclasses.field(default=0, compare=False)

  @property
  def sampling_rate(self) -> float:
    """q: each example's probability of joining a Poisson batch."""
    return self.expected_batch_size / self.num_examples

  def epsilon(self, step: int) -> float:
    """Epsilon at ``delta`` after ``step`` train steps (``epsilon``)."""
    return epsilon(self, step)

  def mechanism(self) -> dict[str, Any]:
    """What one step's privacy depends on, and how it is accounted (``mechanism``)."""
    return mechanism(self)

  def spent(self, step: int) -> dict[str, float]:
    """``{'epsilon', 'delta'}`` of the weights after ``step`` steps: what a release of them
    (samples, an evaluation) reports."""
    return {"epsilon": epsilon(self, step), "delta": self.delta}


def validate(config: ml_collections.ConfigDict, private_objective: bool) -> None:
  """Raises ConfigError for an impossible ``privacy`` section (what needs no data).

  Args:
    config: the experiment config (with a ``privacy`` section).
    private_objective: whether the objective can train with DP-SGD.
  """
  require(private_objective, f"The {config.objective.name!r} objective has no DP-SGD step; "
          f"remove the privacy section or use the 'gan', 'vae' or 'adversarial_debiasing' "
          f"objective.")
  check_section(config.privacy.to_dict(), config.train.batch_size)


def check_section(given: Mapping[str, Any], batch_size: int, prefix: str = "privacy."
                  ) -> dict[str, Any]:
  """``DEFAULTS`` overridden by ``given``, after checking what needs no data.

  Args:
    given: a privacy section (or part of one).
    batch_size: rows per Poisson batch (``train.batch_size``).
    prefix: how errors name a key (``privacy.`` in configs, ``--dp_`` on a command line).

  Raises:
    ConfigError: for unknown keys, clip <= 0, sigma < 0, both or neither of sigma and a
      target epsilon, delta outside (0, 1), shuffled sampling, an unknown accountant, an
      expected batch outside [1, batch_size], or a microbatch that does not divide it.
  """
  unknown = sorted(set(given) - set(DEFAULTS))
  require(not unknown, f"Unknown privacy keys {unknown}; valid: {', '.join(DEFAULTS)}.")
  p = {**DEFAULTS, **given}
  require(p["clip_norm"] > 0, f"{prefix}clip_norm must be > 0, got {p['clip_norm']}.")
  sigma, target = p["noise_multiplier"], p["target_epsilon"]
  require(target >= 0, f"{prefix}target_epsilon must be > 0 (or 0: off), got {target}.")
  if target > 0:
    require(sigma == -1, f"Set one of {prefix}noise_multiplier and {prefix}target_epsilon "
            f"(got noise_multiplier={sigma} and target_epsilon={target}).")
  else:
    require(sigma >= 0, f"{prefix}noise_multiplier must be >= 0 (0: no noise), got {sigma}; "
            f"or set {prefix}target_epsilon to solve for it.")
  require(0 < p["delta"] < 1, f"{prefix}delta must be in (0, 1), got {p['delta']}.")
  if p["sampling"] == "shuffle":
    raise ConfigError(f"{prefix}sampling='shuffle' is refused: no accountant covers shuffled "
                      "batches, and accounting them as Poisson sampling underestimates epsilon "
                      "(Chua et al. 2024). Use 'poisson'.")
  require(p["sampling"] in SAMPLINGS,
          f"Unknown {prefix}sampling={p['sampling']!r}; valid: {', '.join(SAMPLINGS)}.")
  require(p["accountant"] in ACCOUNTANTS,
          f"Unknown {prefix}accountant={p['accountant']!r}; valid: {', '.join(ACCOUNTANTS)}.")
  expected = p["expected_batch_size"]
  require(isinstance(expected, int) and 1 <= expected <= batch_size,
          f"{prefix}expected_batch_size must be an integer in [1, batch size={batch_size}] "
          f"(Poisson batches are padded to the batch size), got {expected!r}.")
  micro = p["microbatch_size"]
  require(isinstance(micro, int) and micro >= 0 and (micro == 0 or batch_size % micro == 0),
          f"{prefix}microbatch_size must be 0 or divide the batch size={batch_size}, got "
          f"{micro!r}.")
  require(isinstance(p["ghost_clipping"], bool),
          f"{prefix}ghost_clipping must be True or False, got {p['ghost_clipping']!r}.")
  require(p["epsilon_budget"] >= 0,
          f"{prefix}epsilon_budget must be >= 0 (0: none), got {p['epsilon_budget']}.")
  return p


def resolve(config: ml_collections.ConfigDict, num_examples: int,
            draws_per_step: int, weight_bound: float = 1.0,
            prior: tuple[accounting.Prior, ...] = ()) -> DpSettings:
  """The run's ``DpSettings`` (``resolve_section`` of the config's privacy section)."""
  return resolve_section(config.privacy.to_dict(), num_examples,
                         int(config.train.batch_size), int(config.train.num_steps),
                         draws_per_step, weight_bound, prior=prior)


def padded_batch_size(expected: int) -> int:
  """Rows for Poisson batches of ``expected`` examples on average: 4.5 standard deviations
  more, rounded up to a multiple of 8 (a larger draw is truncated, and accounted for)."""
  return int(math.ceil((expected + 4.5 * math.sqrt(expected)) / 8) * 8)


def resolve_section(given: Mapping[str, Any], num_examples: int, batch_size: int,
                    num_steps: int, draws_per_step: int = 1, weight_bound: float = 1.0,
                    prefix: str = "privacy.", prior: tuple[accounting.Prior, ...] = ()
                    ) -> DpSettings:
  """The ``DpSettings`` of a run: checks what needs the data, solves sigma, checks the budget.

  Args:
    given: the privacy section (``check_section``'s keys).
    num_examples: N, the size of the split batches are drawn from.
    batch_size: rows per Poisson batch.
    num_steps: the run's train steps.
    draws_per_step: Poisson batches per train step (the objective's examples_per_step).
    weight_bound: the bound of the batches' importance weights (1: none).
    prefix: how errors name a key.
    prior: mechanisms spent on the same N examples before the run (``DpSettings.prior``):
      a target epsilon is the budget of all of them together.

  Raises:
    ConfigError: what ``check_section`` raises; delta >= 1/N, an expected batch above N, a
      truncation probability the RDP accountant cannot absorb, a target the prior
      mechanisms already spend, or an epsilon above ``epsilon_budget``.
  """
  p = check_section(given, batch_size, prefix)
  n, batch = int(num_examples), int(batch_size)
  require(p["expected_batch_size"] <= n, f"{prefix}expected_batch_size="
          f"{p['expected_batch_size']} exceeds the training split's {n} examples.")
  require(p["delta"] < 1.0 / n, f"{prefix}delta={p['delta']:g} must be below 1/N = "
          f"{1.0 / n:.3g} (N = {n} training examples): a larger delta allows releasing an "
          f"example outright.")
  rate = p["expected_batch_size"] / n
  draws = int(num_steps) * draws_per_step
  if p["accountant"] == "rdp":
    trunc = accounting.truncation_probability(n, rate, batch, draws)
    require(trunc <= MAX_TRUNCATION_SHARE * p["delta"],
            f"{prefix}accountant='rdp': the run truncates a Poisson batch of "
            f"expected_batch_size={p['expected_batch_size']} to the batch size {batch} with "
            f"probability {trunc:.2g}, more than {MAX_TRUNCATION_SHARE:g} * delta; raise "
            f"the batch size or use the 'pld' accountant (which accounts for truncation).")
  sigma = float(p["noise_multiplier"])
  if p["target_epsilon"] > 0:
    try:
      sigma = accounting.solve_noise_multiplier(p["target_epsilon"], rate, draws, n, batch,
                                                p["delta"], p["accountant"], prior)
    except ValueError as e:
      raise ConfigError(f"{prefix}target_epsilon={p['target_epsilon']:g} cannot be met: "
                        f"{e}") from None
  settings = DpSettings(
      clip_norm=float(p["clip_norm"]), noise_multiplier=sigma,
      expected_batch_size=int(p["expected_batch_size"]), batch_size=batch, num_examples=n,
      draws_per_step=int(draws_per_step), num_steps=int(num_steps),
      delta=float(p["delta"]), accountant=p["accountant"],
      microbatch_size=int(p["microbatch_size"]), weight_bound=float(weight_bound),
      ghost_clipping=bool(p["ghost_clipping"]),
      prior=tuple((float(a), float(b), int(c), int(d)) for a, b, c, d in prior))
  budget = float(p["epsilon_budget"])
  if budget > 0:
    eps = epsilon(settings, settings.num_steps)
    require(eps <= budget, f"This run would spend epsilon={eps:.4g} (delta={p['delta']:g}) "
            f"by step {settings.num_steps}, over {prefix}epsilon_budget={budget:g}. "
            f"Lower the steps or expected_batch_size, or raise noise_multiplier.")
  return settings


@functools.lru_cache(maxsize=256)
def epsilon(settings: DpSettings, step: int) -> float:
  """Epsilon at ``settings.delta`` after ``step`` train steps (a pure function of step)."""
  return accounting.epsilon(settings.noise_multiplier, settings.sampling_rate,
                            step * settings.draws_per_step, settings.num_examples,
                            settings.batch_size, settings.delta, settings.accountant,
                            settings.prior)


# The fields that define the mechanism of one step; a resumed run must keep them.
MECHANISM_FIELDS = ("clip_norm", "noise_multiplier", "expected_batch_size", "batch_size",
                    "num_examples", "draws_per_step", "weight_bound", "prior")


def mechanism(settings: DpSettings) -> dict[str, Any]:
  """What one step's privacy depends on, plus how it is accounted (JSON-ready)."""
  out = {k: getattr(settings, k) for k in MECHANISM_FIELDS}
  out["prior"] = [list(p) for p in settings.prior]
  out.update(delta=settings.delta, accountant=settings.accountant, sampling="poisson")
  return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in out.items()}


def check_record(record: dict[str, Any] | None, settings: DpSettings) -> list[str]:
  """The mechanism fields in which ``settings`` differ from a run's earlier ``record``
  (empty: the run may resume). A noise multiplier solved from a target epsilon changes
  with ``train.num_steps``, and steps taken with two mechanisms cannot be accounted as one
  run, so resuming with a different mechanism is refused."""
  if record is None:
    return []
  now = mechanism(settings)
  record = {"prior": [], **record}  # Records from before ``prior`` existed had none.
  return [f"privacy.{k}: {record.get(k)!r} -> {now[k]!r}" for k in MECHANISM_FIELDS
          if record.get(k) != now[k] and not (
              isinstance(now[k], float) and isinstance(record.get(k), float)
              and math.isclose(now[k], record[k], rel_tol=1e-12))]
