"""Mesh and shardings. Model code never names device axes: sharding lives here.

Also the host-side helpers that feed jitted functions: ``to_host`` and ``map_in_chunks``.

One data axis today (``mesh.data``); parameters are replicated. A later ``mesh.fsdp`` axis
adds parameter sharding rules here without touching models or objectives.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


class MeshError(ValueError):
  """The configured mesh does not fit the devices or the batch."""


def make_mesh(data: int = -1) -> Mesh:
  """A 1-D mesh over ``data`` devices (-1: all devices) with Auto axis types.

  ``jax.make_mesh`` defaults to Explicit axes in jax 0.10, under which Flax's Dropout raises
  a ShardingTypeError; Auto axes keep sharding propagation implicit.
  """
  devices = jax.devices()
  n = len(devices) if data in (-1, 0) else data
  if n < 1 or n > len(devices):
    raise MeshError(
        f"mesh.data={data} but {len(devices)} device(s) are available; use -1 for all, or a "
        f"number up to {len(devices)}.")
  if jax.process_count() > 1 and n != len(devices):
    raise MeshError("Multi-process runs must use all devices: set mesh.data=-1.")
  return Mesh(np.asarray(devices[:n]), (DATA_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Batches: leading axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Parameters, optimizer state, RNG keys and metrics: replicated."""
  return NamedSharding(mesh, P())


def state_shardings(mesh: Mesh, abstract_state: Any) -> Any:
  """The sharding of every leaf of the train state (replicated for now)."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def check_batch(global_batch: int, mesh: Mesh) -> None:
  """A global batch must split evenly over the data axis and the processes."""
  n = mesh.shape[DATA_AXIS]
  if global_batch % n:
    raise MeshError(
        f"The global batch ({global_batch} examples per step) is not divisible by the "
        f"{n} devices of the data axis: change train.batch_size or mesh.data.")
  if global_batch % jax.process_count():
    raise MeshError(
        f"The global batch ({global_batch}) is not divisible by the "
        f"{jax.process_count()} processes.")


def to_host(tree: Any) -> Any:
  """Fetches a (possibly multi-host) tree of global arrays as NumPy on every process."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def map_in_chunks(fn: Callable[..., Any], arrays: tuple[np.ndarray, ...],
                  chunk_size: int) -> Any:
  """``fn`` over row chunks of ``arrays``, outputs concatenated along their leading axis.

  Every call gets ``min(chunk_size, N)`` rows (at least 1): the last chunk is zero-padded
  and the padding rows' outputs dropped, so a jitted ``fn`` compiles one shape. ``fn`` may
  return an array or a pytree of arrays with one row per input row; ``N == 0`` still calls
  it once, so the outputs have their shapes and dtypes with 0 rows.

  Args:
    fn: maps ``[n, ...]`` arrays (one per entry of ``arrays``) to ``[n, ...]`` outputs.
    arrays: NumPy arrays with the same number of rows.
    chunk_size: rows per call, ``>= 1``.

  Returns:
    The outputs as NumPy arrays (the pytree structure of ``fn``'s).
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
  n = len(arrays[0])
  size = max(1, min(chunk_size, n))
  outs = []
  for start in range(0, max(n, 1), size):
    chunk = [a[start:start + size] for a in arrays]
    m = len(chunk[0])
    if m < size:
      chunk = [np.concatenate([c, np.zeros((size - m, *c.shape[1:]), c.dtype)]) for c in chunk]
    outs.append(jax.tree.map(lambda o, m=m: np.asarray(o)[:m], fn(*chunk)))
  return jax.tree.map(lambda *o: np.concatenate(o), *outs)
