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
  one_example = jax.tree.map(lambda x: x[0], examples)
  calls = _dense_calls(loss_fn, params, one_example, keys[0])
  # A module called both ways (e.g. on inputs of two widths) keeps exact gradients.
  ghost_paths = ({p for p, ok, _ in calls if ok} - {p for p, ok, _ in calls if not ok})
  calls = [(p if p in ghost_paths else None, s) for p, _, s in calls]
  flat = traverse_util.flatten_dict(params)
  is_ghost = lambda k: k[:-1] in ghost_paths and k[-1] in ("kernel", "bias")
  rest = {k: v for k, v in flat.items() if not is_ghost(k)}
  fixed = {k: v for k, v in flat.items() if is_ghost(k)}
  batch = coeff.shape[0]
  zeros = [None if p is None else jnp.zeros((batch,) + s, jnp.float32) for p, s in calls]

  def one(rest_params, perturbs, example, key):
    inputs, position = [], [0]

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

  grad_fn = jax.grad(one, argnums=(0, 1), has_aux=True)
  (g_rest, g_out), (aux, inputs) = jax.vmap(grad_fn, in_axes=(None, 0, 0, 0))(
      rest, zeros, examples, keys)
  deltas = [d for d in g_out if d is not None]
  paths = [p for p, _ in calls if p is not None]

  # Rows per example: [B, T, width], a path's calls concatenated along T.
  rows = lambda x: x.reshape(batch, -1, x.shape[-1]).astype(jnp.float32)
  parts = {}
  for path, a, d in zip(paths, inputs, deltas):
    acts, grads = parts.setdefault(path, ([], []))
    acts.append(rows(a))
    grads.append(rows(d))
  layers = {path: (jnp.concatenate(acts, axis=1), jnp.concatenate(grads, axis=1))
            for path, (acts, grads) in parts.items()}
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
  norms = jnp.sqrt(squares)
  c = coeff * clip_factors(norms)

  total = {k: jnp.tensordot(c, g.astype(jnp.float32), axes=1) for k, g in g_rest.items()}
  for path, (a, d) in layers.items():
    total[path + ("kernel",)] = jnp.einsum("b,bti,bto->io", c, a, d)
    if path + ("bias",) in fixed:
      total[path + ("bias",)] = jnp.einsum("b,bto->o", c, d)
  return traverse_util.unflatten_dict(total), aux, norms
