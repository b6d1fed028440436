"""What keeps long runs safe: preemption, non-finite guards and the workdir lock.

- ``Preemption``: SIGTERM/SIGINT set a flag; the loop finishes the current step, saves a
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
- ``WorkdirLock``: an ``fcntl`` lock on ``WORKDIR/.lock``; the kernel releases it when the
  process dies, even by SIGKILL, so a stale lock never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os
import signal
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental import multihost_utils

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

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint and stop after ``step`` (the same answer on all processes)."""
    if jax.process_count() > 1:
      return bool(multihost_utils.reached_preemption_sync_point(step))
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
  """An exclusive, crash-safe lock on a workdir (process 0 only)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._fd: int | None = None

  def __enter__(self) -> "WorkdirLock":
    if jax.process_index() != 0:
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

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
