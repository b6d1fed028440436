"""When a host of a multi-process job dies or hangs: notice it within a bound, say so, stop.

A multi-process job (``jax.distributed``) whose process dies (SIGKILL, an OOM kill, a lost
host) or hangs (SIGSTOP, a stuck driver) leaves the others waiting in their next collective.
JAX's own detection is the coordination service's heartbeat (``heartbeat_timeout_seconds``,
100 s by default), and it ends each survivor with a C++ abort and a thread dump.

``Watchdog`` is fairgen's own check, started by ``fairgen.main`` in every process of a
multi-process job. Two daemon threads, independent of the training thread:

- the *beat* thread writes a counter to ``fairgen/heartbeat/<process>`` in the coordination
  service's key-value store (process 0 hosts it) every ``interval`` seconds, and reads every
  process's counter back in one call;
- the *judge* thread decides: a peer whose counter has not moved across ``timeout`` seconds
  of successful reads stopped responding; a store that has not answered for ``timeout``
  seconds means process 0 did.

Then the process prints one line and exits at once with status ``EXIT_STATUS`` (75,
``EX_TEMPFAIL``: try again), by ``os._exit``, since a normal exit would wait for the dead peer
in JAX's shutdown barrier::

  fairgen: error: process K stopped responding at step S; the last committed checkpoint is
  step C; run the same command to resume

A failure is detected within ``timeout + 2 * interval`` seconds (``mesh.peer_timeout_seconds``,
``interval = max(0.5, timeout / 10)``). The first process to decide publishes its verdict in
the store, and the others adopt it, so every survivor names the same culprit; process 0
exits last (``2 * interval + 0.5`` s later), since its exit takes the store with it. fairgen
raises JAX's own heartbeat timeout to at least three times the bound, so its check comes
first. A process that ends normally writes ``done``, which its peers accept.

What fairgen cannot intercept: when process 0 itself dies, its coordination service goes
with it, and JAX's client in every other process aborts at once from C++ ("Terminating
process because the JAX distributed service detected fatal errors"), before any Python runs
(jaxlib's client takes a Python callback for this, but cannot pass it the error: a
``std::bad_cast``). What it does intercept: gloo's abort when a CPU peer dies mid-message
(an exception on gloo's thread, so ``std::terminate``): a terminate handler waits there for
the verdict (``Watchdog.on_terminate``). A checkpoint that a failure interrupts is never
restored: Orbax commits a step only once every process has written its part
(``fairgen.checkpoint``).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from typing import Any, Callable, TextIO

import jax
from absl import logging
from jax._src import distributed as jax_distributed

from fairgen import checkpoint

HEARTBEAT_DIR = "fairgen/heartbeat/"
VERDICT = "verdict"  # HEARTBEAT_DIR + VERDICT: the first verdict, shared with every process.
DONE = "done"
EXIT_STATUS = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure; the same command resumes.

_progress: dict[str, int | None] = {"step": None}


def note_step(step: int | None) -> None:
  """Records the training loop's last finished step, for the failure message (None: not
  training)."""
  _progress["step"] = None if step is None else int(step)


def jax_heartbeat_seconds(timeout: float) -> int:
  """The ``heartbeat_timeout_seconds`` to give ``jax.distributed.initialize``: JAX's default
  (100 s), or three times fairgen's bound if that is longer, so fairgen's check fires first."""
  return int(max(100, 3 * (timeout + 2 * interval_for(timeout))))


def interval_for(timeout: float) -> float:
  """Seconds between heartbeats for a detection bound of ``timeout`` seconds."""
  return max(0.5, timeout / 10)


class Watchdog:
  """Detects a dead or hung peer process (see the module docstring).

  Args:
    workdir: the run's directory (its committed checkpoints are named in the message).
    timeout: seconds without a peer's heartbeat before it counts as stopped (> 0).
    client: a ``jax.distributed`` client (default: this process's).
    process: this process's index (default: ``jax.process_index()``).
    processes: the process count (default: ``jax.process_count()``).
    out: where the message goes (default: stderr).
    exit: called with ``EXIT_STATUS`` after the message (default: ``os._exit``).
  """

  def __init__(self, workdir: str, timeout: float, client: Any = None,
               process: int | None = None, processes: int | None = None,
               out: TextIO | None = None, exit: Callable[[int], Any] = os._exit):
    self.workdir, self.timeout = workdir, float(timeout)
    self.interval = interval_for(self.timeout)
    self.client = client if client is not None else _jax_client()
    self.process = jax.process_index() if process is None else process
    self.processes = jax.process_count() if processes is None else processes
    self.out, self._exit = out, exit
    self.verdict: int | None = None
    self._shared: int | None = None  # A verdict another process published.
    self._stop = threading.Event()
    self._lock = threading.Lock()
    now = time.monotonic()
    self._last_answer = now  # The last successful read of the store.
    self._changed = {p: (None, now) for p in range(self.processes) if p != self.process}
    self._threads: list[threading.Thread] = []

  def start(self) -> "Watchdog":
    """Starts the beat and judge threads, and routes C++'s ``std::terminate`` through
    ``on_terminate``."""
    _catch_cxx_terminate(self.on_terminate)
    for target in (self._beat_loop, self._judge_loop):
      thread = threading.Thread(target=target, name=f"fairgen-{target.__name__[1:]}",
                                daemon=True)
      thread.start()
      self._threads.append(thread)
    return self

  def stop(self, finished: bool) -> None:
    """Stops both threads; ``finished``: this process ended normally (its peers accept its
    silence from now on)."""
    self._stop.set()
    for thread in self._threads:  # First, so that no late beat overwrites 'done'.
      if thread is not threading.current_thread():
        thread.join(timeout=2 * self.interval + 1)
    if finished:
      try:
        self.client.key_value_set(f"{HEARTBEAT_DIR}{self.process}", DONE, allow_overwrite=True)
      except Exception:  # The job is ending anyway; JAX's shutdown reports a lost store.
        pass

  def observe(self, values: dict[str, str], now: float) -> None:
    """Takes one successful read of the heartbeat directory (name -> value: each process's
    counter, and a published verdict), made at ``now``."""
    with self._lock:
      self._last_answer = now
      if values.get(VERDICT, "").isdigit():
        self._shared = int(values[VERDICT])
      for peer, (seen, since) in self._changed.items():
        value = values.get(str(peer))
        if value != seen:
          self._changed[peer] = (value, now)

  def check(self, now: float) -> int | None:
    """The process that stopped responding by ``now``, or None."""
    with self._lock:
      if self._shared is not None:
        return self._shared
      if now - self._last_answer > self.timeout:
        return 0  # The store (process 0's coordination service) did not answer.
      for peer, (seen, since) in sorted(self._changed.items()):
        if seen != DONE and self._last_answer - since > self.timeout:
          return peer
    return None

  def message(self, peer: int) -> str:
    """The one line printed when ``peer`` stopped responding."""
    step = _progress["step"]
    where = f" at step {step}" if step is not None else ""  # Outside training: no step.
    committed = last_committed_step(self.workdir)
    saved = (f"the last committed checkpoint is step {committed}" if committed is not None
             else "no checkpoint is committed yet")
    return (f"fairgen: error: process {peer} stopped responding{where}; {saved}; run the "
            f"same command to resume (detected by process {self.process} after "
            f"mesh.peer_timeout_seconds={self.timeout:g}).")

  def explain(self, error: BaseException | None) -> None:
    """Called when the training thread raised ``error`` (None: C++ terminated) in a
    multi-process job: if a peer failure is confirmed within the bound, the process exits
    with its message (a collective that lost its peer fails before the heartbeat goes
    stale); else this returns, and the caller re-raises."""
    del error
    deadline = time.monotonic() + self.timeout + 3 * self.interval
    # Once a verdict is in, the judge thread is ending the process: wait for it.
    while (time.monotonic() < deadline and not self._stop.is_set()) or self.verdict is not None:
      time.sleep(0.1)

  def on_terminate(self) -> None:
    """Runs on a C++ thread that threw with nobody to catch it (``std::terminate``): gloo's
    reader does when a peer dies mid-message ("Received data size doesn't match expected
    size"). The thread waits here for the verdict, and the judge thread ends the process
    with its line; a crash with no dead peer behind it goes on to C++'s own handler (its
    message, then abort) once the bound has passed."""
    try:
      logging.warning("A C++ thread called std::terminate (gloo does when a peer dies "
                      "mid-message); waiting up to %.0f s for the peers' verdict.",
                      self.timeout + 3 * self.interval)
      self.explain(None)
    except BaseException:  # Never let Python unwind into C++.
      pass

  def fail(self, peer: int) -> None:
    """Publishes the verdict on ``peer``, prints its message and ends the process with
    ``EXIT_STATUS``. Process 0 first gives the others two heartbeats to read the verdict:
    once it exits, its coordination service is gone, and JAX aborts them (see the README)."""
    self.verdict = peer
    out = self.out or sys.stderr
    try:
      if self._shared is None:
        self.client.key_value_set(f"{HEARTBEAT_DIR}{VERDICT}", str(peer), allow_overwrite=True)
      if self.process == 0:
        self._stop.wait(2 * self.interval + 0.5)
    except Exception:  # The store is gone (process 0 failed): the message still goes out.
      pass
    try:
      out.write(self.message(peer) + "\n")
      out.flush()
    finally:
      self._exit(EXIT_STATUS)

  def _beat_loop(self) -> None:
    count, key = 0, f"{HEARTBEAT_DIR}{self.process}"
    while not self._stop.is_set():
      count += 1
      try:
        self.client.key_value_set(key, str(count), allow_overwrite=True)
        entries = self.client.key_value_dir_get(HEARTBEAT_DIR)
      except Exception:  # The store is unreachable: the judge decides after `timeout`.
        entries = None
      if entries is not None and not self._stop.is_set():
        self.observe({k.rsplit("/", 1)[1]: v for k, v in entries}, time.monotonic())
      self._stop.wait(self.interval)

  def _judge_loop(self) -> None:
    last = time.monotonic()
    while not self._stop.wait(self.interval):
      now = time.monotonic()
      # This process itself was not scheduled for a while (stopped, swapped): the beat
      # thread gets a turn to read the store before anyone is judged.
      paused, last = now - last > 3 * self.interval, now
      if paused:
        continue
      peer = self.check(now)
      if peer is not None and not self._stop.is_set():
        self.fail(peer)
        return


_TERMINATE_HANDLER = ctypes.CFUNCTYPE(None)
_terminate_handlers: list[Any] = []  # Kept alive: C++ holds a pointer to the installed one.


def _catch_cxx_terminate(handler: Callable[[], None]) -> bool:
  """Installs ``handler`` as C++'s terminate handler (``std::set_terminate`` in libstdc++,
  which jaxlib links), followed by the previous one; returns whether it could."""
  try:
    library = ctypes.CDLL("libstdc++.so.6")
    set_terminate = library._ZSt13set_terminatePFvvE  # std::set_terminate(void (*)())
  except (OSError, AttributeError):  # Not libstdc++: C++'s own handler stays.
    return False
  set_terminate.restype = ctypes.c_void_p
  set_terminate.argtypes = [ctypes.c_void_p]
  previous: list[Any] = []

  def on_terminate() -> None:
    handler()
    if previous[0]:
      _TERMINATE_HANDLER(previous[0])()  # libstdc++'s: prints the exception, aborts.
    os.abort()

  callback = _TERMINATE_HANDLER(on_terminate)
  _terminate_handlers.append(callback)
  previous.append(set_terminate(ctypes.cast(callback, ctypes.c_void_p)))
  return True


def last_committed_step(workdir: str) -> int | None:
  """The newest committed checkpoint step under ``workdir`` (None: none, or unreadable)."""
  try:
    steps = checkpoint.committed_steps(os.path.join(workdir, "checkpoints"))
  except Exception:  # The message must be printed even if the storage fails too.
    return None
  return max(steps) if steps else None


def _jax_client() -> Any:
  """This process's ``jax.distributed`` client (the one Orbax and multihost_utils use)."""
  client = jax_distributed.global_state.client
  if client is None:
    raise RuntimeError("jax.distributed is not initialized.")
  return client
