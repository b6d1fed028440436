"""Flax modules for tabular fairness: a predictor MLP and the adversary of Zhang et al. 2018.

Inputs are encoded rows (one-hot categoricals, standardised continuous columns; see
``fairgen/data/tabular.py``). They take hyperparameters, never the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fairgen.models.registry import MODELS


class MLP(nn.Module):
  """ReLU MLP with dropout; ``outputs`` float32 units at the end (no activation).

  ``dtype`` is the computation dtype; parameters stay float32, and the outputs are cast
  to float32 so that losses are computed in float32.
  """

  hidden: Sequence[int]
  outputs: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
      if self.dropout:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.outputs, dtype=self.dtype)(x).astype(jnp.float32)


class Predictor(nn.Module):
  """Rows -> one logit for the positive label (AIF360's classifier: 1 hidden layer)."""

  hidden: Sequence[int] = (200,)
  dropout: float = 0.2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return MLP(self.hidden, 1, self.dropout, self.dtype)(x, train)[:, 0]


class Adversary(nn.Module):
  """Predicts the sensitive attribute from the predictor's logit (and the true label).

  As in Zhang et al. 2018 and AIF360: ``s = sigmoid((1 + |c|) * logit)`` with a learned
  ``c``; for equalized odds the adversary also sees ``s * y`` and ``s * (1 - y)``, for
  demographic parity only ``s``.
  """

  equalized_odds: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, logit: jax.Array, label: jax.Array) -> jax.Array:
    c = self.param("c", nn.initializers.ones, ())
    s = jax.nn.sigmoid((1.0 + jnp.abs(c)) * logit)
    y = label.astype(s.dtype)
    inputs = jnp.stack([s, s * y, s * (1.0 - y)] if self.equalized_odds else [s], axis=-1)
    return nn.Dense(1, dtype=self.dtype)(inputs)[:, 0].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class DebiasModules:
  """The predictor and its adversary."""

  predictor: Predictor
  adversary: Adversary


@MODELS.register("fair_mlp")
def build_fair_mlp(spec: Any, hidden: tuple[int, ...] = (200,), dropout: float = 0.2,
                   equalized_odds: bool = True, dtype: str = "float32") -> DebiasModules:
  """A predictor MLP over encoded rows and the Zhang et al. 2018 adversary."""
  del spec  # Dense layers infer the input width.
  return DebiasModules(Predictor(tuple(hidden), dropout, jnp.dtype(dtype)),
                       Adversary(equalized_odds, jnp.dtype(dtype)))
