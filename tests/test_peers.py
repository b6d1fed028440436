"""fairgen.peers: the dead/hung-peer watchdog's decisions, on a fake key-value store.

The multi-process jobs that kill and stop real processes are in test_multiprocess.py; these
pin the rules with a clock the test controls.
"""

import io
import os
import signal
import subprocess
import sys
import threading
import time

import ml_collections
import pytest

from conftest import REPO
from fairgen import config as config_lib
from fairgen import peers


class FakeStore:
  """The coordination service's key-value store, as the watchdog uses it."""

  def __init__(self):
    self.values, self.down, self.lock = {}, False, threading.Lock()

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.down:
      raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")
    with self.lock:
      assert allow_overwrite or key not in self.values
      self.values[key] = value

  def key_value_dir_get(self, prefix):
    if self.down:
      raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")
    with self.lock:
      return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def _watchdog(tmp_path, timeout=10.0, process=0, processes=3, store=None):
  exits = []
  dog = peers.Watchdog(str(tmp_path), timeout, client=store or FakeStore(), process=process,
                       processes=processes, out=io.StringIO(), exit=exits.append)
  return dog, exits


def test_a_peer_is_stopped_once_its_counter_stands_still_for_the_timeout(tmp_path):
  dog, _ = _watchdog(tmp_path)
  t = time.monotonic()
  for i in range(16):  # Process 1 beats on; process 2 stops after its third beat.
    dog.observe({"0": str(i), "1": str(i), "2": str(min(i, 3))}, t + i)
    expected = 2 if i - 3 > 10 else None
    assert dog.check(t + i) == expected, i
  # Judged on the reads, not the clock: a late judge (this process paused) with no new
  # read blames nobody but a silent store.
  dog2, _ = _watchdog(tmp_path)
  dog2.observe({"1": "5", "2": "5"}, t)
  assert dog2.check(t + 9.9) is None
  assert dog2.check(t + 10.1) == 0  # No answer from the store for longer than the timeout.


def test_done_peers_are_accepted_and_a_silent_store_means_process_0(tmp_path):
  dog, _ = _watchdog(tmp_path, process=1)
  t = time.monotonic()
  dog.observe({"0": "1", "2": peers.DONE}, t)
  dog.observe({"0": "2", "2": peers.DONE}, t + 20)
  assert dog.check(t + 20) is None  # Process 2 finished normally; process 0 beats.
  assert dog.check(t + 31) == 0  # No successful read for 11 s > 10 s.
  # A verdict another process published is taken at once (all survivors name one culprit).
  dog.observe({"0": "3", "2": peers.DONE, peers.VERDICT: "3"}, t + 32)
  assert dog.check(t + 32) == 3


def test_the_message_names_the_peer_step_and_last_committed_checkpoint(tmp_path):
  dog, exits = _watchdog(tmp_path, timeout=5)
  ckpt = tmp_path / "checkpoints"
  (ckpt / "10").mkdir(parents=True)
  (ckpt / "10" / "commit_success.txt").write_text("")
  (ckpt / "15").mkdir()  # Written, never committed (the failure interrupted it).
  (ckpt / "15.orbax-checkpoint-tmp-123").mkdir()
  peers.note_step(17)
  dog.fail(1)
  line = dog.out.getvalue()
  assert line == ("fairgen: error: process 1 stopped responding at step 17; the last committed "
                  "checkpoint is step 10; run the same command to resume (detected by process "
                  "0 after mesh.peer_timeout_seconds=5).\n")
  assert exits == [peers.EXIT_STATUS] and dog.verdict == 1
  empty, _ = _watchdog(tmp_path / "new")
  peers.note_step(None)  # Not training (evaluate, sample): no step is named.
  assert empty.message(2).startswith("fairgen: error: process 2 stopped responding; no "
                                     "checkpoint is committed yet; run the same command")


def test_the_threads_stop_a_job_whose_peer_went_silent_and_not_a_healthy_one(tmp_path):
  """The real threads on a fake store: two healthy watchdogs beat for 3 s without a
  verdict; then one stops beating (as a killed process does) and the other ends its
  process within timeout + 2 intervals (+ process 0's wait for the others to read it)."""
  store = FakeStore()
  a, exits_a = _watchdog(tmp_path, timeout=1.0, process=0, processes=2, store=store)
  b, exits_b = _watchdog(tmp_path, timeout=1.0, process=1, processes=2, store=store)
  a.start(), b.start()
  time.sleep(3.0)
  assert a.verdict is None and b.verdict is None and not exits_a and not exits_b
  b.stop(finished=False)  # Silent, not done: like a SIGKILL.
  t = time.monotonic()
  while not exits_a and time.monotonic() - t < 5:
    time.sleep(0.05)
  assert exits_a == [peers.EXIT_STATUS] and a.verdict == 1
  # Detection within timeout + 2 heartbeats; process 0 then waits 2 heartbeats + 0.5 s for
  # the others to read its published verdict.
  assert time.monotonic() - t <= 1.0 + 4 * a.interval + 0.5 + 0.5
  assert store.values[peers.HEARTBEAT_DIR + peers.VERDICT] == "1"
  a.stop(finished=False)
  # A peer that finished normally is not a failure.
  store = FakeStore()
  c, exits_c = _watchdog(tmp_path, timeout=1.0, process=0, processes=2, store=store)
  d, _ = _watchdog(tmp_path, timeout=1.0, process=1, processes=2, store=store)
  c.start(), d.start()
  time.sleep(1.0)
  d.stop(finished=True)
  time.sleep(2.5)
  assert c.verdict is None and not exits_c
  store.down = True  # Process 0's service went away.
  time.sleep(2.5)
  assert c.verdict == 0 and exits_c == [peers.EXIT_STATUS]
  c.stop(finished=False)


def test_the_bound_is_configurable_and_checked():
  assert peers.interval_for(15) == 1.5 and peers.interval_for(2) == 0.5
  assert peers.jax_heartbeat_seconds(10) == 100  # JAX's default, above fairgen's 12 s.
  assert peers.jax_heartbeat_seconds(60) == 3 * (60 + 12)
  assert config_lib.base_config().mesh.peer_timeout_seconds == config_lib.PEER_TIMEOUT_SECONDS
  for bad in (0, -1, "10", True):
    mesh = ml_collections.ConfigDict(dict(data=-1, peer_timeout_seconds=bad))
    with pytest.raises(config_lib.ConfigError, match="mesh.peer_timeout_seconds"):
      config_lib.validate_mesh(mesh)
  config_lib.validate_mesh(ml_collections.ConfigDict(dict(data=-1, peer_timeout_seconds=2)))


_TERMINATE_SCRIPT = """
import ctypes, sys, threading, time
sys.path.insert(0, {tests!r})
from test_peers import FakeStore
from fairgen import peers
store = FakeStore()
dog = peers.Watchdog({workdir!r}, 1.0, client=store, process=0, processes=2).start()
store.key_value_set("fairgen/heartbeat/1", "1", allow_overwrite=True)  # Process 1 is up...
beats = {beats}  # ... and beats on (a crash of our own), or falls silent (a dead peer).
def beat():
  for i in range(2, 200):
    if beats:
      store.key_value_set("fairgen/heartbeat/1", str(i), allow_overwrite=True)
    time.sleep(0.2)
threading.Thread(target=beat, daemon=True).start()
time.sleep(0.5)
# What gloo's reader thread does when a peer dies mid-message: throw with nobody to catch.
thread = threading.Thread(target=ctypes.CDLL("libstdc++.so.6")._ZSt9terminatev)
thread.start()
thread.join()
"""


@pytest.mark.parametrize("peer_beats", [False, True])
def test_a_cxx_terminate_waits_for_the_verdict_or_aborts_as_before(tmp_path, peer_beats):
  """std::terminate on a C++-called thread (gloo's abort when a peer died mid-message): with
  a silent peer, the judge's one line and status 75 replace the abort; with a live peer (a
  crash of our own), C++'s handler runs after the bound, as without fairgen."""
  script = _TERMINATE_SCRIPT.format(tests=os.path.dirname(__file__), workdir=str(tmp_path),
                                    beats=peer_beats)
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=60, cwd=REPO)
  if peer_beats:
    assert done.returncode == -signal.SIGABRT, done.stderr[-2000:]
    assert "terminate called without an active exception" in done.stderr
    assert "stopped responding" not in done.stderr
  else:
    assert done.returncode == peers.EXIT_STATUS, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        "fairgen: error: process 1 stopped responding; no checkpoint is committed yet"), \
        done.stderr[-2000:]
    assert "terminate called" not in done.stderr
