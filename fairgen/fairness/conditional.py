"""``fair.method='conditional'``: a generator conditioned on the group, sampled with the target.

The model is conditioned on the sensitive attribute (``model.conditional=True``,
``model.condition_key='attr'``); sampling draws groups from ``fair.target``
(``methods.label_probs``). Objectives declare the ``conditional`` capability to support it.
"""

from __future__ import annotations

import ml_collections

from fairgen.config import require
from fairgen.fairness.registry import METHODS, Method


def check(config: ml_collections.ConfigDict) -> None:
  """Refuses a model that is not conditioned on the attribute."""
  conditioned = bool(config.model.get("conditional")) and (
      config.model.get("condition_key") == "attr")
  require(conditioned, "fair.method='conditional' needs model.conditional=True and "
          "model.condition_key='attr'.")


METHODS.register("conditional")(Method(
    summary="the generator is conditioned on the group and sampled with the target prior",
    needs=("conditional",), check=check))
