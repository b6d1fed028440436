"""Spectral normalisation (Miyato et al. 2018) as a transform of any network's parameters.

Every weight matrix of a network (each ``kernel`` of a dense or convolution layer and each
``embedding`` table; any leaf of rank >= 2) is divided by an estimate of its largest
singular value before the network is applied, so no network needs layers of its own: the
GAN objective normalises the DCGAN and the ResNets the same way.

A leaf of shape ``[..., out]`` is read as the matrix ``M = leaf.reshape(-1, out).T`` of
shape ``[out, fan_in]`` (PyTorch's ``weight.reshape(out, -1)`` layout; the singular values
do not depend on it). Its power-iteration state is a pair of unit vectors ``u`` [out] and
``v`` [fan_in], kept in the training state beside the parameters (so it is sharded by the
same rule and checkpointed with them), in a flat dict keyed by the leaf's '/'-joined path.

- ``init_state``: random unit vectors and one iteration, as ``torch.nn.utils.spectral_norm``,
  BigGAN-PyTorch and StudioGAN do before their first use; the estimate converges over the
  first updates. (Newer PyTorch runs 15 iterations at registration; here a loop of them
  inside the jitted init doubled a BigGAN's compile time on CPU, 24 s to 47 s, and
  unrolled they took 85 s.)
- ``power_iteration``: ``v <- M^T u / |M^T u|``, ``u <- M v / |M v|``; one per optimizer
  update of the network (Miyato et al.'s Algorithm 1), outside the gradient.
- ``normalize``: ``leaf / sigma`` with ``sigma = u^T M v``; ``u`` and ``v`` are constants of
  the gradient, which flows through ``M`` into the raw parameters (as in the paper and in
  PyTorch).
"""

from __future__ import annotations

from typing import Any

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp

_EPS = 1e-12  # torch.nn.functional.normalize's default.

State = dict[str, dict[str, jax.Array]]


def _paths(params: Any) -> dict[str, jax.Array]:
  """The leaves that get normalised, keyed by their '/'-joined path."""
  flat = traverse_util.flatten_dict(params)
  return {"/".join(k): v for k, v in flat.items()
          if k[-1] in ("kernel", "embedding") and v.ndim >= 2}


def _matrix(leaf: jax.Array) -> jax.Array:
  return leaf.reshape(-1, leaf.shape[-1]).T.astype(jnp.float32)


def _unit(x: jax.Array, fallback: jax.Array) -> jax.Array:
  """``x / |x|``, or ``fallback`` where ``x`` is (numerically) zero: a zero matrix (e.g. a
  zero-initialised layer) keeps its previous vectors instead of collapsing them to zero
  for good."""
  norm = jnp.linalg.norm(x)
  return jnp.where(norm > _EPS, x / jnp.maximum(norm, _EPS), fallback)


def _iterate(m: jax.Array, u: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  v = _unit(m.T @ u, v)
  return _unit(m @ v, u), v


def init_state(params: Any, rng: jax.Array) -> State:
  """Start vectors ``u``, ``v`` for every matrix in ``params``: random, then one iteration."""
  matrices = {path: _matrix(leaf) for path, leaf in sorted(_paths(params).items())}
  # One draw for every vector: a random op per vector makes a BigGAN's init compile longer.
  draws = jax.random.normal(rng, (sum(n for m in matrices.values() for n in m.shape),))
  state, offset = {}, 0
  for path, m in matrices.items():
    u = draws[offset:offset + m.shape[0]]
    v = draws[offset + m.shape[0]:offset + m.shape[0] + m.shape[1]]
    offset += m.shape[0] + m.shape[1]
    # One iteration, so that every stored pair is a post-iteration one, whose estimate
    # u^T M v = |M v| is positive (two random vectors could give ~0 or a negative sigma).
    u, v = _iterate(m, u / jnp.linalg.norm(u), v / jnp.linalg.norm(v))
    state[path] = {"u": u, "v": v}
  return state


def power_iteration(params: Any, state: State) -> State:
  """One power iteration per matrix, outside the gradient (call once per update)."""
  leaves = _paths(params)
  new = {}
  for path, uv in state.items():
    u, v = _iterate(jax.lax.stop_gradient(_matrix(leaves[path])), uv["u"], uv["v"])
    new[path] = {"u": u, "v": v}
  return new


def sigmas(params: Any, state: State) -> dict[str, jax.Array]:
  """The estimate ``u^T M v`` of each matrix's largest singular value."""
  leaves = _paths(params)
  return {path: jax.lax.stop_gradient(uv["u"]) @ _matrix(leaves[path])
          @ jax.lax.stop_gradient(uv["v"]) for path, uv in state.items()}


def normalize(params: Any, state: State) -> Any:
  """``params`` with each matrix divided by its ``sigma`` (gradients flow through M)."""
  scale = sigmas(params, state)
  flat = traverse_util.flatten_dict(params)
  # A zero matrix (sigma 0) stays zero rather than becoming NaN.
  out = {k: (v / jnp.maximum(scale["/".join(k)], _EPS).astype(v.dtype)
             if "/".join(k) in scale else v) for k, v in flat.items()}
  return traverse_util.unflatten_dict(out)
