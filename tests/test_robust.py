"""Robustness with real processes: preemption, SIGKILL anywhere, NaNs, locks, damaged files."""

import dataclasses
import os
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, final_state, load_config, run_main
from fairgen import checkpoint, experiment, robust, train

CONFIG = "experiments/dcgan_mnist.py:smoke"


def _launch(workdir, *extra):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen(
      [sys.executable, "-m", "fairgen.main", f"--config={CONFIG}", f"--workdir={workdir}",
       *extra], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


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


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
  workdir = str(tmp_path / "w")
  proc = _launch(workdir, "--config.train.num_steps=100000",
                 "--config.train.checkpoint_every_steps=100000", "--config.log.every_steps=1000")
  lines = _wait_for(proc, "First step")
  time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, "".join(lines[-20:])
  assert any("stopped by a signal" in line for line in lines)
  steps = checkpoint.Checkpointer(workdir, read_only=True).all_steps()
  assert len(steps) == 1 and 0 < steps[0] < 100000  # saved at the step it stopped at


def test_sigkill_at_random_points_resumes_bit_identically(tmp_path):
  flags = ("--config.train.num_steps=24", "--config.train.checkpoint_every_steps=2",
           "--config.log.every_steps=1", "--config.log.sample_every_steps=5")
  killed, rnd = 0, random.Random(0)
  workdir = str(tmp_path / "killed")
  for _ in range(12):
    proc = _launch(workdir, *flags)
    _wait_for(proc, "First step")
    time.sleep(rnd.uniform(0.0, 0.8))
    if proc.poll() is not None:
      break
    proc.kill()  # SIGKILL, possibly in the middle of an async save
    proc.wait()
    killed += 1
    if killed >= 5:
      break
  assert killed >= 5
  result = run_main(f"--config={CONFIG}", f"--workdir={workdir}", *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  straight = str(tmp_path / "straight")
  assert run_main(f"--config={CONFIG}", f"--workdir={straight}", *flags).returncode == 0
  config = load_config("dcgan_mnist", "smoke")
  (step_a, a), (step_b, b) = final_state(workdir, config), final_state(straight, config)
  assert step_a == step_b == 24
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  assert all(n.isdigit() for n in names), names  # partial directories are cleaned up


def _wrap_step(monkeypatch, transform):
  """Makes every built objective pass its step's outputs through ``transform``."""
  original = experiment.build_objective

  def build(config, spec, for_training=True):
    obj = original(config, spec, for_training)

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


def test_damaged_latest_checkpoint_falls_back_to_the_previous(workdir):
  config = load_config("vae_mnist", "smoke")
  train.train_and_evaluate(config, workdir)
  latest = os.path.join(workdir, "checkpoints", "4")
  for root, _, files in os.walk(latest):
    for name in files:
      if name not in (checkpoint.COMMIT_MARKER, "_CHECKPOINT_METADATA"):
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(3)  # keep the commit marker: the damage is in the data
  config.train.num_steps = 6
  summary = train.train_and_evaluate(config, workdir)
  assert summary["start_step"] == 2 and summary["final_step"] == 6
  assert len(os.listdir(os.path.join(workdir, "checkpoints_damaged"))) == 1  # kept


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
