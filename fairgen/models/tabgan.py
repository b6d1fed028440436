"""A tabular WGAN-GP generator and critic that model whole rows (TabFairGAN, Rajabi 2022).

A row is ``[encoded features (D), one-hot label (num_classes), one-hot attr (num_groups)]``:
the generator draws the label and the sensitive attribute together with the features, so
the fairness of the synthetic data is a property of its joint distribution.

Generator: a ReLU MLP from ``z`` to one output per row position; each categorical block
(the feature columns', the label's and the attribute's) goes through a Gumbel-softmax with
``temperature`` (``hard``: straight-through one-hot forward, soft gradient), continuous
columns are linear. The Gumbel noise is carried in the latent vector rather than drawn
inside the network: a latent is ``[z (latent_dim), eps (row_dim)]``, all ``N(0, I)``, and
the noise of a logit is ``-log(-log Phi(eps))`` (``Phi``: the normal CDF), an exact
Gumbel(0, 1) draw (the ``eps`` of continuous positions is unused). ``decode`` is thus a
deterministic function of the latent that samples categories exactly as training does
(``argmax(logits + noise)`` is a draw from ``softmax(logits)``), where an argmax of the
logits alone would always give the mode.

Critic: a LeakyReLU MLP with no normalisation (the gradient penalty needs per-example
gradients, which batch statistics would couple).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import special

from fairgen.config import ConfigError
from fairgen.data import tabular
from fairgen.models.registry import MODELS


def row_dim(spec: tabular.TabularSpec) -> int:
  """Width of a generated row: features, one-hot label and one-hot attribute."""
  return spec.feature_dim + spec.num_classes + spec.num_groups


def row_blocks(spec: tabular.TabularSpec
               ) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
  """(categorical blocks ``(start, width)``, continuous positions) of a generated row."""
  categorical = [(c.start, c.width) for c in spec.columns if c.kind == tabular.CATEGORICAL]
  continuous = tuple(c.start for c in spec.columns if c.kind == tabular.CONTINUOUS)
  d = spec.feature_dim
  categorical += [(d, spec.num_classes), (d + spec.num_classes, spec.num_groups)]
  return tuple(categorical), continuous


def join_rows(features: jax.Array, label: jax.Array, attr: jax.Array,
              num_classes: int = 2, num_groups: int = 2) -> jax.Array:
  """Real rows in the generator's layout: ``[features, one-hot label, one-hot attr]``."""
  return jnp.concatenate([jnp.asarray(features, jnp.float32),
                          jax.nn.one_hot(label, num_classes, dtype=jnp.float32),
                          jax.nn.one_hot(attr, num_groups, dtype=jnp.float32)], axis=-1)


def split_generated(spec: tabular.TabularSpec, rows: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Generated rows -> (features float32 ``[n, D]``, label int32 ``[n]``, attr int32 ``[n]``).

  Label and attribute are the argmax of their blocks, so soft rows split too.
  """
  rows = np.asarray(rows)
  d, c = spec.feature_dim, spec.num_classes
  if rows.ndim != 2 or rows.shape[1] != row_dim(spec):
    raise ValueError(f"Expected generated rows of shape [n, {row_dim(spec)}], got "
                     f"{rows.shape}.")
  return (rows[:, :d].astype(np.float32), np.argmax(rows[:, d:d + c], 1).astype(np.int32),
          np.argmax(rows[:, d + c:], 1).astype(np.int32))


def gumbel_from_normal(eps: jax.Array) -> jax.Array:
  """Gumbel(0, 1) draws from standard-normal ones: ``-log(-log Phi(eps))``."""
  return -jnp.log(jnp.maximum(-special.log_ndtr(eps), 1e-30))


class Generator(nn.Module):
  """Latents ``[B, latent_dim + row_dim]`` -> rows ``[B, row_dim]`` (see the module doc).

  Attributes:
    latent_dim: size of ``z``, the MLP's input.
    row_dim: width of a row.
    categorical: the row's categorical blocks ``(start, width)``.
    hidden: hidden-layer widths.
    temperature: the Gumbel-softmax temperature.
    hard: straight-through one-hot rows in training (soft ones otherwise).
    dtype: computation dtype of the MLP (parameters and the Gumbel-softmax stay float32).
  """

  latent_dim: int
  row_dim: int
  categorical: tuple[tuple[int, int], ...]
  hidden: Sequence[int] = (256, 256)
  temperature: float = 0.2
  hard: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, latents: jax.Array, train: bool = False) -> jax.Array:
    """Rows; ``train=False`` gives hard one-hot categoricals (the decoded samples)."""
    z, eps = latents[:, :self.latent_dim], latents[:, self.latent_dim:]
    h = z
    for width in self.hidden:
      h = nn.relu(nn.Dense(width, dtype=self.dtype)(h))
    out = nn.Dense(self.row_dim, dtype=self.dtype)(h).astype(jnp.float32)
    noisy = out + jax.lax.stop_gradient(gumbel_from_normal(eps))
    pieces, pos = [], 0
    for start, width in self.categorical:
      pieces.append(out[:, pos:start])  # Continuous columns before this block: linear.
      block = noisy[:, start:start + width]
      onehot = jax.nn.one_hot(jnp.argmax(block, -1), width, dtype=out.dtype)
      if train:
        soft = jax.nn.softmax(block / self.temperature, axis=-1)
        onehot = soft + jax.lax.stop_gradient(onehot - soft) if self.hard else soft
      pieces.append(onehot)
      pos = start + width
    pieces.append(out[:, pos:])
    return jnp.concatenate(pieces, axis=-1)


class Critic(nn.Module):
  """Rows -> one score per row: a LeakyReLU MLP without normalisation."""

  hidden: Sequence[int] = (256, 256)
  negative_slope: float = 0.2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, rows: jax.Array) -> jax.Array:
    h = rows
    for width in self.hidden:
      h = nn.leaky_relu(nn.Dense(width, dtype=self.dtype)(h), self.negative_slope)
    return nn.Dense(1, dtype=self.dtype)(h)[:, 0].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class TabGanModules:
  """Generator, critic and the row layout they share.

  Attributes:
    generator: the :class:`Generator`.
    discriminator: the :class:`Critic` (a WGAN's discriminator).
    latent_dim: size of the full latent vector ``[z, eps]`` (``Objective.latent_dim``).
    row_dim: width of a row.
    label_column: row position of ``label == 1`` (its probability in soft rows).
    attr_column: row position of ``attr == 1`` (privileged).
    num_classes: label cardinality.
    num_groups: sensitive-attribute cardinality.
  """

  generator: Generator
  discriminator: Critic
  latent_dim: int
  row_dim: int
  label_column: int
  attr_column: int
  num_classes: int = 2
  num_groups: int = 2


@MODELS.register("tabgan")
def build_tabgan(spec: tabular.TabularSpec, latent_dim: int = 128,
                 hidden: Sequence[int] = (256, 256),
                 critic_hidden: Sequence[int] = (256, 256), temperature: float = 0.2,
                 hard: bool = False, dtype: str = "float32") -> TabGanModules:
  """A row generator and a critic for the tabular dataset of ``spec`` (model builder).

  Args:
    spec: the dataset's :class:`fairgen.data.tabular.TabularSpec`.
    latent_dim: size of ``z`` (the full latent adds ``row_dim`` Gumbel-noise entries).
    hidden: the generator's hidden widths.
    critic_hidden: the critic's hidden widths.
    temperature: the Gumbel-softmax temperature (TabFairGAN and CTGAN: 0.2).
    hard: straight-through one-hot categoricals during training.
    dtype: the computation dtype, 'float32' or 'bfloat16' (parameters stay float32).

  Returns:
    The :class:`TabGanModules`.
  """
  if not isinstance(spec, tabular.TabularSpec):
    raise ConfigError(f"The tabular GAN needs a tabular dataset (adult, german), got "
                     f"{getattr(spec, 'name', spec)!r}.")
  if spec.num_classes != 2 or spec.num_groups != 2:
    raise ConfigError("The tabular GAN supports a binary label and a binary attribute.")
  if temperature <= 0:
    raise ConfigError(f"model.temperature must be > 0, got {temperature}.")
  categorical, _ = row_blocks(spec)
  width = row_dim(spec)
  return TabGanModules(
      generator=Generator(int(latent_dim), width, categorical,
                          tuple(int(h) for h in hidden), float(temperature), bool(hard),
                          jnp.dtype(dtype)),
      discriminator=Critic(tuple(int(h) for h in critic_hidden), dtype=jnp.dtype(dtype)),
      latent_dim=int(latent_dim) + width, row_dim=width,
      label_column=spec.feature_dim + 1,
      attr_column=spec.feature_dim + spec.num_classes + 1,
      num_classes=spec.num_classes, num_groups=spec.num_groups)
