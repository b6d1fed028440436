"""``fairgen.main``'s persistent compilation cache (``fairgen/compile_cache.py``).

A warm run loads every program and trains bit for bit as the cold one did; a run that
differs in what its programs compute (a learning rate, ``train.xla_options``, the device
count) compiles its own and trains as it would without a cache: if the key left any of them
out, that run would load the first run's train step and repeat its losses.
"""

from __future__ import annotations

import os
import re

import pytest

from conftest import TEST_XLA_FLAGS, TIMING_KEYS, metric_records, run_main

CONFIG = "--config=experiments/dcgan_mnist.py:smoke"
STEPS = "--config.train.num_steps=3"
_LINE = re.compile(r"Compilation cache (\S+): (\d+) program\(s\) loaded, (\d+) compiled\.")


def _train(workdir: str, cache: str, *overrides: str, env: dict | None = None
           ) -> tuple[dict[str, int], dict]:
  """Trains the smoke DCGAN for 3 steps: ({loaded, compiled}, the last step's scalars)."""
  proc = run_main(CONFIG, STEPS, f"--workdir={workdir}", f"--compilation_cache={cache}",
                  "--config.log.every_steps=1", *overrides, env_extra=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  found = _LINE.findall(proc.stderr)
  counts = ({"loaded": int(found[-1][1]), "compiled": int(found[-1][2])} if found else {})
  assert (found[-1][0] if found else None) == (None if cache == "none" else cache), proc.stderr[-2000:]
  records = metric_records(workdir)
  last = {k: v for k, v in records[max(records)].items() if k not in TIMING_KEYS}
  return counts, last


@pytest.fixture(scope="module")
def first(tmp_path_factory):
  """A cache that one cold run filled: (its directory, {loaded, compiled}, its scalars)."""
  tmp = tmp_path_factory.mktemp("compile_cache")
  cache = str(tmp / "xla")
  counts, result = _train(str(tmp / "cold"), cache)
  return cache, counts, result


def test_a_warm_run_loads_every_program_and_trains_as_the_cold_one(first, tmp_path):
  cache, cold, cold_result = first
  assert cold["compiled"] >= 5 and cold["loaded"] == 0
  assert len(os.listdir(cache)) >= cold["compiled"]
  warm, warm_result = _train(str(tmp_path / "warm"), cache)
  assert warm == {"loaded": cold["compiled"], "compiled": 0}
  assert warm_result == cold_result
  off, off_result = _train(str(tmp_path / "off"), "none")
  assert off == {} and off_result == cold_result


@pytest.mark.parametrize("change,overrides,env,shared", [
    ("learning rate", ["--config.optim.disc.lr=3e-4"], None, True),
    ("xla options", ["--config.train.xla_options="], None, True),
    ("device count", ["--config.mesh.data=2"],
     {"XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=2"}, False),
])
def test_what_changes_a_program_is_in_the_key(first, tmp_path, change, overrides, env, shared):
  """The changed run compiles what it changed, and its losses are its own: with the
  learning rate or the XLA options left out of the key, it would load the first run's train
  step and repeat the first run's losses exactly. A run that changes only its optimizer or
  its XLA options still loads the programs it shares with the first (initializers, the
  data's); on other devices every program is another (the device assignment is in the key)."""
  cache, _, first_result = first
  counts, changed = _train(str(tmp_path / "changed"), cache, *overrides, env=env)
  assert counts["compiled"] >= 1 and (counts["loaded"] >= 1) == shared, (change, counts)
  assert changed != first_result, change


@pytest.mark.parametrize("cache,fragment", [
    ("gs://bucket/xla", "the compilation cache must be a local directory"),
    ("/proc/no/such/dir", "cannot create it"),
])
def test_an_unusable_cache_directory_is_one_error_line(tmp_path, cache, fragment):
  """Refused before anything compiles (against an unreachable bucket JAX would retry for
  minutes per program, then compile anyway)."""
  proc = run_main(CONFIG, f"--workdir={tmp_path / 'w'}", f"--compilation_cache={cache}")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert lines[-1].startswith(f"fairgen: error: --compilation_cache={cache}: ") and \
      fragment in lines[-1], lines[-1]
  assert not (tmp_path / "w").exists()
