"""What keeps long runs safe: preemption, non-finite guards and the workdir lock.

- ``Preemption``: SIGTERM/SIGINT set a flag; the loop finishes the current dispatch, saves a
  checkpoint, waits for it to commit and exits 0. On multi-process runs all processes must
  stop at the same step, so the decision comes from JAX's preemption sync point
  (``multihost_utils.reached_preemption_sync_point``), which the distributed runtime
  coordinates, and not from one process's signal: there SIGTERM is left to JAX's notifier
  and SIGINT is turned into a SIGTERM.
- ``guard_step``: wraps any objective's step inside jit. A non-finite metric (every loss and
  gradient norm is a metric) marks the update bad: the update is dropped (the step counter
  still advances, so the data and RNG move on) and counted in ``state['guard']``. The host
  reads the counters at each log/checkpoint boundary and applies ``train.nan_policy``:
  'halt' stops at the first bad step, 'skip' stops after ``train.max_nan_skips``
  consecutive bad steps. No checkpoint is ever written from a state after a halt.
- ``WorkdirLock``: on local disk an ``fcntl`` lock on ``WORKDIR/.lock``; the kernel releases
  it when the process dies, even by SIGKILL, so a stale lock never blocks a restart. On gs://
  a lease object (see ``LeaseLock``).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental import multihost_utils

from fairgen import storage

NAN_POLICIES = ("halt", "skip")
GUARD_KEY = "guard"
NONFINITE_PREFIX = "nonfinite/"


class NonFiniteError(FloatingPointError):
  """A loss or gradient norm became NaN or infinite."""


class WorkdirLockedError(RuntimeError):
  """Another live process is using the workdir."""


class Preemption:
  """Turns SIGTERM/SIGINT into a request to checkpoint and stop after the current step."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_received: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "Preemption":
    # In a multi-process job, SIGTERM belongs to JAX's preemption notifier (installed by
    # jax.distributed.initialize), which the sync point reads; a Python handler would
    # replace it. SIGINT is passed on to it as a SIGTERM.
    multi = jax.process_count() > 1
    for sig in self.SIGNALS:
      if multi and sig == signal.SIGTERM:
        continue
      try:
        self._previous[sig] = signal.signal(sig, self._forward if multi else self._handle)
      except ValueError:  # Not the main thread (e.g. under some test runners).
        pass
    return self

  def _forward(self, signum: int, frame: Any) -> None:
    self._handle(signum, frame)
    os.kill(os.getpid(), signal.SIGTERM)

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signal_received is None:
      logging.warning("Received %s: saving a checkpoint after this step, then exiting.",
                      signal.Signals(signum).name)
    self.signal_received = signum

  def should_stop(self, step: int, steps: int = 1) -> bool:
    """Whether to checkpoint and stop after ``step``, the last of a dispatch of ``steps``
    steps (the same answer on all processes). JAX's sync point is one step id, which every
    process must pass: each step of the dispatch is reported to it."""
    if jax.process_count() > 1:
      reached = [bool(multihost_utils.reached_preemption_sync_point(s))
                 for s in range(step - steps + 1, step + 1)]
      return any(reached)
    return self.signal_received is not None


def init_guard() -> dict[str, jax.Array]:
  """The counters ``guard_step`` keeps in the train state."""
  return {"skipped": jnp.zeros((), jnp.int32), "consecutive": jnp.zeros((), jnp.int32),
          "first_bad_step": jnp.full((), -1, jnp.int32)}


def guard_step(train_step: Callable[..., tuple[Any, dict[str, jax.Array]]]
               ) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
  """Wraps ``train_step`` so that non-finite updates are dropped and counted (see module)."""

  def step(state, batch, rng):
    inner = {k: v for k, v in state.items() if k != GUARD_KEY}
    new_inner, metrics = train_step(inner, batch, rng)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(m)) for m in metrics.values()]))
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_inner, inner)
    kept["step"] = new_inner["step"]
    guard = state[GUARD_KEY]
    bad = jnp.logical_not(finite).astype(jnp.int32)
    kept[GUARD_KEY] = {
        "skipped": guard["skipped"] + bad,
        "consecutive": jnp.where(finite, 0, guard["consecutive"] + 1),
        "first_bad_step": jnp.where((guard["first_bad_step"] < 0) & (bad > 0),
                                    inner["step"] + 1, guard["first_bad_step"]),
    }
    # Metrics of a dropped update are zeroed so the logged averages stay finite; the
    # 'finite' count tells the host how many steps the averages cover.
    out = {k: jnp.where(finite, v, 0.0) for k, v in metrics.items()}
    out.update({f"{NONFINITE_PREFIX}{k}": jnp.logical_not(jnp.all(jnp.isfinite(v))).astype(
        jnp.float32) for k, v in metrics.items()})
    out["finite"] = finite.astype(jnp.float32)
    return kept, out

  return step


def check_guard(guard: dict[str, Any], policy: str, max_skips: int,
                bad_metrics: list[str]) -> None:
  """Raises NonFiniteError if ``policy`` says the run must stop (host side)."""
  first = int(guard["first_bad_step"])
  if first < 0:
    return
  what = ", ".join(bad_metrics) or "a loss or gradient norm"
  if policy == "halt":
    raise NonFiniteError(
        f"Non-finite {what} at step {first}. Training stopped (train.nan_policy='halt'); "
        f"checkpoints up to the last one before step {first} are intact. Lower the learning "
        f"rate, check the data, or set train.nan_policy='skip'.")
  if int(guard["consecutive"]) >= max_skips:
    raise NonFiniteError(
        f"{int(guard['consecutive'])} consecutive non-finite updates ({what}), the first bad "
        f"step being {first}; train.max_nan_skips={max_skips} reached. Training stopped; the "
        f"last checkpoint is intact.")


class WorkdirLock:
  """An exclusive lock on a workdir, held by process 0 while it trains.

  Local workdirs use ``fcntl`` (released by the kernel when the holder dies); gs:// workdirs
  use a ``LeaseLock``. ``check()`` raises if the lease was lost.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._fd: int | None = None
    self._lease: LeaseLock | None = None

  def __enter__(self) -> "WorkdirLock":
    if jax.process_index() != 0:
      return self
    if storage.is_remote(self.path):
      self._lease = LeaseLock(self.path)
      self._lease.acquire()
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
      os.close(fd)
      raise WorkdirLockedError(
          f"{os.path.dirname(self.path)} is in use by another fairgen process (pid "
          f"{holder}). Wait for it to finish or stop it; two runs must not share a "
          f"workdir.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    self._fd = fd
    return self

  def check(self) -> None:
    """Raises WorkdirLockedError if another process took the lease over (gs:// only)."""
    if self._lease is not None:
      self._lease.check()

  def __exit__(self, *exc) -> None:
    if self._lease is not None:
      self._lease.release()
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


class LeaseLock:
  """A lock object on GCS that its holder keeps alive, safe across hosts.

  - **Acquire**: create ``.lock`` only if no object exists (``ifGenerationMatch=0``); the
    object names the holder (host, pid, a random id) and its lease period.
  - **Keep**: a thread rewrites the object every quarter lease, only if it is still the
    generation this holder wrote (``ifGenerationMatch``), so a holder that was taken over
    learns it (``check()`` raises) instead of overwriting the new holder.
  - **A holder that dies** stops renewing. A new run that finds the lock watches it: if the
    holder is a dead pid on this same host, it takes over at once; otherwise it takes over
    once the object has stayed unchanged for a whole lease period on the new run's own clock
    (no clock comparison between hosts), and fails with WorkdirLockedError as soon as the
    object changes (the holder is alive). Takeover is a conditional overwrite of the
    generation it watched, so of two waiters only one wins.
  """

  DEFAULT_SECONDS = 60.0

  def __init__(self, path: str, lease_seconds: float = DEFAULT_SECONDS):
    bucket, _, self.name = path[len(storage.REMOTE_PREFIX):].partition("/")
    from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top
    self.path, self.lease_seconds = path, float(lease_seconds)
    self._bucket = gcs.Client().bucket(bucket)
    self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex}
    self._generation: int | None = None
    self._lost: str | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _payload(self) -> str:
    return json.dumps({**self.owner, "lease_seconds": self.lease_seconds,
                       "written": time.time()})

  def _write(self, if_generation_match: int) -> bool:
    """Uploads the holder record if the object is at that generation (0: absent)."""
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    blob = self._bucket.blob(self.name)
    try:
      blob.upload_from_string(self._payload(), if_generation_match=if_generation_match)
    except exceptions.PreconditionFailed:
      return False
    self._generation = blob.generation
    return True

  def _holder_is_dead_here(self, holder: dict[str, Any]) -> bool:
    if holder.get("host") != self.owner["host"] or not isinstance(holder.get("pid"), int):
      return False
    try:
      os.kill(holder["pid"], 0)
    except ProcessLookupError:
      return True
    except PermissionError:
      return False
    return False

  def acquire(self, poll_seconds: float = 1.0) -> None:
    """Takes the lock, waiting at most one lease period for a silent holder (see class)."""
    watched: tuple[int, float] | None = None  # (generation, when first seen)
    while True:
      if self._write(if_generation_match=0):
        break
      blob = self._bucket.get_blob(self.name)
      if blob is None:
        continue  # Released meanwhile.
      try:
        holder = json.loads(blob.download_as_text(if_generation_match=blob.generation))
      except Exception:  # pylint: disable=broad-except
        holder = {}  # Changed under us or unreadable; treated as an unknown holder.
      lease = float(holder.get("lease_seconds", self.DEFAULT_SECONDS))
      dead_here = self._holder_is_dead_here(holder)
      if watched is not None and watched[0] != blob.generation:
        raise WorkdirLockedError(
            f"{os.path.dirname(self.path)} is in use by another fairgen process "
            f"({holder.get('host', '?')}, pid {holder.get('pid', '?')}), which renewed its "
            f"lease. Wait for it to finish or stop it; two runs must not share a workdir.")
      if watched is None:
        watched = (blob.generation, time.monotonic())
        if not dead_here:
          logging.warning("%s is held by %s pid %s; taking it over if the holder does not "
                          "renew it within %.0f s.", self.path, holder.get("host", "?"),
                          holder.get("pid", "?"), lease)
      if dead_here or time.monotonic() - watched[1] >= lease:
        if self._write(if_generation_match=blob.generation):
          logging.warning("Took over %s from %s pid %s, which is gone.", self.path,
                          holder.get("host", "?"), holder.get("pid", "?"))
          break
        continue
      time.sleep(min(poll_seconds, lease / 4))
    self._stop.clear()
    self._thread = threading.Thread(target=self._renew, daemon=True, name="fairgen-lease")
    self._thread.start()

  def _renew(self) -> None:
    while not self._stop.wait(self.lease_seconds / 4):
      try:
        if not self._write(if_generation_match=self._generation):
          self._lost = (f"{self.path}: another process took over this run's lease; this "
                        f"process stopped renewing it for over {self.lease_seconds:.0f} s.")
          logging.error(self._lost)
          return
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Renewing %s failed (%s); retrying.", self.path, e)

  def check(self) -> None:
    """Raises WorkdirLockedError if the lease was lost."""
    if self._lost:
      raise WorkdirLockedError(self._lost)

  def release(self) -> None:
    """Stops renewing and deletes the lock object if this holder still owns it."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._generation is None or self._lost:
      return
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    try:
      self._bucket.blob(self.name).delete(if_generation_match=self._generation)
    except (exceptions.NotFound, exceptions.PreconditionFailed):
      pass
    self._generation = None
