"""The Variational Fair Autoencoder (Louizos et al. 2016, "The Variational Fair Autoencoder").

Networks (ReLU MLPs with ``hidden`` units; ``s`` and ``y`` enter as one-hot vectors):
- encoder ``q(z1 | x, s)``: diagonal Gaussian (mean, log-variance);
- label head ``q(y | z1)``: one logit for ``y = 1``;
- decoder ``p(x | z1, s)``: one output per encoded feature: logits of a softmax over each
  categorical column's one-hot block, means of a unit-variance Gaussian for each
  standardised continuous column (the layout comes from ``TabularSpec.columns``);
- with ``hierarchical=True``, the paper's second level: ``q(z2 | z1, y)`` and the learned
  prior ``p(z1 | z2, y)``, with ``p(z2) = N(0, I)``.

With ``hierarchical=False`` (a simplification of the paper) the prior on ``z1`` is
``N(0, I)``: the KL term is the analytic ``KL(q(z1 | x, s) || N(0, I))`` and the label only
shapes ``z1`` through the classifier term, not through a label-conditional prior. With
``hierarchical=True`` the KL of the supervised ELBO is
``E_q[log q(z1 | x, s) - log p(z1 | z2, y)] + E_q[KL(q(z2 | z1, y) || N(0, I))]``, the first
term with the analytic entropy of ``q(z1 | x, s)`` and a one-sample estimate of the cross
term (the constant ``log p(y)`` is left out).

The module returns per-example terms; the objective (``objectives/vfae.py``) weights them
and adds the MMD penalty between the groups' ``z1``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairgen.config import ConfigError
from fairgen.data import tabular
from fairgen.models.registry import MODELS
from fairgen.models.tabular import MLP
from fairgen.models.vae import gaussian_kl

_LOG_2PI = math.log(2.0 * math.pi)


def feature_blocks(columns: Sequence[tabular.Column]
                   ) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
  """(categorical one-hot blocks as ``(start, width)``, continuous positions) of a layout."""
  categorical = tuple((c.start, c.width) for c in columns if c.kind == tabular.CATEGORICAL)
  continuous = tuple(c.start for c in columns if c.kind == tabular.CONTINUOUS)
  return categorical, continuous


def reconstruction_nll(x: jax.Array, outputs: jax.Array,
                       categorical: Sequence[tuple[int, int]],
                       continuous: Sequence[int]) -> jax.Array:
  """Per-example ``-log p(x | decoder outputs)`` in nats.

  Args:
    x: encoded rows ``[B, D]`` (one-hot categoricals, standardised continuous values).
    outputs: decoder outputs ``[B, D]`` (logits per categorical block, Gaussian means).
    categorical: the one-hot blocks ``(start, width)``; a categorical column's NLL is the
      softmax cross-entropy over its block (an all-zero block, an unseen category,
      contributes 0).
    continuous: positions of the continuous columns (unit-variance Gaussian NLL, i.e.
      half the squared error plus ``log(2 pi) / 2``).

  Returns:
    ``[B]`` negative log-likelihoods.
  """
  nll = jnp.zeros(x.shape[:1], jnp.float32)
  for start, width in categorical:
    nll += optax.softmax_cross_entropy(outputs[:, start:start + width],
                                       x[:, start:start + width])
  if continuous:
    idx = np.asarray(continuous)
    nll += jnp.sum(0.5 * (x[:, idx] - outputs[:, idx])**2 + 0.5 * _LOG_2PI, axis=-1)
  return nll


def gaussian_log_prob(z: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """``log N(z; mean, exp(logvar))`` per example, summed over dimensions."""
  return -0.5 * jnp.sum(logvar + (z - mean)**2 * jnp.exp(-logvar) + _LOG_2PI, axis=-1)


def gaussian_entropy(logvar: jax.Array) -> jax.Array:
  """Entropy of ``N(., exp(logvar))`` per example, summed over dimensions."""
  return 0.5 * jnp.sum(logvar + 1.0 + _LOG_2PI, axis=-1)


class VFAE(nn.Module):
  """The VFAE networks and the per-example terms of its supervised objective.

  Attributes:
    feature_dim: width ``D`` of the encoded rows.
    categorical: the one-hot blocks ``(start, width)`` of the rows.
    continuous: positions of the continuous columns.
    latent_dim: size of ``z1`` (the fair representation).
    hidden: hidden-layer widths of every MLP.
    hierarchical: add the ``z2`` level (see the module docstring).
    z2_dim: size of ``z2`` (used only when ``hierarchical``).
    num_groups: sensitive-attribute cardinality.
    num_classes: label cardinality (2).
    dtype: computation dtype of the MLPs (their outputs, and the loss terms, are float32).
  """

  feature_dim: int
  categorical: tuple[tuple[int, int], ...]
  continuous: tuple[int, ...]
  latent_dim: int = 32
  hidden: Sequence[int] = (100,)
  hierarchical: bool = False
  z2_dim: int = 16
  num_groups: int = 2
  num_classes: int = 2
  dtype: Any = jnp.float32

  def setup(self):
    hidden, dtype = tuple(self.hidden), self.dtype
    self.encoder = MLP(hidden, 2 * self.latent_dim, dtype=dtype)
    self.label_head = MLP(hidden, 1, dtype=dtype)
    self.decoder = MLP(hidden, self.feature_dim, dtype=dtype)
    if self.hierarchical:
      self.z2_encoder = MLP(hidden, 2 * self.z2_dim, dtype=dtype)
      self.z1_prior = MLP(hidden, 2 * self.latent_dim, dtype=dtype)

  def _onehot(self, v: jax.Array, n: int) -> jax.Array:
    return jax.nn.one_hot(v, n, dtype=jnp.float32)

  def encode(self, x: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``q(z1 | x, s)``: (mean, log-variance) ``[B, latent_dim]`` each."""
    h = jnp.concatenate([x, self._onehot(s, self.num_groups)], axis=-1)
    return tuple(jnp.split(self.encoder(h), 2, axis=-1))

  def classify(self, z1: jax.Array) -> jax.Array:
    """``q(y = 1 | z1)`` as a logit ``[B]``."""
    return self.label_head(z1)[:, 0]

  def decode(self, z1: jax.Array, s: jax.Array) -> jax.Array:
    """``p(x | z1, s)``: logits per categorical block and continuous means ``[B, D]``."""
    return self.decoder(jnp.concatenate([z1, self._onehot(s, self.num_groups)], axis=-1))

  def reconstruction_nll(self, x: jax.Array, outputs: jax.Array) -> jax.Array:
    """Per-example reconstruction NLL of ``x`` under decoder ``outputs``."""
    return reconstruction_nll(x, outputs, self.categorical, self.continuous)

  def __call__(self, x: jax.Array, s: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    """Per-example terms with one reparameterised sample (rng stream ``'latent'``).

    Returns:
      ``recon`` (NLL of x), ``kl`` (all KL terms), ``label_nll`` (BCE of y given the
      sampled z1), ``z1`` (the sample), ``z1_mean`` and ``logit`` (of y = 1 at the sample).
    """
    mean, logvar = self.encode(x, s)
    rng = self.make_rng("latent")
    r1, r2 = jax.random.split(rng)
    z1 = mean + jnp.exp(0.5 * logvar) * jax.random.normal(r1, mean.shape)
    recon = self.reconstruction_nll(x, self.decode(z1, s))
    logit = self.classify(z1)
    label_nll = optax.sigmoid_binary_cross_entropy(logit, y.astype(jnp.float32))
    if self.hierarchical:
      y1h = self._onehot(y, self.num_classes)
      m2, lv2 = jnp.split(self.z2_encoder(jnp.concatenate([z1, y1h], -1)), 2, axis=-1)
      z2 = m2 + jnp.exp(0.5 * lv2) * jax.random.normal(r2, m2.shape)
      mp, lvp = jnp.split(self.z1_prior(jnp.concatenate([z2, y1h], -1)), 2, axis=-1)
      kl = (-gaussian_entropy(logvar) - gaussian_log_prob(z1, mp, lvp)
            + gaussian_kl(m2, lv2))
    else:
      kl = gaussian_kl(mean, logvar)
    return {"recon": recon, "kl": kl, "label_nll": label_nll, "z1": z1, "z1_mean": mean,
            "logit": logit}


@MODELS.register("vfae")
def build_vfae(spec: tabular.TabularSpec, latent_dim: int = 32,
               hidden: Sequence[int] = (100,), hierarchical: bool = False,
               z2_dim: int = 16, dtype: str = "float32") -> VFAE:
  """A VFAE for the tabular dataset of ``spec`` (model builder for ``MODELS``).

  Args:
    spec: the dataset's :class:`fairgen.data.tabular.TabularSpec`.
    latent_dim: size of the representation ``z1``.
    hidden: hidden-layer widths of every MLP (the paper: one layer of 100 units).
    hierarchical: model the paper's ``z2`` level (else an ``N(0, I)`` prior on ``z1``).
    z2_dim: size of ``z2`` when ``hierarchical``.
    dtype: the computation dtype, 'float32' or 'bfloat16' (parameters stay float32).

  Returns:
    The :class:`VFAE` module.
  """
  if not isinstance(spec, tabular.TabularSpec):
    raise ConfigError(f"The VFAE needs a tabular dataset (adult, german), got "
                     f"{getattr(spec, 'name', spec)!r}.")
  categorical, continuous = feature_blocks(spec.columns)
  return VFAE(feature_dim=spec.feature_dim, categorical=categorical, continuous=continuous,
              latent_dim=int(latent_dim), hidden=tuple(int(h) for h in hidden),
              hierarchical=bool(hierarchical), z2_dim=int(z2_dim),
              num_groups=spec.num_groups, num_classes=spec.num_classes,
              dtype=jnp.dtype(dtype))

