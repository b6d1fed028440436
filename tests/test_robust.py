"""Robustness with real processes: preemption, SIGKILL anywhere, NaNs, locks, damaged files."""

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (REPO, assert_same_final_state, final_state, killed_process_cache_env,
                      load_config, run_main, subprocess_env)
from fairgen import checkpoint, experiment, robust, train

CONFIG = "experiments/dcgan_mnist.py:smoke"


def _launch(workdir, *extra, env_extra=None, stderr=subprocess.PIPE):
  env = subprocess_env(env_extra)
  return subprocess.Popen(
      [sys.executable, "-m", "fairgen.main", f"--config={CONFIG}", f"--workdir={workdir}",
       *extra], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def _wait_for(proc, text, timeout=120):
  """Reads the process's stderr until ``text`` appears; the rest is drained in a thread."""
  seen = threading.Event()
  lines = []

  def read():
    for line in proc.stderr:
      lines.append(line)
      if text in line:
        seen.set()
    seen.set()

  threading.Thread(target=read, daemon=True).start()
  assert seen.wait(timeout), "".join(lines[-20:])
  return lines


def _logged_steps(workdir, offset):
  """Steps of the complete lines appended to metrics.jsonl after byte ``offset``."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      f.seek(offset)
      text = f.read()
  except FileNotFoundError:
    return []
  return [json.loads(line)["step"] for line in text.splitlines(keepends=True)
          if line.endswith("\n")]


def _checkpoint_entries(workdir):
  """(committed steps, steps whose save is in progress) in WORKDIR/checkpoints.

  In progress: Orbax's temporary ``<step>.orbax-checkpoint-tmp*`` directory (atomic-rename
  saves, local disks) or a ``<step>`` directory without its commit marker (in-place saves).
  """
  directory = os.path.join(workdir, "checkpoints")
  try:
    names = os.listdir(directory)
  except FileNotFoundError:
    return [], []
  committed, saving = [], []
  for name in names:
    if name.isdigit():
      marker = os.path.join(directory, name, checkpoint.COMMIT_MARKER)
      (committed if os.path.exists(marker) else saving).append(int(name))
    elif re.match(r"^\d+\D", name):
      saving.append(int(re.match(r"^\d+", name).group()))
  return committed, saving


# Where each launch is killed, relative to the step ``s`` it resumes from (checkpoints every
# 2 steps): (name, condition on the steps it logged, committed and is saving).
_KILL_POINTS = (
    ("mid-save (its first save started)", lambda s, logged, done, saving: any(
        n > s for n in saving)),
    ("right after a save committed", lambda s, logged, done, saving: any(n > s for n in done)),
    ("between two saves (step s+1 logged)", lambda s, logged, done, saving: any(
        n >= s + 1 for n in logged)),
    ("as the save of step s+2 starts (its metrics logged)", lambda s, logged, done, saving: any(
        n >= s + 2 for n in logged)),
    ("mid-save of its second checkpoint", lambda s, logged, done, saving: any(
        n >= s + 4 for n in saving)),
)


def test_sigkill_at_steps_and_mid_save_resumes_bit_identically(tmp_path):
  """SIGKILL at points keyed to the run's own progress (not wall-clock delays), including in
  the middle of asynchronous checkpoint saves; the resumed run ends bit-identical."""
  flags = ("--config.train.num_steps=24", "--config.train.checkpoint_every_steps=2",
           "--config.log.every_steps=1", "--config.log.sample_every_steps=5")
  env = killed_process_cache_env(tmp_path)
  # The uninterrupted run first: it fills the compilation cache the killed launches read.
  straight = str(tmp_path / "straight")
  result = run_main(f"--config={CONFIG}", f"--workdir={straight}", *flags, env_extra=env)
  assert result.returncode == 0, result.stderr[-3000:]

  workdir = str(tmp_path / "killed")
  kills = []
  for name, condition in _KILL_POINTS:
    committed, stale = _checkpoint_entries(workdir)  # stale: left by an earlier kill.
    start = max(committed, default=0)
    path = os.path.join(workdir, "metrics.jsonl")
    offset = os.path.getsize(path) if os.path.exists(path) else 0

    def progress():
      done, saving = _checkpoint_entries(workdir)
      return _logged_steps(workdir, offset), done, [n for n in saving if n not in stale]

    with open(tmp_path / f"stderr_{len(kills)}.txt", "w") as log:
      proc = _launch(workdir, *flags, env_extra=env, stderr=log)
    try:
      deadline = time.monotonic() + 300
      while not condition(start, *progress()):
        assert proc.poll() is None, f"the run ended before the kill point {name!r}"
        assert time.monotonic() < deadline, f"kill point {name!r} not reached"
        time.sleep(0.005)  # A save lasts 100+ ms; a busier poll takes the child's CPU.
      proc.kill()  # SIGKILL
      proc.wait()
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    kills.append((name, start, progress()[2]))
  # The mid-save kills did interrupt a save: its temporary directory was left behind.
  assert any(saving for name, _, saving in kills if "mid-save" in name), kills

  result = run_main(f"--config={CONFIG}", f"--workdir={workdir}", *flags, env_extra=env)
  assert result.returncode == 0, result.stderr[-3000:]
  config = load_config("dcgan_mnist", "smoke")
  # The files too, read without fairgen's restore (which could hide a bug on both sides).
  assert_same_final_state(workdir, straight, config, 24)
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  assert all(n.isdigit() for n in names), names  # partial directories are cleaned up
  assert not _checkpoint_entries(workdir)[1], names  # and every step directory is committed


def _wrap_step(monkeypatch, transform):
  """Makes every built objective pass its step's outputs through ``transform``."""
  original = experiment.build_objective

  def build(config, spec, for_training=True, dp=None):
    obj = original(config, spec, for_training, dp)

    def train_step(state, batch, rng):
      return transform(state, *obj.train_step(state, batch, rng))

    return dataclasses.replace(obj, train_step=train_step)

  monkeypatch.setattr(experiment, "build_objective", build)


def _poison_at(step_to_poison, monkeypatch):
  """Makes the objective's update non-finite at one step (1-based)."""

  def transform(state, new_state, metrics):
    bad = state["step"] + 1 == step_to_poison
    poison = lambda x: jnp.where(bad, x * jnp.nan, x) if x.dtype.kind == "f" else x
    new_state["params"] = jax.tree.map(poison, new_state["params"])
    return new_state, {**metrics, "loss": poison(metrics["loss"])}

  _wrap_step(monkeypatch, transform)


def test_nan_halts_naming_step_and_quantity_and_keeps_checkpoints(workdir, monkeypatch):
  _poison_at(3, monkeypatch)
  config = load_config("vae_mnist", "smoke", **{"train.num_steps": 6})
  with pytest.raises(robust.NonFiniteError, match="loss at step 3"):
    train.train_and_evaluate(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  assert ckpt.all_steps() == [2]
  monkeypatch.undo()
  step, leaves = final_state(workdir, config)
  assert step == 2 and all(np.all(np.isfinite(x)) for x in leaves if x.dtype.kind == "f")


def test_nan_skip_drops_the_update_and_counts_it(workdir, monkeypatch):
  _poison_at(3, monkeypatch)
  config = load_config("vae_mnist", "smoke", **{"train.num_steps": 6,
                                                "train.nan_policy": "skip"})
  summary = train.train_and_evaluate(config, workdir)
  assert summary["final_step"] == 6 and summary["scalars"]["nan_skipped"] == 1
  assert np.isfinite(summary["scalars"]["loss"])
  monkeypatch.undo()
  _, leaves = final_state(workdir, config)
  assert all(np.all(np.isfinite(x)) for x in leaves if x.dtype.kind == "f")


def test_nan_skip_halts_after_too_many_in_a_row(workdir, monkeypatch):
  _wrap_step(monkeypatch, lambda state, new_state, metrics: (
      new_state, {**metrics, "loss": metrics["loss"] * jnp.inf}))
  config = load_config("vae_mnist", "smoke", **{"train.nan_policy": "skip",
                                                "train.max_nan_skips": 2})
  with pytest.raises(robust.NonFiniteError, match="max_nan_skips=2"):
    train.train_and_evaluate(config, workdir)


def test_a_second_launch_on_a_workdir_is_refused(workdir):
  with robust.WorkdirLock(workdir):
    result = run_main(f"--config={CONFIG}", f"--workdir={workdir}")
  assert result.returncode == 2 and "in use by another fairgen process" in result.stderr
  with robust.WorkdirLock(workdir):  # released: can be taken again
    pass


def _damage(step_dir, how):
  """Damages the files of a checkpoint, keeping its commit markers (the damage is in the
  data): 'zero' empties its array store (OCDBT manifests and data files), 'delete' removes
  the data files, 'truncate' cuts every file to 3 bytes."""
  for root, _, files in os.walk(step_dir):
    in_data = os.path.basename(root) == "d"
    for name in files:
      path = os.path.join(root, name)
      if how == "truncate" and name not in (checkpoint.COMMIT_MARKER, "_CHECKPOINT_METADATA"):
        os.truncate(path, 3)
      elif how == "zero" and (in_data or name == "manifest.ocdbt"):
        os.truncate(path, 0)
      elif how == "delete" and in_data:
        os.remove(path)


def _assert_no_traceback(result):
  # Orbax left TensorStore reads of a failed restore running after it closed their event
  # loop: each printed "RuntimeError: Event loop is closed" with a traceback.
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "Event loop is closed" not in result.stderr, result.stderr[-3000:]


def test_damaged_checkpoints_are_moved_aside_with_one_line_each(workdir):
  """The newest damaged: one line, and the run resumes from the previous one; a read-only
  mode reports it and moves nothing; all damaged: one ``fairgen: error:`` line, exit 2. No
  traceback, and every damaged checkpoint is kept under checkpoints_damaged/."""
  config = load_config("vae_mnist", "smoke")
  train.train_and_evaluate(config, workdir)
  steps_dir = os.path.join(workdir, "checkpoints")
  _damage(os.path.join(steps_dir, "4"), "zero")
  args = ("--config=experiments/vae_mnist.py:smoke", f"--workdir={workdir}")
  result = run_main(*args, "--config.train.num_steps=6")
  assert result.returncode == 0, result.stderr[-3000:]
  _assert_no_traceback(result)
  lines = [line for line in result.stderr.splitlines() if "cannot be read" in line]
  assert len(lines) == 1 and f"{steps_dir}/4 cannot be read (ValueError: " in lines[0], lines
  assert f"Resumed from {steps_dir}/2." in result.stderr
  assert sorted(os.listdir(steps_dir)) == ["2", "4", "6"]

  _damage(os.path.join(steps_dir, "6"), "zero")  # Read-only: reported, not moved.
  with pytest.raises(checkpoint.WorkdirError, match=re.escape(f"{steps_dir}/6 cannot be read")):
    experiment.restore_checkpoint(experiment.setup(config), workdir)
  assert sorted(os.listdir(steps_dir)) == ["2", "4", "6"]

  _damage(os.path.join(steps_dir, "4"), "delete")
  _damage(os.path.join(steps_dir, "2"), "truncate")
  result = run_main(*args, "--config.train.num_steps=8")
  _assert_no_traceback(result)
  errors = [line for line in result.stderr.splitlines() if line.startswith("fairgen: error:")]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
  assert f"No checkpoint in {steps_dir} can be read: steps [6, 4, 2]" in errors[0]
  assert len([line for line in result.stderr.splitlines() if "cannot be read" in line]) == 3
  assert len(os.listdir(os.path.join(workdir, "checkpoints_damaged"))) == 4  # All kept.


def test_uncommitted_step_directory_is_ignored_and_removed(workdir):
  config = load_config("vae_mnist", "smoke")
  train.train_and_evaluate(config, workdir)
  os.makedirs(os.path.join(workdir, "checkpoints", "7"))  # e.g. a crash mid-save
  config.train.num_steps = 6
  summary = train.train_and_evaluate(config, workdir)
  assert summary["start_step"] == 4
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "7"))


def test_forcing_a_new_experiment_keeps_the_old_config(workdir):
  config = load_config("vae_mnist", "smoke")
  train.train_and_evaluate(config, workdir)
  config.objective.beta = 0.5
  with pytest.raises(checkpoint.WorkdirError, match="allow_new_experiment"):
    train.train_and_evaluate(config, workdir)
  config.train.num_steps = 5
  summary = train.train_and_evaluate(config, workdir, allow_new_experiment=True)
  assert summary["start_step"] == 4
  kept = [n for n in os.listdir(workdir) if n.startswith("config.") and n != "config.json"]
  assert len(kept) == 1


def test_a_replicated_save_writes_small_arrays_whole_and_splits_large_ones(tmp_path):
  """On 8 devices a replicated array under ``MIN_REPLICA_SLICE_BYTES`` per replica is saved
  by one replica, with no slice program compiled per (shape, device); a larger one is still
  split across the replicas. Both restore exactly."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rows = checkpoint.MIN_REPLICA_SLICE_BYTES // (4 * 128)  # 1/8 of it per replica: the minimum.
  state = {"small": np.arange(24 * 40, dtype=np.float32).reshape(24, 40),
           "large": np.arange(rows * 8 * 128, dtype=np.float32).reshape(rows * 8, 128)}
  state = jax.device_put(state, replicated)
  compiled = []

  class Record(logging.Handler):
    def emit(self, record):
      compiled.extend(re.findall(r"Compiling jit\(slice\) with global shapes and types "
                                 r"\(ShapedArray\(float32\[(\d+),(\d+)\]", record.getMessage()))

  handler = Record()
  logging.getLogger("jax").addHandler(handler)
  try:
    with jax.log_compiles(True):
      ckpt = checkpoint.Checkpointer(str(tmp_path))
      ckpt.save(1, state, force=True)
      ckpt.wait()
  finally:
    logging.getLogger("jax").removeHandler(handler)
  assert ("24", "40") not in compiled, compiled
  assert (str(rows * 8), "128") in compiled, compiled  # Still replica-parallel.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          state)
  restored = ckpt.restore(1, abstract)
  ckpt.close()
  for key in state:
    np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(state[key]))


def test_the_launchers_log_keeps_orbax_errors_and_drops_their_tracebacks():
  """``cli.QuietLibraries``: Orbax's error of a background commit (a peer died at its
  barrier) stays one log line naming the error, without the traceback that would sit
  beside the job's one-line explanation; Orbax's INFO chatter goes, other records stay."""
  from fairgen import cli
  quiet = cli.QuietLibraries()
  orbax = "/site-packages/orbax/checkpoint/_src/checkpointers/async_checkpointer.py"
  try:
    raise TimeoutError("Timed out while waiting for async_write_complete barrier.\nmore")
  except TimeoutError:
    record = logging.LogRecord("absl", logging.ERROR, orbax, 1, "Failed %s", ("commit",),
                               sys.exc_info())
  assert quiet.filter(record) and record.exc_info is None
  assert record.getMessage() == ("Failed commit (TimeoutError: Timed out while waiting for "
                                 "async_write_complete barrier.)")
  assert "Traceback" not in logging.Formatter().format(record)
  chatter = logging.LogRecord("absl", logging.INFO, orbax, 1, "Saving", (), None)
  ours = logging.LogRecord("absl", logging.INFO, "/work/fairgen/train.py", 1, "Step", (), None)
  assert not quiet.filter(chatter) and quiet.filter(ours)
