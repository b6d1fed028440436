"""Test setup: 8 fake CPU devices (before JAX initialises) and shared helpers."""

import os
import sys

import chex

# 8 fake devices share 2 cores: under load, a device thread can reach an XLA CPU collective
# rendezvous late, and XLA aborts the process after its default timeout. Give it time.
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""),
    "--xla_cpu_collective_call_terminate_timeout_seconds=1200",
    "--xla_cpu_collective_timeout_seconds=1200"]).strip()
chex.set_n_cpu_devices(8)

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, "experiments")


def load_config(name: str, arg: str | None = "smoke", **overrides):
  """Loads ``experiments/<name>.py`` with ``arg`` and dotted-key overrides."""
  from fairgen import config as config_lib
  config = config_lib.load_config_file(os.path.join(EXPERIMENTS, f"{name}.py"), arg)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture
def workdir(tmp_path):
  return str(tmp_path / "workdir")


def run_main(*args: str, env_extra: dict | None = None, timeout: int = 300):
  """Runs ``python -m fairgen.main`` in a fresh process; returns CompletedProcess."""
  import subprocess
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "fairgen.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def final_state(workdir: str, config):
  """(step, list of NumPy leaves) of the newest checkpoint in ``workdir``."""
  import jax
  import numpy as np
  from fairgen import checkpoint, train
  exp = train.setup(config)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    state, step = train.restore_or_init(exp, ckpt)
  finally:
    ckpt.close()
  return step, [np.asarray(x) for x in jax.tree.leaves(state)]
