"""Objectives: pure ``train_step(state, batch, rng) -> (state, metrics)`` per family.

``OBJECTIVES`` maps a name to ``build(modules, spec, objective_cfg, optim_cfg)``.
``build_objective`` wires a whole config: dataset spec -> model -> objective.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

from fairgen.data.base import DataSpec
from fairgen.models import MODELS
from fairgen.objectives import debias
from fairgen.objectives import gan
from fairgen.objectives import tabgan
from fairgen.objectives import vae
from fairgen.objectives import vfae
from fairgen.objectives.base import Objective
from fairgen.registry import Registry

OBJECTIVES: Registry[Callable[..., Objective]] = Registry("objective")
OBJECTIVES.register("gan")(gan.build)
OBJECTIVES.register("vae")(vae.build)
OBJECTIVES.register("adversarial_debiasing")(debias.build)
OBJECTIVES.register("vfae")(vfae.build)
OBJECTIVES.register("tabgan")(tabgan.build)


def build_model(config: ml_collections.ConfigDict, spec: DataSpec) -> Any:
  """The model modules named by ``config.model``, built from its hyperparameters."""
  hparams = {k: v for k, v in config.model.to_dict().items() if k != "name"}
  return MODELS.get(config.model.name)(spec, **hparams)


def build_objective(config: ml_collections.ConfigDict, spec: DataSpec) -> Objective:
  """The objective of ``config`` for data of ``spec``, with its fairness mitigation.

  ``fair.method='penalty'`` adds the frozen attribute classifier's penalty to the GAN
  generator's loss; a group-conditional generator samples its groups from ``fair.target``.
  """
  from fairgen import fair  # pylint: disable=g-import-not-at-top  (fair imports data/metrics)
  modules = build_model(config, spec)
  extras = {}
  penalty = fair.generator_penalty(config, spec)
  if penalty is not None:
    extras["penalty"] = penalty
  objective = OBJECTIVES.get(config.objective.name)(
      modules, spec, config.objective.to_dict(), config.optim.to_dict(), **extras)
  probs = fair.label_probs(config, objective.num_classes)
  return dataclasses.replace(objective, label_probs=probs) if probs else objective


__all__ = ["OBJECTIVES", "Objective", "build_model", "build_objective"]
