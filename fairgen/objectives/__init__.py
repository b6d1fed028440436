"""Objectives: pure ``train_step(state, batch, rng) -> (state, metrics)`` per family.

Each family is one module that registers itself in ``registry.OBJECTIVES`` (an ``Entry``:
its builder, config keys and defaults, checks, optimizer sections, fairness capabilities,
whether it trains privately, and the examples a step consumes). This package imports its
families below, so the registry is complete once ``fairgen.objectives`` is imported; an
objective defined elsewhere registers itself the same way.
"""

# The package's objective families, each registering itself.
from fairgen.objectives import autoregressive  # noqa: F401
from fairgen.objectives import debias  # noqa: F401
from fairgen.objectives import diffusion  # noqa: F401
from fairgen.objectives import edm  # noqa: F401
from fairgen.objectives import flow  # noqa: F401
from fairgen.objectives import gan  # noqa: F401
from fairgen.objectives import tabgan  # noqa: F401
from fairgen.objectives import vae  # noqa: F401
from fairgen.objectives import vfae  # noqa: F401
from fairgen.objectives.base import Objective
from fairgen.objectives.registry import (OBJECTIVES, Entry, build, examples_per_step,
                                         optimizer_sections, settings, validate)

__all__ = ["Entry", "OBJECTIVES", "Objective", "build", "examples_per_step",
           "optimizer_sections", "settings", "validate"]
