"""The objective registry: an objective family is one module that registers an ``Entry``.

``OBJECTIVES`` maps a name to an ``Entry``: the family's builder and what the rest of fairgen
needs to know about it without switching on its name: its config keys and defaults, its
value checks, its optimizer sections, the fairness capabilities it offers, whether it can
train privately, and the examples one step consumes. ``validate`` checks the ``objective``
and ``optim`` sections against the entry; ``build`` makes the ``Objective``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from fairgen.config import ConfigError, require
from fairgen.objectives.base import Objective, check_optimizer
from fairgen.registry import Registry


def _one(_: Any) -> int:
  """One batch of examples per step."""
  return 1


@dataclasses.dataclass(frozen=True)
class Entry:
  """A registered objective family.

  Attributes:
    build: ``(modules, spec, objective_settings, optim, **extras) -> Objective``.
    defaults: the ``objective`` section's keys (``name`` aside) and their defaults.
    check: raises ConfigError for impossible settings (all keys present).
    optimizers: named optimizer sections under ``optim`` (e.g. ``gen``, ``disc``); empty
      for one optimizer given by ``optim`` itself.
    capabilities: what fairness methods may need beyond per-example weights and batches
      (which every objective's per-example losses take): ``conditional`` (a net conditioned
      on groups), ``generator_penalty`` (an extra generator loss term); see
      ``fairgen.fairness.registry.CAPABILITIES``.
    private: whether ``build`` takes ``privacy`` (a ``base.PrivateGradient``) and trains
      the networks that see data with DP-SGD through it.
    examples_per_step: ``settings -> int``: batches of ``train.batch_size`` one step
      consumes (e.g. a GAN's ``n_disc``): known before the objective is built, because
      DP-SGD's accountant needs it to resolve the mechanism the objective is built with.
  """

  build: Callable[..., Objective]
  defaults: Mapping[str, Any]
  check: Callable[[Mapping[str, Any]], None]
  optimizers: tuple[str, ...] = ()
  capabilities: tuple[str, ...] = ()
  private: bool = False
  examples_per_step: Callable[[Mapping[str, Any]], int] = _one


OBJECTIVES: Registry[Entry] = Registry("objective")



def settings(objective: Mapping[str, Any]) -> dict[str, Any]:
  """The objective section's settings: its entry's defaults overridden by ``objective``.

  Raises:
    ConfigError: for an unknown objective name or key (naming the valid ones).
  """
  name = objective.get("name")
  require(name in OBJECTIVES,
          f"Unknown objective.name={name!r}; valid names: {', '.join(OBJECTIVES.names())}.")
  defaults = OBJECTIVES.get(name).defaults
  given = {k: v for k, v in objective.items() if k != "name"}
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ConfigError(f"Unknown objective keys {unknown} for objective {name!r}; valid: "
                      f"{', '.join(defaults)}.")
  return {**defaults, **given}


def validate(objective: Mapping[str, Any], optim: Mapping[str, Any]) -> None:
  """Raises ConfigError for an impossible ``objective`` or ``optim`` section."""
  cfg = settings(objective)
  entry = OBJECTIVES.get(objective["name"])
  entry.check(cfg)
  for net in entry.optimizers:
    require(net in optim, f"The {objective['name']!r} objective needs optim.{net} (an "
            f"optimizer section: name, lr, b1, b2).")
  for path, section in optimizer_sections(objective, optim):
    check_optimizer(section, path)


def optimizer_sections(objective: Mapping[str, Any], optim: Mapping[str, Any]
                       ) -> list[tuple[str, Mapping[str, Any]]]:
  """(dotted path, section) of each optimizer the objective trains with: ``optim`` itself,
  or ``optim.<net>`` for each of its nets (e.g. a GAN's gen and disc)."""
  nets = OBJECTIVES.get(objective["name"]).optimizers
  return [(f"optim.{net}", optim[net]) for net in nets] if nets else [("optim", optim)]


def build(objective: Mapping[str, Any], optim: Mapping[str, Any], modules: Any, spec: Any,
          **extras: Any) -> Objective:
  """The ``Objective`` of the config's ``objective`` and ``optim`` sections for ``modules``."""
  entry = OBJECTIVES.get(objective["name"])
  return entry.build(modules, spec, settings(objective), _plain(optim), **extras)


def examples_per_step(objective: Mapping[str, Any]) -> int:
  """Batches of ``train.batch_size`` one step of the ``objective`` section consumes."""
  return int(OBJECTIVES.get(objective["name"]).examples_per_step(settings(objective)))


def _plain(section: Any) -> Any:
  """A ConfigDict (or dict) as nested plain dicts."""
  return section.to_dict() if hasattr(section, "to_dict") else dict(section)
