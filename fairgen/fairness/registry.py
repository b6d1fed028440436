"""The fairness-method registry: a method is one file that registers a ``Method``.

A ``Method`` carries its own ``fair`` config keys and their checks, the objective
capabilities it needs, and the hooks through which it acts. Every hook is optional; a method
that sets none trains like the baseline. The rest of fairgen calls the hooks of the
configured method (``fairgen.fairness.methods``) and never switches on a method's name.

Hooks, in the order a run meets them:
- ``check_section(fair)``: its own keys (run for every registered method, chosen or not);
- ``check(config)``: what it needs from the rest of the config when chosen (the model, the
  data options, a ``privacy`` section);
- ``weight_bound(config)`` and ``private_prior(config, num_examples)``: what DP-SGD's
  accountant needs to know (the largest importance weight; mechanisms spent on the data
  before the first step);
- ``penalty(config, spec)``: an extra generator loss term (``GeneratorPenalty``), only for
  objectives with the ``generator_penalty`` capability;
- ``prepare(config, source, workdir, global_batch)``: the training split and the sampler the
  loop draws batches with (weights as a ``weight`` column, or a ``WeightedSampler``);
- ``guidance(config, spec)``: a sampler's guidance toward the target groups
  (``fairgen.objectives.denoising.GroupGuidance``), only for objectives with the
  ``sampling_guidance`` capability.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import ml_collections

from fairgen import data
from fairgen.registry import Registry

# What an objective can declare (``fairgen.objectives.Entry.capabilities``) for methods that
# need more than per-example weights and batches: a generator conditioned on groups, and an
# extra generator loss term, and an iterative sampler that can be guided toward groups.
CAPABILITIES = ("conditional", "generator_penalty", "sampling_guidance")

Prepare = Callable[[ml_collections.ConfigDict, data.Source, str, int],
                   tuple[data.Source, Any]]


def _no_check(_: Any) -> None:
  """A check that accepts everything."""


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered fairness method (see the module docstring for the hooks).

  Attributes:
    summary: one line saying what the method changes (for docs and errors).
    defaults: its own keys of the ``fair`` section and their defaults.
    needs: the objective capabilities (``CAPABILITIES``) it needs.
    check_section: ``fair -> None``; raises ConfigError for an impossible value of its keys.
    check: ``config -> None``; raises ConfigError for what it needs and the config lacks.
    prepare: ``(config, source, workdir, global_batch) -> (source, sampler | None)``.
    penalty: ``(config, spec) -> GeneratorPenalty``: the generator's extra loss term.
    weight_bound: ``config -> float``: the largest per-example weight of a batch.
    private_prior: ``(config, num_examples) -> ((sigma, rate, draws, batch), ...)``.
    guidance: ``(config, spec) -> GroupGuidance``: the sampler's guidance toward groups.
  """

  summary: str
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  needs: tuple[str, ...] = ()
  check_section: Callable[[ml_collections.ConfigDict], None] = _no_check
  check: Callable[[ml_collections.ConfigDict], None] = _no_check
  prepare: Prepare | None = None
  penalty: Callable[[ml_collections.ConfigDict, Any], Any] | None = None
  weight_bound: Callable[[ml_collections.ConfigDict], float] | None = None
  private_prior: Callable[[ml_collections.ConfigDict, int], tuple] | None = None
  guidance: Callable[[ml_collections.ConfigDict, Any], Any] | None = None


METHODS: Registry[Method] = Registry("fair.method")


def supported(capabilities: tuple[str, ...]) -> list[str]:
  """The registered methods an objective with ``capabilities`` supports, in order."""
  return [name for name in METHODS if set(METHODS.get(name).needs) <= set(capabilities)]
