"""Ghost clipping: DP-SGD's clipped sum without per-example gradients of Dense layers.

For a Dense layer ``y = a W + b`` applied to one example's rows ``a_t`` (``t`` over any
leading axes, one row for a flat input), the example's gradients are ``dW = sum_t a_t d_t^T``
and ``db = sum_t d_t``, with ``d_t = dl/dy_t``. Their squared norms need only the rows:
``|dW|^2 = sum_{t,s} (a_t . a_s)(d_t . d_s)`` (``|a|^2 |d|^2`` for one row; Goodfellow 2015,
Li et al. 2022 "Large Language Models Can Be Strong Differentially Private Learners"), and
the clipped, weighted sum over examples is one contraction, ``sum_i c_i sum_t a_it d_it^T``.
So the ``[B, in, out]`` per-example kernel gradients of ``vmap(grad)`` never exist: memory
and time fall from O(B * params) to O(B * activations).

``d_t`` comes from a zero added to every Dense output (``nn.intercept_methods``), whose
per-example gradient is exactly ``d_t``; the inputs ``a_t`` are recorded on the way. Every
other parameter (convolutions, norms, a Dense subclass, a Dense whose kernel is not where
its path says) keeps ``vmap(grad)``: the result is the same clipped sum as
``dpsgd._clipped_sum``, to float rounding, for any network.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util


def _is_dense(context: Any) -> bool:
  return type(context.module) is nn.Dense and context.method_name == "__call__"


def _dense_calls(loss_fn: Callable, params: Any, example: Any, key: jax.Array
                 ) -> list[tuple[tuple[str, ...], bool, tuple[int, ...]]]:
  """For each Dense call of one example's loss, in call order: ``(module path, eligible,
  output shape)``, not eligible when the call's kernel (and bias) are not the parameters at
  its path (it then keeps exact per-example gradients)."""
  flat = traverse_util.flatten_dict(params)
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if _is_dense(context):
      path = tuple(context.module.path)
      kernel = flat.get(path + ("kernel",))
      ok = (kernel is not None and kernel.shape == (args[0].shape[-1], out.shape[-1])
            and (not context.module.use_bias or path + ("bias",) in flat))
      calls.append((path, ok, tuple(out.shape)))
    return out

  # A fresh function: eval_shape caches traces by function, and a cached trace would run
  # no interceptor.
  with nn.intercept_methods(record):
    jax.eval_shape(lambda *a: loss_fn(*a), params, example, key)
  return calls


def clipped_sum(loss_fn: Callable, params: Any, examples: Any, keys: jax.Array,
                coeff: jax.Array, clip_factors: Callable[[jax.Array], jax.Array]
                ) -> tuple[Any, Any, jax.Array]:
  """``sum_i coeff_i clip_factors(|grad l_i|) grad l_i`` with ghost norms for Dense layers.

  Args and returns as ``dpsgd._clipped_sum`` (one chunk; ``clip_factors`` maps the norms
  to their clipping multipliers, ``dpsgd.clip_factors``): the clipped sum (a tree like
  ``params``, float32), the stacked aux outputs and the per-example gradient norms.
  """
  calls, rest, fixed = _ghost_layout(loss_fn, params, examples, keys)
  batch = coeff.shape[0]
  g_rest, aux, (paths, inputs, deltas) = _example_grads(
      loss_fn, calls, rest, fixed, examples, keys, batch)
  layers = _layer_rows(paths, inputs, deltas, batch)
  norms = jnp.sqrt(_squared_norms(g_rest, layers, fixed, batch))
  c = coeff * clip_factors(norms)
  return traverse_util.unflatten_dict(_weighted_sum(c, g_rest, layers, fixed)), aux, norms


def _ghost_layout(loss_fn: Callable, params: Any, examples: Any, keys: jax.Array
                  ) -> tuple[list[tuple[tuple[str, ...] | None, tuple[int, ...]]],
                             dict[tuple[str, ...], Any], dict[tuple[str, ...], Any]]:
  """Which Dense layers are clipped by ghost norms.

  Args:
    loss_fn, params, examples, keys: as ``clipped_sum``.

  Returns:
    ``calls``: per Dense call, in call order, ``(module path or None, output shape)``, the
    path None where the call keeps exact per-example gradients; ``rest``: the flat
    parameters that keep ``vmap(grad)``; ``fixed``: the flat ghost kernels and biases.
  """
  one_example = jax.tree.map(lambda x: x[0], examples)
  calls = _dense_calls(loss_fn, params, one_example, keys[0])
  # A module called both ways (e.g. on inputs of two widths) keeps exact gradients.
  ghost_paths = ({p for p, ok, _ in calls if ok} - {p for p, ok, _ in calls if not ok})
  calls = [(p if p in ghost_paths else None, s) for p, _, s in calls]
  flat = traverse_util.flatten_dict(params)
  ghost_keys = {k for k in flat if k[:-1] in ghost_paths and k[-1] in ("kernel", "bias")}
  rest = {k: v for k, v in flat.items() if k not in ghost_keys}
  fixed = {k: v for k, v in flat.items() if k in ghost_keys}
  return calls, rest, fixed


def _perturbed_loss(loss_fn: Callable, fixed: dict[tuple[str, ...], Any],
                    rest_params: dict[tuple[str, ...], Any], perturbs: list[Any],
                    example: Any, key: jax.Array) -> tuple[jax.Array, tuple[Any, list[Any]]]:
  """One example's loss with ``perturbs[j]`` added to the output of its ``j``-th Dense call.

  A zero perturbation's gradient is the call's output gradient ``d_t``. Returns the loss
  and, as aux, ``(loss aux, inputs of the perturbed calls in call order)``; calls whose
  perturbation is None run unchanged.
  """
  inputs, position = [], [0]

  # An interceptor sees one call at a time, so it keeps its place in the closure.
  def perturb(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if _is_dense(context):
      p = perturbs[position[0]]
      position[0] += 1
      if p is not None:
        inputs.append(args[0])
        return out + p.astype(out.dtype)
    return out

  full = traverse_util.unflatten_dict({**fixed, **rest_params})
  with nn.intercept_methods(perturb):
    loss, aux = loss_fn(full, example, key)
  return loss, (aux, inputs)


def _example_grads(loss_fn: Callable, calls: list, rest: dict, fixed: dict, examples: Any,
                   keys: jax.Array, batch: int) -> tuple[dict, Any, tuple[list, list, list]]:
  """Per-example gradients by ``vmap(grad)`` of ``_perturbed_loss``.

  Returns the gradients of ``rest`` (``[B, ...]`` leaves), the stacked aux outputs, and
  for the ghost calls, in call order, their paths, inputs and output gradients.
  """
  zeros = [None if p is None else jnp.zeros((batch,) + s, jnp.float32) for p, s in calls]
  grad_fn = jax.grad(functools.partial(_perturbed_loss, loss_fn, fixed), argnums=(0, 1),
                     has_aux=True)
  (g_rest, g_out), (aux, inputs) = jax.vmap(grad_fn, in_axes=(None, 0, 0, 0))(
      rest, zeros, examples, keys)
  deltas = [d for d in g_out if d is not None]
  paths = [p for p, _ in calls if p is not None]
  return g_rest, aux, (paths, inputs, deltas)


def _rows(x: jax.Array, batch: int) -> jax.Array:
  """``x`` as float32 rows per example: ``[B, T, width]``."""
  return x.reshape(batch, -1, x.shape[-1]).astype(jnp.float32)


def _layer_rows(paths: list, inputs: list, deltas: list, batch: int
                ) -> dict[tuple[str, ...], tuple[jax.Array, jax.Array]]:
  """Per ghost layer, its input rows ``a`` and output gradients ``d``, each ``[B, T, width]``,
  a path's calls concatenated along ``T`` in call order."""
  parts = {}
  for path, a, d in zip(paths, inputs, deltas):
    acts, grads = parts.setdefault(path, ([], []))
    acts.append(_rows(a, batch))
    grads.append(_rows(d, batch))
  return {path: (jnp.concatenate(acts, axis=1), jnp.concatenate(grads, axis=1))
          for path, (acts, grads) in parts.items()}


def _squared_norms(g_rest: dict, layers: dict, fixed: dict, batch: int) -> jax.Array:
  """Per-example squared gradient norms ``[B]``: the exact gradients' squares, then each
  ghost layer's ``|dW|^2`` from its rows (and ``|db|^2`` where it has a bias)."""
  squares = jnp.zeros((batch,), jnp.float32)
  for leaf in jax.tree.leaves(g_rest):
    squares = squares + jnp.sum(leaf.reshape(batch, -1).astype(jnp.float32) ** 2, axis=1)
  for path, (a, d) in layers.items():
    if a.shape[1] == 1:
      squares = squares + jnp.sum(a[:, 0] ** 2, -1) * jnp.sum(d[:, 0] ** 2, -1)
    else:
      squares = squares + jnp.sum(jnp.einsum("bti,bsi->bts", a, a) *
                                  jnp.einsum("bto,bso->bts", d, d), axis=(1, 2))
    if path + ("bias",) in fixed:
      squares = squares + jnp.sum(jnp.sum(d, axis=1) ** 2, axis=-1)
  return squares


def _weighted_sum(c: jax.Array, g_rest: dict, layers: dict, fixed: dict
                  ) -> dict[tuple[str, ...], jax.Array]:
  """``sum_i c_i grad l_i`` as a flat float32 dict: a contraction over examples for the
  exact gradients, ``sum_i c_i sum_t a_it d_it^T`` for the ghost layers."""
  total = {k: jnp.tensordot(c, g.astype(jnp.float32), axes=1) for k, g in g_rest.items()}
  for path, (a, d) in layers.items():
    total[path + ("kernel",)] = jnp.einsum("b,bti,bto->io", c, a, d)
    if path + ("bias",) in fixed:
      total[path + ("bias",)] = jnp.einsum("b,bto->o", c, d)
  return total
