"""Mesh and shardings. Model code never names device axes: sharding lives here.

Also the host-side helpers that feed jitted functions: ``to_host`` and ``map_in_chunks``.

One data axis (``mesh.data``). Parameters and optimizer state are replicated, or, with
``mesh.fsdp=True``, sharded over the same data axis (fully sharded data parallelism, ZeRO-3
style): XLA all-gathers each parameter where the step uses it and reduce-scatters its
gradient. The rule (``fsdp_spec``) lives here; models and objectives never see it.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fairgen import config as config_lib

DATA_AXIS = "data"
# Set by tools/launch_local.py (with JAX's own JAX_COORDINATOR_ADDRESS) for each process.
NUM_PROCESSES_ENV, PROCESS_ID_ENV = "FAIRGEN_NUM_PROCESSES", "FAIRGEN_PROCESS_ID"


# XLA:CPU's convolutions on Eigen instead of YNNPACK (an XLA compile option, in
# train.xla_options' syntax): 1.4x the DCGAN's steps/s and 2.35x the Inception-v3's images/s
# on the 2-core AMD EPYC (docs/benchmarks.md).
EIGEN_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def cpu_convolution_options() -> dict[str, bool | int | float | str]:
  """``jax.jit``'s ``compiler_options`` that put convolutions on Eigen, on a CPU backend
  (``EIGEN_CONVOLUTIONS``); none on GPU and TPU, whose compilers do not read the option."""
  return config_lib.xla_options(EIGEN_CONVOLUTIONS) if jax.default_backend() == "cpu" else {}


def stacked_sharding(sharding: NamedSharding) -> NamedSharding:
  """``sharding`` of a batch, for the batches of several steps stacked on a new leading
  axis (``train.steps_per_dispatch``): that axis whole, the batch axis split as before."""
  return NamedSharding(sharding.mesh, P(None, *sharding.spec))


class MeshError(ValueError):
  """The configured mesh does not fit the devices or the batch."""


def launched_locally() -> bool:
  """Whether this process is one of a job started by ``tools/launch_local.py``."""
  return NUM_PROCESSES_ENV in os.environ


def initialize_distributed(heartbeat_seconds: int = 100) -> None:
  """Joins this process to its multi-process job (``jax.distributed.initialize``).

  The job is described by ``tools/launch_local.py``'s environment (coordinator address,
  process count and index) where it is set, else by JAX's own detection of the cluster
  (Cloud TPU, SLURM, Open MPI, Kubernetes). CPU devices exchange data with other
  processes through gloo (JAX's CPU collectives); GPUs and TPUs use their own.

  Args:
    heartbeat_seconds: JAX's own dead-peer timeout (it aborts the survivors); fairgen's
      ``peers.Watchdog`` stops them first, so this is set above its bound
      (``peers.jax_heartbeat_seconds``).

  Raises:
    MeshError: the job cannot be joined (no cluster detected, a bad environment, or the
      coordinator did not answer), with the reason.
  """
  kwargs = {}
  if launched_locally():
    try:
      kwargs = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"],
                "num_processes": int(os.environ[NUM_PROCESSES_ENV]),
                "process_id": int(os.environ[PROCESS_ID_ENV])}
    except (KeyError, ValueError) as e:
      raise MeshError(f"{NUM_PROCESSES_ENV} is set, but the job's environment is incomplete "
                      f"or malformed ({type(e).__name__}: {e}); start the processes with "
                      f"tools/launch_local.py.") from None
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=heartbeat_seconds)
  except (ValueError, RuntimeError) as e:
    message = " ".join(str(e).split())[:300].rstrip(".")
    raise MeshError(f"mesh.distributed=True, but this process could not join a "
                    f"multi-process job: {message}. On one machine, start the job with "
                    f"tools/launch_local.py; on a cluster, launch it with the cluster's "
                    f"scheduler (Cloud TPU, SLURM, Open MPI), which JAX detects.") from None


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


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host-side values, the same on every process, as arrays replicated over ``mesh``.

  Unlike ``jax.device_put``, this also takes committed single-device arrays (and typed
  PRNG keys) in a multi-process job, where the mesh spans devices of other processes.
  """
  sharding = replicated(mesh)

  def put(x: Any) -> jax.Array:
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(put, tree)


# Leaves with fewer elements stay replicated under mesh.fsdp: biases, norm scales, scalars
# and counters save little memory and would each cost a collective.
FSDP_MIN_SIZE = 2**10


def fsdp_spec(shape: tuple[int, ...], n: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """The FSDP partition of one state leaf of ``shape`` over ``n`` devices.

  The rule (big_vision's ``fsdp`` rule): shard the largest dimension that ``n`` divides
  (the last of equal ones), over the data axis; replicate the leaf if no dimension is
  divisible, or if it has fewer than ``min_size`` elements. E.g. on 8 devices a
  ``[5, 5, 64, 128]`` conv kernel is split along its 128 output channels, ``[3136, 1]``
  along 3136, and a ``[100]`` bias is replicated.
  """
  if n <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  best = None
  for axis, size in enumerate(shape):
    if size % n == 0 and (best is None or size >= shape[best]):
      best = axis
  if best is None:
    return P()
  return P(*([None] * best + [DATA_AXIS]))


def state_shardings(mesh: Mesh, abstract_state: Any, fsdp: bool = False) -> Any:
  """The sharding of every leaf of the train state: replicated, or ``fsdp_spec``'s."""
  n = mesh.shape[DATA_AXIS]

  def sharding(leaf: Any) -> NamedSharding:
    if not fsdp:
      return replicated(mesh)
    return NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), n))

  return jax.tree.map(sharding, abstract_state)


def bytes_per_device(abstract_state: Any, shardings: Any) -> int:
  """Bytes of ``abstract_state`` that one device holds under ``shardings``."""
  def leaf_bytes(leaf: Any, sharding: NamedSharding) -> int:
    shard = sharding.shard_shape(tuple(leaf.shape))
    return int(np.prod(shard, dtype=np.int64)) * leaf.dtype.itemsize  # Keys too (8 bytes).

  return sum(jax.tree.leaves(jax.tree.map(leaf_bytes, abstract_state, shardings)))


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
