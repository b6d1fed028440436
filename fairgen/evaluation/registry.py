"""The evaluator registry: an evaluator is a function that registers an ``Entry``.

``EVALUATORS`` maps a name (listed in ``config.eval.metrics``) to an ``Entry``: the function
``(ctx: EvalContext) -> iterable of (name, value)`` and what it needs loaded before it runs
(the feature backbone, the attribute classifier), so nothing switches on evaluator names.
Each evaluator module registers its own (``image``, ``groups``, ``tabular``, ``audit``); an
evaluator defined elsewhere registers itself the same way, e.g.
``EVALUATORS.register("my_metric")(Entry(my_metric))``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from fairgen.evaluation.context import EvalContext, Scalars
from fairgen.registry import Registry


@dataclasses.dataclass(frozen=True)
class Entry:
  """A registered evaluator and what it needs loaded before it runs."""

  fn: Callable[[EvalContext], Scalars]
  needs_backbone: bool = False
  needs_attribute_classifier: bool = False


EVALUATORS: Registry[Entry] = Registry("evaluator")
