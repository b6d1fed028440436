"""Orbax checkpoints in ``WORKDIR/checkpoints/<step>/`` and the workdir's config guard.

Async saves, ``max_to_keep``, restore into the abstract *sharded* state (so a run saved on 8
devices restores on 1 and vice versa). A step directory without Orbax's commit marker (left
by a crash mid-save on a filesystem where the save is not atomic) is never taken as the
latest step: it is removed before the manager opens the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from fairgen import config as config_lib
from fairgen import storage

COMMIT_MARKER = "commit_success.txt"
CONFIG_FILE = "config.json"
BEST_FILE = "best.json"
# ``config -> defaults of the families it names``, e.g. ``fairgen.experiment.section_defaults``.
SectionDefaults = Callable[[Mapping[str, Any]], Mapping[str, Any]]


class WorkdirError(RuntimeError):
  """The workdir belongs to another experiment, or cannot be used as asked."""


def ensure_writable(directory: str, what: str = "--workdir") -> None:
  """Creates ``directory`` if needed and checks that files can be written in it.

  Raises:
    WorkdirError: one line naming the problem: ``directory`` is a file, lies below a
      file, or cannot be created or written (permissions, a read-only filesystem).
  """
  try:
    directory = storage.normalize(directory)
  except storage.StorageError as e:
    raise WorkdirError(f"{what}={e}") from None
  if storage.is_remote(directory):
    _ensure_writable_remote(directory, what)
    return
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise WorkdirError(f"{what}={directory} is an existing file, not a directory.")
  parent = directory
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise WorkdirError(f"{what}={directory} lies below {parent}, which is a file.")
  if jax.process_index() != 0:
    return
  probe = os.path.join(directory, f".write_probe.{os.getpid()}")
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"{what}={directory} cannot be written: {e.strerror or e} (errno "
                       f"{e.errno}). Choose a writable directory.") from None


def _ensure_writable_remote(directory: str, what: str) -> None:
  """Writes and deletes a probe object (process 0): no bucket, no credentials or no write
  permission fail here, in one line, before anything else is written."""
  if jax.process_index() != 0:
    return
  probe = os.path.join(directory, f".write_probe.{os.getpid()}")
  try:
    if storage.isfile(directory):
      raise WorkdirError(f"{what}={directory} is an existing object, not a directory.")
    storage.write_atomic(probe, "ok")
    storage.remove(probe)
  except WorkdirError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # gcsfs/google-auth errors vary.
    reason = type(e).__name__ + (f" {str(e).strip().splitlines()[0][:300]}" if str(e).strip()
                                 else "")
    raise WorkdirError(f"{what}={directory} cannot be written ({reason}). Check the "
                       f"bucket name and your credentials (gcloud auth "
                       f"application-default login).") from None


def _is_committed(step_dir: str) -> bool:
  if storage.exists(os.path.join(step_dir, COMMIT_MARKER)):
    return True
  meta = os.path.join(step_dir, "_CHECKPOINT_METADATA")
  try:
    return bool(json.loads(storage.read_text(meta)).get("commit_timestamp_nsecs"))
  except (OSError, ValueError):
    return False


def committed_steps(directory: str) -> list[int]:
  """The committed steps in a checkpoint directory, oldest first (plain storage reads: safe
  from any thread, with no collective)."""
  return sorted(int(n) for n in storage.listdir(directory)
                if n.isdigit() and _is_committed(os.path.join(directory, n)))


def remove_uncommitted(directory: str) -> list[str]:
  """Removes step directories that hold no committed checkpoint; returns their names."""
  removed = []
  if jax.process_index() != 0:
    return removed
  for name in storage.listdir(directory):
    path = os.path.join(directory, name)
    if name.isdigit() and storage.isdir(path) and not _is_committed(path):
      logging.warning("Removing incomplete checkpoint directory %s (no commit marker).", path)
      storage.rmtree(path)
      removed.append(name)
  return removed


# Orbax's replica-parallel save has each replica of a replicated array write 1/R of it, cut
# out by a slice program compiled per (shape, device): the first save of 8 replicated
# devices compiled 104 of them for the ResNet smoke GAN (5 s on this CPU), 168 for the smoke
# U-Net (12 s); a real model's hundreds of leaves cost minutes. Slices this small gain
# nothing from parallel writes: below it, replica 0 writes the whole array (Orbax's own
# single-replica path), and larger arrays are still split.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _use_min_replica_slice() -> None:
  """Registers Orbax's jax.Array handler with ``MIN_REPLICA_SLICE_BYTES`` (once; Orbax's
  type-handler registry is process-wide)."""
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(handler, "_min_slice_bytes_for_replica_parallel", None) == MIN_REPLICA_SLICE_BYTES:
    return
  # The default handler's metadata store, so that checkpoints keep their array metadata.
  store = getattr(handler, "_array_metadata_store", None)
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
          array_metadata_store=store), override=True)


# How long the close of a restore's event loop waits for reads still in flight (below).
DRAIN_SECONDS = 120.0


class _DrainingEventLoop(asyncio.SelectorEventLoop):
  """An event loop that lets its unfinished tasks end before it closes.

  Orbax runs each restore in a fresh loop (``run_until_complete``, then ``close``) and,
  unlike ``asyncio.run``, leaves the tasks still pending behind. When one array of a damaged
  checkpoint cannot be read, ``asyncio.gather`` raises at once while TensorStore still reads
  the others; as each of those reads ends, TensorStore calls ``call_soon_threadsafe`` on the
  closed loop, and each ``RuntimeError: Event loop is closed`` is printed as a traceback (by
  ``sys.unraisablehook``), dozens per damaged checkpoint.
  """

  def close(self) -> None:
    if not self.is_closed() and not self.is_running():
      self._drain()
    super().close()

  def _drain(self) -> None:
    pending = asyncio.all_tasks(self)
    if not pending:
      return
    _, late = self.run_until_complete(asyncio.wait(pending, timeout=DRAIN_SECONDS))
    if late:  # A read that hangs (a remote store): give up on it, as asyncio.run would.
      for task in late:
        task.cancel()
      self.run_until_complete(asyncio.wait(late, timeout=1.0))
    for task in pending:
      if task.done() and not task.cancelled():
        task.exception()  # Marks it retrieved: asyncio logs no "never retrieved" error.


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
  """``asyncio.new_event_loop()`` (which Orbax calls) makes ``_DrainingEventLoop``s."""

  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _DrainingEventLoop()


@contextlib.contextmanager
def _draining_event_loops() -> Iterator[None]:
  """Event loops created inside, in any thread, wait for their tasks before they close."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_DrainingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


class Checkpointer:
  """Saves and restores the train state of one workdir."""

  def __init__(self, workdir: str, max_to_keep: int = 1, save_every_steps: int = 1,
               async_save: bool = True, read_only: bool = False, subdir: str = "checkpoints"):
    _use_min_replica_slice()
    self.directory = os.path.join(storage.normalize(workdir), subdir)
    if read_only:
      if not storage.isdir(self.directory):
        raise WorkdirError(f"{self.directory} does not exist: train this workdir first.")
    else:
      remove_uncommitted(self.directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_every_steps,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
        create=not read_only, read_only=read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest committed step, or None."""
    steps = [s for s in self._manager.all_steps()
             if _is_committed(os.path.join(self.directory, str(s)))]
    return max(steps) if steps else None

  def all_steps(self) -> list[int]:
    """All committed steps, oldest first."""
    return sorted(self._manager.all_steps())

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores ``step`` into the shapes, dtypes and shardings of ``abstract_state``.

    Raises:
      WorkdirError: if the saved tree does not match ``abstract_state`` (the model code
        changed since the checkpoint was written).
    """
    try:
      with _draining_event_loops():
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except ValueError as e:
      if "do not match" not in str(e) and "not compatible with the stored shape" not in str(e):
        raise  # Damaged files, not a different model: the caller may fall back.
      first = str(e).strip().splitlines()[0]
      raise WorkdirError(
          f"The checkpoint {self.directory}/{step} does not fit the current model's state "
          f"({first} ...). It was written by different model code or another optimizer "
          f"layout (optim.flatten); use a new --workdir, or the code and config that wrote "
          f"it.") from None

  def quarantine(self, step: int) -> str:
    """Moves an unreadable step to ``WORKDIR/checkpoints_damaged/`` (kept, not deleted)."""
    target_dir = self.directory + "_damaged"
    target = os.path.join(target_dir, f"{step}.{int(time.time())}")
    if jax.process_index() == 0:
      storage.move(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    return target

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    """Saves (asynchronously) if ``step`` is due or ``force``; returns whether it saved."""
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def wait(self) -> None:
    """Blocks until pending async saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


class BestCheckpoint:
  """Keeps the best state by one evaluation metric in ``WORKDIR/best/``, beside the latest.

  ``WORKDIR/best.json`` records {step, metric, mode, value, provenance}; it is written only
  after the checkpoint it describes is committed. ``provenance`` is the evaluation's (backbone,
  weights digest, preprocessing, sample count, reference data): a run whose evaluations
  differ from the record in any of it is refused, since its numbers and the recorded best
  would not be comparable.

  Raises:
    WorkdirError: (at construction) if ``best.json`` was measured with another provenance.
  """

  def __init__(self, workdir: str, metric: str, mode: str,
               provenance: dict[str, Any] | None = None):
    if mode not in ("min", "max"):
      raise ValueError(f"eval.best_mode must be 'min' or 'max', got {mode!r}.")
    self.metric, self.mode = metric, mode
    # Through JSON, as best.json stores it (tuples become lists).
    self.provenance = None if provenance is None else json.loads(json.dumps(provenance))
    self.path = os.path.join(workdir, BEST_FILE)
    self.workdir = workdir
    self._checkpointer: Checkpointer | None = None
    self.record = read_best(workdir)
    if self.record and (self.record["metric"], self.record["mode"]) != (metric, mode):
      logging.warning("best.json tracks %s (%s); now tracking %s (%s) from scratch.",
                      self.record["metric"], self.record["mode"], metric, mode)
      self.record = None
    recorded = (self.record or {}).get("provenance")
    if recorded is not None and self.provenance is not None and recorded != self.provenance:
      differ = sorted(k for k in set(recorded) | set(self.provenance)
                      if recorded.get(k) != self.provenance.get(k))
      raise WorkdirError(
          f"{self.path} holds the best {metric} measured with another evaluation setup "
          f"({', '.join(differ)} differ: recorded {[recorded.get(k) for k in differ]}, now "
          f"{[self.provenance.get(k) for k in differ]}); the two cannot be compared. Evaluate "
          "with the recorded setup, or train in a new workdir.")

  def is_better(self, value: float) -> bool:
    if not math.isfinite(value):
      return False
    if self.record is None:
      return True
    best = self.record["value"]
    return value < best if self.mode == "min" else value > best

  def update(self, step: int, results: dict[str, float], state: Any) -> bool:
    """Saves ``state`` as the best if ``results[metric]`` improves on the record."""
    if self.metric not in results:
      raise ValueError(f"eval.best_metric={self.metric!r} is not among the evaluation "
                       f"results ({', '.join(sorted(results))}).")
    value = float(results[self.metric])
    if not self.is_better(value):
      return False
    if self._checkpointer is None:
      self._checkpointer = Checkpointer(self.workdir, max_to_keep=1, subdir="best")
    self._checkpointer.save(step, state, force=True)
    self._checkpointer.wait()
    self.record = {"step": int(step), "metric": self.metric, "mode": self.mode, "value": value,
                   "provenance": self.provenance}
    if jax.process_index() == 0:
      _write_json(self.path, self.record)
    return True

  def close(self) -> None:
    if self._checkpointer is not None:
      self._checkpointer.close()


def read_best(workdir: str) -> dict[str, Any] | None:
  """The ``best.json`` record of a workdir, or None."""
  path = os.path.join(workdir, BEST_FILE)
  if not storage.exists(path):
    return None
  return json.loads(storage.read_text(path))


def _write_json(path: str, obj: Any) -> None:
  storage.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct``s carrying the target shardings, for restoring."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)


def check_and_write_config(workdir: str, config: ml_collections.ConfigDict,
                           force: bool = False, defaults: SectionDefaults | None = None
                           ) -> None:
  """Refuses a workdir made by another experiment, then writes the resolved config.

  With ``force``, a differing config.json is kept as ``config.<unix time>.json`` (nothing
  is deleted) and the new one is written. ``defaults``: as for ``check_config``.
  """
  try:
    check_config(workdir, config, defaults)
  except WorkdirError:
    if not force:
      raise
    old = os.path.join(workdir, CONFIG_FILE)
    kept = os.path.join(workdir, f"config.{int(time.time())}.json")
    logging.warning("Resuming with a different experiment as forced; the old config is kept "
                    "as %s.", kept)
    if jax.process_index() == 0:
      storage.move(old, kept)
  if jax.process_index() == 0:
    storage.write_atomic(os.path.join(workdir, CONFIG_FILE),
                         config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a fairgen run wrote to ``WORKDIR/config.json`` (JSON's lists back to the
  tuples the config held).

  Raises:
    WorkdirError: if there is none (not a fairgen workdir), or it is not valid JSON.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not storage.exists(path):
    raise WorkdirError(
        f"{workdir} holds no {CONFIG_FILE}: it is not a fairgen workdir (train one with "
        f"fairgen.train(config, workdir) or python -m fairgen.main).")
  try:
    saved = json.loads(storage.read_text(path))
  except ValueError as e:
    raise WorkdirError(f"{path} is not valid JSON ({e}).") from None
  return ml_collections.ConfigDict(_tuples(saved))


def _tuples(value: Any) -> Any:
  """JSON's lists back to the tuples the config held (configs hold no lists)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def check_config(workdir: str, config: ml_collections.ConfigDict,
                 defaults: SectionDefaults | None = None) -> None:
  """Refuses a workdir made by another experiment (read-only).

  Args:
    workdir: the run directory.
    config: the config to run it with.
    defaults: ``config -> the defaults of the families it names``
      (``fairgen.experiment.section_defaults``), applied to the saved config and to
      ``config`` alike: a key at its default and an absent key are then the same
      experiment, so a config.json written before an experiment stopped stating a default
      (or before a family gained a key) still matches. None: keys compare as written
      (``fairgen.config.fingerprint``).

  Raises:
    WorkdirError: if ``WORKDIR/config.json`` exists and its data/model/objective sections
      differ from ``config``'s.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if storage.exists(path):
    try:
      saved = json.loads(storage.read_text(path))
    except ValueError as e:
      raise WorkdirError(f"{path} is not valid JSON ({e}); use a new --workdir.") from None
    changes = config_lib.diff(
        config_lib.fingerprint(saved, defaults(saved) if defaults else None),
        config_lib.fingerprint(config, defaults(config) if defaults else None))
    if changes:
      raise WorkdirError(
          f"--workdir={workdir} holds a run of a different experiment; these keys differ "
          f"from its {CONFIG_FILE}: {'; '.join(changes)}. Use a new --workdir (nothing in "
          f"this one was changed), or pass --allow_new_experiment to resume anyway.")
