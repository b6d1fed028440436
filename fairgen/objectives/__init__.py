"""Objectives: pure ``train_step(state, batch, rng) -> (state, metrics)`` per family.

``OBJECTIVES`` maps a name to an ``Entry``: the family's builder and what the rest of fairgen
needs to know about it without switching on its name: its config keys and defaults, its
value checks, its optimizer sections, and the fairness methods it supports. ``validate``
checks the ``objective`` and ``optim`` sections against the entry; ``build`` makes the
``Objective``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from fairgen.config import ConfigError, require
from fairgen.objectives import autoregressive
from fairgen.objectives import debias
from fairgen.objectives import diffusion
from fairgen.objectives import gan
from fairgen.objectives import tabgan
from fairgen.objectives import vae
from fairgen.objectives import vfae
from fairgen.objectives.base import Objective, check_optimizer
from fairgen.registry import Registry

# Weighting and resampling change only the batches and the per-example weights, which
# every objective's per-example losses take; the other methods need a conditional or
# penalised image generator (conditional: GANs, VAEs and DDPM; penalty: GANs).
DATA_METHODS = ("baseline", "importance", "resample")
ALL_METHODS = DATA_METHODS + ("conditional", "penalty")


@dataclasses.dataclass(frozen=True)
class Entry:
  """A registered objective family.

  Attributes:
    build: ``(modules, spec, objective_settings, optim, **extras) -> Objective``.
    defaults: the ``objective`` section's keys (``name`` aside) and their defaults.
    check: raises ConfigError for impossible settings (all keys present).
    optimizers: named optimizer sections under ``optim`` (e.g. ``gen``, ``disc``); empty
      for one optimizer given by ``optim`` itself.
    fair_methods: the ``fair.method`` values the objective supports.
    private: whether ``build`` takes ``privacy`` (``fairgen.privacy.DpSettings``) and
      trains the networks that see data with DP-SGD.
  """

  build: Callable[..., Objective]
  defaults: Mapping[str, Any]
  check: Callable[[Mapping[str, Any]], None]
  optimizers: tuple[str, ...] = ()
  fair_methods: tuple[str, ...] = DATA_METHODS
  private: bool = False


OBJECTIVES: Registry[Entry] = Registry("objective")
OBJECTIVES.register("gan")(Entry(gan.build, gan.DEFAULTS, gan.check, gan.OPTIMIZERS,
                                 ALL_METHODS, private=True))
OBJECTIVES.register("vae")(Entry(vae.build, vae.DEFAULTS, vae.check,
                                 fair_methods=DATA_METHODS + ("conditional",), private=True))
OBJECTIVES.register("diffusion")(Entry(diffusion.build, diffusion.DEFAULTS, diffusion.check,
                                       fair_methods=DATA_METHODS + ("conditional",)))
OBJECTIVES.register("adversarial_debiasing")(Entry(debias.build, debias.DEFAULTS, debias.check,
                                                  private=True))
OBJECTIVES.register("vfae")(Entry(vfae.build, vfae.DEFAULTS, vfae.check))
OBJECTIVES.register("autoregressive")(Entry(
    autoregressive.build, autoregressive.DEFAULTS, autoregressive.check,
    fair_methods=DATA_METHODS + ("conditional",)))
OBJECTIVES.register("tabgan")(Entry(tabgan.build, tabgan.DEFAULTS, tabgan.check,
                                    tabgan.OPTIMIZERS))


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


def _plain(section: Any) -> Any:
  """A ConfigDict (or dict) as nested plain dicts."""
  return section.to_dict() if hasattr(section, "to_dict") else dict(section)


__all__ = ["ALL_METHODS", "DATA_METHODS", "Entry", "OBJECTIVES", "Objective", "build",
           "settings", "validate"]
