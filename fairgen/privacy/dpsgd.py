"""DP-SGD's gradient: per-example gradients, clipped, summed, noised, divided (pure JAX).

``private_gradient`` is the one place where a private network's gradient is formed:

    g = W * (sum_i  m_i * (s_i / W) * clip(grad l_i, C)  +  N(0, (sigma * C)^2 I)) / E

with ``m_i`` the Poisson batch's mask (padding rows are 0), ``s_i`` in [0, W] an optional
per-example weight (importance weights, bounded by ``W``), ``clip(g, C) = g * min(1, C /
|g|)`` and ``E`` the *expected* batch size ``q * N``. Dividing the weights by ``W`` keeps
each example's contribution within C; multiplying the noisy sum back by ``W`` is
post-processing that gives the weighted terms their non-private scale (weights whose mean
is about 1, as importance weights' is, then weigh as in the weighted mean), at the price of
``W`` times the noise. The noise is calibrated to the sum,
whose sensitivity to adding or removing one example is C, and only then divided: dividing
the clipped gradients by the batch size first and adding ``N(0, (sigma * C)^2)`` to that
mean (a bug of published code) leaves the noise B times too small for the stated epsilon.
Dividing by the actual number of sampled examples instead of ``E`` would release that
number without noise.

Per-example gradients are ``vmap(grad)`` over single examples, ``microbatch_size`` at a
time (a Python loop over chunks: XLA:CPU runs convolutions in a while loop's body slowly,
see ``objectives/adversarial.py``), so memory holds one chunk's gradients at once. On a
mesh with several data devices, each device clips and sums its own rows (``shard_map``).

A network with batch statistics mixes examples, so no per-example gradient exists for it:
``check_no_batch_stats`` refuses it.

White-box audit canaries (``fairgen.audit``): with ``num_canaries = m`` > 0, the gradient
vector gains ``m`` coordinates that no example's loss touches, and a row whose ``canary``
entry is ``j >= 0`` contributes ``C e_j`` there (times its mask and weight) instead of its own
clipped gradient: a Dirac gradient of the largest norm the mechanism admits, where no data
gradient hides it (Steinke, Nasr & Jagielski 2023's white-box canaries). Those coordinates
get the same noise and divisor as the rest, and come back as ``stats['canary_block']``
``[m]``.

``DpGradient`` is how every private objective calls this module: the composition root
(``fairgen.experiment``) hands the objective one, bound to the run's ``DpSettings``, and the
objective calls it with its per-example loss, the batch's mask, weights and canaries: the
same call for every network (``dp_gradient``). The objectives never import this package.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fairgen import parallel
from fairgen.config import ConfigError
from fairgen.privacy.settings import DpSettings
from fairgen.privacy import ghost as ghost_lib

# (params, one example (a pytree of arrays without the batch axis), key) -> (loss, aux).
ExampleLoss = Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]


def check_no_batch_stats(variables: Mapping[str, Any], what: str) -> None:
  """Raises ConfigError if ``variables`` (a Flax variable dict) hold batch statistics."""
  if "batch_stats" in variables:
    raise ConfigError(f"privacy: the {what} uses batch norm, which mixes the examples of a "
                      f"batch, so DP-SGD has no per-example gradient for it. Use a model "
                      f"without batch norm (group or layer norm) for the private network.")


def per_example_norms(grads: Any) -> jax.Array:
  """The L2 norm of each example's gradient: ``grads`` leaves are ``[B, ...]``."""
  leaves = jax.tree.leaves(grads)
  squares = [jnp.sum(jnp.reshape(g, (g.shape[0], -1)).astype(jnp.float32) ** 2, axis=1)
             for g in leaves]
  return jnp.sqrt(sum(squares))


def clip_factors(norms: jax.Array, clip_norm: float) -> jax.Array:
  """``min(1, C / |g_i|)``: what each per-example gradient is multiplied by."""
  return jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))


def per_example_grads(loss_fn: ExampleLoss, params: Any, examples: Any,
                      keys: jax.Array) -> tuple[Any, Any]:
  """``(grads, aux)`` of ``loss_fn`` for each example: leaves gain a leading batch axis."""
  return jax.vmap(jax.grad(loss_fn, has_aux=True), in_axes=(None, 0, 0))(params, examples, keys)


def noise_like(tree: Any, key: jax.Array, std: float) -> Any:
  """Independent ``N(0, std^2)`` for every entry of ``tree`` (one key per leaf)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape, jnp.float32)
                                      for k, x in zip(keys, leaves)])


def _clipped_sum(loss_fn: ExampleLoss, params: Any, examples: Any, keys: jax.Array,
                 coeff: jax.Array, clip_norm: float, chunk: int, ghost: bool = False
                 ) -> tuple[Any, Any, jax.Array]:
  """``sum_i coeff_i clip(grad l_i)`` over the rows given, ``chunk`` at a time (0: all);
  with the stacked aux outputs and the per-example gradient norms. ``ghost``: Dense layers
  by ghost clipping (``fairgen.privacy.ghost``)."""
  batch = coeff.shape[0]
  chunk = chunk if chunk and batch % chunk == 0 else batch
  total = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  auxes, norms = [], []
  for start in range(0, batch, chunk):
    part = slice(start, start + chunk)
    rows = jax.tree.map(lambda x: x[part], examples)
    if ghost:
      summed, aux, n = ghost_lib.clipped_sum(loss_fn, params, rows, keys[part], coeff[part],
                                             functools.partial(clip_factors, clip_norm=clip_norm))
      total = jax.tree.map(jnp.add, total, summed)
      auxes.append(aux)
      norms.append(n)
      continue
    grads, aux = per_example_grads(loss_fn, params, rows, keys[part])
    n = per_example_norms(grads)
    c = coeff[part] * clip_factors(n, clip_norm)
    total = jax.tree.map(
        lambda t, g: t + jnp.tensordot(c, g.astype(jnp.float32), axes=1), total, grads)
    auxes.append(aux)
    norms.append(n)
  return total, jax.tree.map(lambda *xs: jnp.concatenate(xs), *auxes), jnp.concatenate(norms)


def private_gradient(loss_fn: ExampleLoss, params: Any, examples: Any, key: jax.Array, *,
                     clip_norm: float, noise_multiplier: float, expected_batch_size: float,
                     mask: jax.Array, scale: jax.Array | None = None,
                     scale_bound: float = 1.0, microbatch_size: int = 0, mesh: Mesh | None = None,
                     ghost: bool = False, canary: jax.Array | None = None,
                     num_canaries: int = 0) -> tuple[Any, Any, dict[str, jax.Array]]:
  """The noisy mean of clipped per-example gradients (see the module docstring).

  Args:
    loss_fn: one example's loss and aux outputs, ``(params, example, key) -> (loss, aux)``.
    params: the private network's parameters.
    examples: a pytree of ``[B, ...]`` arrays (the padded Poisson batch).
    key: the update's key; example ``i`` gets ``split(fold_in(key, 0), B)[i]``, the noise
      ``fold_in(key, 1)``.
    clip_norm: C.
    noise_multiplier: sigma (0: no noise).
    expected_batch_size: E = q * N, the divisor.
    mask: ``[B]``, 1 for sampled examples and 0 for padding rows.
    scale: optional ``[B]`` weights in [0, ``scale_bound``] of the clipped gradients.
    scale_bound: W, the weights' bound (see the module docstring).
    microbatch_size: examples per vmapped call on each device (0: all of its rows).
    mesh: the run's mesh. With more than one device on its data axis, every device computes
      its own rows' clipped sum inside ``shard_map``, and the sums are added (``psum``):
      left to XLA's partitioner, vmapped convolution-kernel gradients come out wrong on
      every device but the first (jax 0.10, measured).
    ghost: clip Dense layers by ghost clipping (``fairgen.privacy.ghost``): the same sum
      without their per-example gradients.
    canary: optional ``[B]`` int32: the white-box audit canary a row is (its coordinate in
      ``[0, num_canaries)``), -1 for the other rows (see the module docstring).
    num_canaries: m, the audit's white-box canaries (0: none, ``canary`` unused).

  Returns:
    ``(gradient, aux, stats)``: the private gradient (a tree like ``params``), the stacked
    per-example aux outputs, and ``clipped_fraction`` and ``example_grad_norm`` (means over
    the sampled examples).
  """
  batch = mask.shape[0]
  keys = jax.random.split(jax.random.fold_in(key, 0), batch)
  coeff = mask.astype(jnp.float32)
  if scale is not None:
    coeff = coeff * scale.astype(jnp.float32) / scale_bound
  canary_coeff = None
  if num_canaries:  # A canary row's own loss gradient does not count.
    canary_coeff, coeff = coeff * (canary >= 0), coeff * (canary < 0)
  if mesh is not None and mesh.shape[parallel.DATA_AXIS] > 1:
    def local(params, examples, keys, coeff):
      total, aux, norms = _clipped_sum(loss_fn, params, examples, keys, coeff, clip_norm,
                                       microbatch_size, ghost)
      return jax.lax.psum(total, parallel.DATA_AXIS), aux, norms

    rows = P(parallel.DATA_AXIS)
    # check_vma=False: with it, shard_map would sum the gradients of the replicated params
    # over devices itself, inside each example's gradient.
    total, aux, norms = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), rows, rows, rows), out_specs=(P(), rows, rows),
        check_vma=False)(params, examples, keys, coeff)
  else:
    total, aux, norms = _clipped_sum(loss_fn, params, examples, keys, coeff, clip_norm,
                                     microbatch_size, ghost)
  if num_canaries:
    total = {"params": total, "canaries": jnp.zeros((num_canaries,), jnp.float32).at[
        jnp.maximum(canary, 0)].add(jnp.where(canary >= 0, canary_coeff * clip_norm, 0.0))}
  if noise_multiplier > 0:
    noise = noise_like(total, jax.random.fold_in(key, 1), noise_multiplier * clip_norm)
    total = jax.tree.map(jnp.add, total, noise)
  factor = scale_bound / expected_batch_size if scale is not None else 1 / expected_batch_size
  stats = {}
  if num_canaries:
    total, stats["canary_block"] = total["params"], total["canaries"] * factor
  gradient = jax.tree.map(lambda t, p: (t * factor).astype(p.dtype), total, params)
  sampled = jnp.maximum(jnp.sum(mask), 1.0)
  stats.update(clipped_fraction=jnp.sum(mask * (norms > clip_norm)) / sampled,
               example_grad_norm=jnp.sum(mask * norms) / sampled)
  return gradient, aux, stats


def dp_gradient(loss_fn: ExampleLoss, params: Any, examples: Any, key: jax.Array,
                settings: DpSettings, mask: jax.Array, scale: jax.Array | None = None,
                canary: jax.Array | None = None) -> tuple[Any, Any, dict[str, jax.Array]]:
  """``private_gradient`` with the mechanism of ``settings`` (clip, noise, expected batch,
  weight bound, microbatches, mesh, ghost clipping): the one call of every private step.

  Args:
    loss_fn: one example's loss and aux outputs.
    params: the private network's parameters.
    examples: the Poisson batch's rows (a pytree of ``[B, ...]`` arrays).
    key: the update's key.
    settings: the run's resolved DP-SGD parameters.
    mask: ``[B]``, 1 for sampled rows.
    scale: optional ``[B]`` importance weights in [0, ``settings.weight_bound``].
    canary: optional ``[B]`` white-box canary of each row (-1: none); used when
      ``settings.audit_canaries`` > 0.
  """
  return private_gradient(
      loss_fn, params, examples, key, clip_norm=settings.clip_norm,
      noise_multiplier=settings.noise_multiplier,
      expected_batch_size=settings.expected_batch_size, mask=mask, scale=scale,
      scale_bound=settings.weight_bound, microbatch_size=settings.microbatch_size,
      mesh=settings.mesh, ghost=settings.ghost_clipping, canary=canary,
      num_canaries=settings.audit_canaries)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """The mean of ``values`` over the rows where ``mask`` is 1 (0 if there are none)."""
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@dataclasses.dataclass(frozen=True)
class DpGradient:
  """The private gradient of a run's mechanism: what a private objective is handed.

  Calling it is ``dp_gradient`` with the run's ``settings``. ``clipped`` is the same sum of
  clipped per-example gradients without noise over rows that hold no data (the fake term of
  DP-CGAN), ``mean`` the mean over a Poisson batch's sampled rows, and ``check_variables``
  refuses a network whose batch statistics mix examples.
  """

  settings: DpSettings

  def __call__(self, loss_fn: ExampleLoss, params: Any, examples: Any, key: jax.Array,
               mask: jax.Array, scale: jax.Array | None = None,
               canary: jax.Array | None = None) -> tuple[Any, Any, dict[str, jax.Array]]:
    """``(gradient, aux, stats)``: ``dp_gradient`` with the run's settings."""
    return dp_gradient(loss_fn, params, examples, key, self.settings, mask, scale, canary)

  def clipped(self, loss_fn: ExampleLoss, params: Any, examples: Any, key: jax.Array
              ) -> tuple[Any, Any]:
    """``(mean of the clipped per-example gradients, aux)`` over every row, without noise:
    for rows that see no data (a GAN's fakes), clipped to C so that they cannot outweigh
    the clipped real rows."""
    n = jax.tree.leaves(examples)[0].shape[0]
    p = self.settings
    gradient, aux, _ = private_gradient(
        loss_fn, params, examples, key, clip_norm=p.clip_norm, noise_multiplier=0.0,
        expected_batch_size=n, mask=jnp.ones((n,), jnp.float32),
        microbatch_size=p.microbatch_size, mesh=p.mesh, ghost=p.ghost_clipping)
    return gradient, aux

  @staticmethod
  def mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """``masked_mean``: the mean over the sampled rows (for metrics, not for release)."""
    return masked_mean(values, mask)

  @staticmethod
  def check_variables(variables: Mapping[str, Any], what: str) -> None:
    """``check_no_batch_stats``: raises ConfigError if ``variables`` hold batch stats."""
    check_no_batch_stats(variables, what)
