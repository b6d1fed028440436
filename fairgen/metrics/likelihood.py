"""VAE likelihood evaluation: the one-sample ELBO and the importance-weighted bound.

``elbo`` is the one-sample evidence lower bound with the *analytic* KL,
``log p(x | z) - KL(q(z | x) || p(z))`` with ``z ~ q(z | x)``: the same quantity that the
VAE objective trains at beta = 1 (``fairgen.objectives.vae.per_example_loss``), with less
variance than the fully Monte Carlo form ``log p(x | z) + log p(z) - log q(z | x)``. Both
have the same expectation.

``iwae_log_likelihood`` is the importance-weighted bound of Burda et al. 2016,
``log (1/K) sum_k p(x, z_k) / q(z_k | x)`` with ``z_k ~ q(z | x)``. Its expectation is a
lower bound on ``log p(x)`` that increases with K towards ``log p(x)``; at K = 1 it is the
Monte Carlo ELBO. The K samples are streamed in chunks with a running logsumexp, so K in the
thousands never builds a ``[K, B, ...]`` tensor.

What the numbers mean depends on the model's likelihood:

* ``bernoulli``: the model is a distribution over the *binarized* image (pixel > 0, i.e.
  intensity > 0.5), so the NLL is a proper discrete negative log-probability in nats and
  bits/dim are comparable to other binarized-data results (e.g. binarized MNIST).
* ``gaussian``: the model is a continuous density over pixel values in [-1, 1], so the NLL is
  a negative log-*density* (it can be negative) and its bits/dim are *not* comparable to
  discrete bits/dim on 8-bit data. (With uniform dequantization, a continuous density on
  [-1, 1] gives a discrete bound by adding ``log2(128)`` = 7 bits/dim for bin width 2/256;
  this module does not do that: the model is not trained on dequantized data.)

Per-example randomness comes from ``fold_in(key(seed), example_index)`` in
``evaluate_likelihood``, so its results do not depend on the batch size.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fairgen.data import base as data_base
from fairgen.models.vae import VAE, gaussian_kl

# Samples per streamed chunk of the IWAE bound: chunk * batch decoder outputs live at once.
DEFAULT_CHUNK = 64


def _posterior_sample(mean: jax.Array, logvar: jax.Array, eps: jax.Array) -> jax.Array:
  """z = mean + sigma * eps, broadcasting ``eps`` [..., B, L] over leading axes."""
  return mean + jnp.exp(0.5 * logvar) * eps


def _example_keys(rng: jax.Array, batch: int) -> jax.Array:
  """One key per example, from a single key."""
  return jax.random.split(rng, batch)


def _elbo_terms_from_keys(model: VAE, params: Any, x: jax.Array, keys: jax.Array,
                          labels: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """``(log p(x | z), KL(q(z | x) || p(z)))`` per example, one ``z`` per example's key
  (``labels``: a conditional VAE's, conditioning both)."""
  variables = {"params": params}
  mean, logvar = model.apply(variables, x, labels, method=VAE.encode)
  eps = jax.vmap(lambda k: jax.random.normal(k, (model.latent_dim,)))(keys)
  z = _posterior_sample(mean, logvar, eps)
  dec = model.apply(variables, z, labels, method=VAE.decode)
  log_lik = model.apply(variables, x, dec, method=VAE.log_likelihood)
  return log_lik, gaussian_kl(mean, logvar)


def _elbo_from_keys(model: VAE, params: Any, x: jax.Array, keys: jax.Array,
                    labels: jax.Array | None = None) -> jax.Array:
  """One-sample ELBO (analytic KL) per example, with one key per example."""
  log_lik, kl = _elbo_terms_from_keys(model, params, x, keys, labels)
  return log_lik - kl


def _iwae_from_keys(model: VAE, params: Any, x: jax.Array, keys: jax.Array,
                    num_samples: int, chunk: int, labels: jax.Array | None = None
                    ) -> jax.Array:
  """The IWAE bound per example, with one key per example (see iwae_log_likelihood)."""
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}.")
  chunk = min(chunk, num_samples)
  variables = {"params": params}
  mean, logvar = model.apply(variables, x, labels, method=VAE.encode)
  latent_dim = mean.shape[-1]

  def log_weights(chunk_index: jax.Array, size: int) -> jax.Array:
    """log p(x, z) - log q(z | x) for ``size`` samples per example: [size, B]."""
    # Chunk c of example i draws from fold_in(key_i, c): independent of the batch.
    eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, chunk_index),
                                               (size, latent_dim)),
                   out_axes=1)(keys)  # [size, B, L]
    z = _posterior_sample(mean, logvar, eps)

    def log_lik(z_k):
      dec = model.apply(variables, z_k, labels, method=VAE.decode)
      return model.apply(variables, x, dec, method=VAE.log_likelihood)

    # log p(z) - log q(z | x) with z = mean + sigma * eps; the log(2 pi) terms cancel.
    log_prior_ratio = jnp.sum(-0.5 * z**2 + 0.5 * eps**2 + 0.5 * logvar, axis=-1)
    return jax.vmap(log_lik)(z) + log_prior_ratio

  def body(acc, chunk_index):
    lse = jax.nn.logsumexp(log_weights(chunk_index, chunk), axis=0)
    return jnp.logaddexp(acc, lse), None

  num_full, remainder = divmod(num_samples, chunk)
  acc = jnp.full(mean.shape[:1], -jnp.inf, jnp.float32)
  acc, _ = jax.lax.scan(body, acc, jnp.arange(num_full))
  if remainder:
    lse = jax.nn.logsumexp(log_weights(jnp.asarray(num_full), remainder), axis=0)
    acc = jnp.logaddexp(acc, lse)
  return acc - math.log(num_samples)


def elbo(model: VAE, params: Any, x: jax.Array, rng: jax.Array,
         labels: jax.Array | None = None) -> jax.Array:
  """The one-sample ELBO per example, in nats.

  Uses the analytic KL: ``log p(x | z) - KL(q(z | x) || p(z))`` with one ``z ~ q(z | x)``,
  i.e. minus the VAE training loss at beta = 1. Jit-friendly (close over ``model``).

  Args:
    model: the VAE.
    params: its parameters (the ``'params'`` collection).
    x: images [B, H, W, C] in [-1, 1].
    rng: a PRNG key.
    labels: [B] labels of a conditional VAE (None otherwise).

  Returns:
    The ELBO per example, shape [B].
  """
  return _elbo_from_keys(model, params, x, _example_keys(rng, x.shape[0]), labels)


def iwae_log_likelihood(model: VAE, params: Any, x: jax.Array, rng: jax.Array,
                        num_samples: int, chunk: int = DEFAULT_CHUNK,
                        labels: jax.Array | None = None) -> jax.Array:
  """The importance-weighted lower bound on log p(x) per example (Burda et al. 2016).

  ``log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x)`` with ``z_k ~ q(z | x)``, K =
  ``num_samples``, computed with logsumexp. The samples are drawn and decoded ``chunk`` at
  a time (a ``lax.scan`` plus one remainder chunk) and folded into a running logsumexp, so
  memory grows with ``chunk``, not K. The sampled values depend on ``chunk``, not the bound's
  expectation. Jit-friendly with ``num_samples`` and ``chunk`` static (close over them).

  Args:
    model: the VAE.
    params: its parameters (the ``'params'`` collection).
    x: images [B, H, W, C] in [-1, 1].
    rng: a PRNG key.
    num_samples: K, the number of importance samples per example (>= 1).
    chunk: samples per example decoded at once (clipped to K).
    labels: [B] labels of a conditional VAE (None otherwise).

  Returns:
    The IWAE bound per example in nats, shape [B]: of ``log p(x | y)`` for a conditional VAE.
  """
  return _iwae_from_keys(model, params, x, _example_keys(rng, x.shape[0]), num_samples,
                         chunk, labels)


def evaluate_likelihood(model: VAE, params: Any, source: data_base.Source, *,
                        num_samples: int, batch_size: int, seed: int,
                        max_examples: int | None = None,
                        chunk: int = DEFAULT_CHUNK) -> dict[str, Any]:
  """The negative ELBO and IWAE NLL of a VAE, averaged over a data source (a conditional
  VAE's of ``p(x | y)``, ``y`` read from the source's ``model.condition_key`` column).

  The per-batch computation is jitted once: the last batch is padded to ``batch_size`` (by
  repeating the last example) and its padding is masked out of the averages, which are
  accumulated in float64 on the host. Example ``i`` uses the key
  ``fold_in(key(seed), i)``, so the result does not depend on ``batch_size``.

  Args:
    model: the VAE.
    params: its parameters (the ``'params'`` collection).
    source: a random-access data source (``len`` and ``get(indices)['image']``).
    num_samples: K for the IWAE bound.
    batch_size: examples per jitted batch.
    seed: the evaluation seed.
    max_examples: evaluate only the first ``max_examples`` examples (all if None).
    chunk: IWAE samples per example decoded at once.

  Returns:
    A dict with ``neg_elbo`` (nats per example, one sample, analytic KL) and its two terms,
    ``distortion`` (``-log p(x | z)``) and ``rate`` (``KL(q(z | x) || p(z))``), ``nll_iwae``
    (nats per example, the IWAE bound with K = ``iwae_k``), ``bits_per_dim``
    (``nll_iwae / (D ln 2)`` with D = H * W * C), ``iwae_k`` and ``num_examples``.
    See the module docstring for what the NLL means for each likelihood.
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")

  def terms(params, batch, keys):
    labels = batch[model.condition_key].reshape(-1) if model.num_classes else None
    elbo_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    iwae_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    log_lik, kl = _elbo_terms_from_keys(model, params, batch["image"], elbo_keys, labels)
    return {"distortion": -log_lik, "rate": kl,
            "nll": -_iwae_from_keys(model, params, batch["image"], iwae_keys, num_samples,
                                    chunk, labels)}

  columns = ("image", model.condition_key) if model.num_classes else ("image",)
  out = evaluate_nll(terms, params, source, columns=columns, batch_size=batch_size, seed=seed,
                     max_examples=max_examples)
  return {"neg_elbo": out["distortion"] + out["rate"], "distortion": out["distortion"],
          "rate": out["rate"], "nll_iwae": out["nll"], "bits_per_dim": out["bits_per_dim"],
          "iwae_k": int(num_samples), "num_examples": out["num_examples"]}


def evaluate_nll(nll_fn: Any, state: Any, source: data_base.Source, *,
                 columns: tuple[str, ...], batch_size: int, seed: int,
                 max_examples: int | None = None) -> dict[str, Any]:
  """The average of a model's per-example likelihood terms over a data source.

  ``nll_fn(state, batch, keys) -> terms`` (jit-friendly) maps the model's ``state``, a
  batch of ``columns`` read from the source and one PRNG key per example
  (``fold_in(key(seed), i)`` for example ``i``, so the result does not depend on
  ``batch_size``) to per-example terms, among them ``nll`` in nats. Batches are padded to
  ``batch_size`` (one compiled shape) and the padding is masked out of float64 host sums.

  Returns:
    Each term's mean over the examples, ``bits_per_dim`` (``nll / (D ln 2)`` with D the
    image's size) and ``num_examples``.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if max_examples is not None and max_examples < 1:
    raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}.")
  n = len(source) if max_examples is None else min(len(source), max_examples)
  if n == 0:
    raise ValueError("The data source is empty.")
  root = jax.random.key(seed)
  fn = jax.jit(lambda state, batch, indices: nll_fn(
      state, batch, jax.vmap(lambda i: jax.random.fold_in(root, i))(indices)))
  sums: dict[str, float] = {}
  num_dims = None
  for start in range(0, n, batch_size):
    indices = np.arange(start, start + batch_size)
    valid = indices < n
    indices = np.minimum(indices, n - 1)
    rows = source.get(indices)
    batch = {k: np.asarray(rows[k], np.float32 if k == "image" else np.int32)
             for k in columns}
    num_dims = int(np.prod(batch["image"].shape[1:]))
    for key, value in jax.device_get(fn(state, batch, indices.astype(np.int32))).items():
      sums[key] = sums.get(key, 0.0) + float(np.sum(np.asarray(value, np.float64)[valid]))
  out = {key: total / n for key, total in sums.items()}
  out["bits_per_dim"] = out["nll"] / (num_dims * math.log(2.0))
  out["num_examples"] = int(n)
  return out
