"""gs:// workdirs against a real GCS server started here (fake-gcs-server, the Go emulator).

Both of fairgen's paths to storage are pointed at it: the file path (etils.epath/gcsfs and
google-cloud-storage, through ``STORAGE_EMULATOR_HOST``) and the checkpoint path (Orbax's
TensorStore, through ``TENSORSTORE_GCS_HTTP_URL``, which ``fairgen.storage`` sets from it).
"""

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import (REPO, final_state, killed_process_cache_env, load_config, run_main,
                      subprocess_env)
import fairgen
from fairgen import checkpoint, data, robust, storage
from fairgen.classifiers import backbones, fit
from fairgen.fairness import importance

CONFIG = "experiments/dcgan_mnist.py:smoke"


@pytest.mark.parametrize("where", ["local", "gs"])
def test_storage_functions_behave_alike_on_disk_and_on_gcs(where, gcs, tmp_path):
  root = str(tmp_path) if where == "local" else f"{gcs}/helpers"
  path = os.path.join(root, "a", "b.json")
  storage.write_atomic(path, '{"x": 1}')
  storage.write_atomic(path, '{"x": 2}')  # Replaced, not appended.
  assert json.loads(storage.read_text(path)) == {"x": 2}
  assert storage.isfile(path) and storage.isdir(os.path.join(root, "a"))
  assert not storage.exists(os.path.join(root, "missing"))
  log = os.path.join(root, "m.jsonl")
  storage.Appender(log).append("1\n")
  appender = storage.Appender(log)  # A resumed run keeps what the file held.
  appender.append("2\n")
  appender.append("3\n")
  assert storage.read_text(log) == "1\n2\n3\n"
  storage.save_npy(os.path.join(root, "w.npy"), np.arange(5.0))
  np.testing.assert_array_equal(storage.load_npy(os.path.join(root, "w.npy")), np.arange(5.0))
  storage.move(os.path.join(root, "a"), os.path.join(root, "moved", "a"))
  assert not storage.exists(path)
  assert storage.read_text(os.path.join(root, "moved", "a", "b.json")) == '{"x": 2}'
  assert storage.listdir(root) == ["m.jsonl", "moved", "w.npy"]
  storage.rmtree(os.path.join(root, "moved"))
  assert storage.listdir(root) == ["m.jsonl", "w.npy"]


def test_an_uncommitted_step_on_gcs_is_removed(gcs):
  directory = f"{gcs}/partial/checkpoints"
  storage.write_atomic(f"{directory}/7/_CHECKPOINT_METADATA", "{}")  # A save cut short.
  storage.write_atomic(f"{directory}/5/commit_success.txt", "ok")
  assert checkpoint.remove_uncommitted(directory) == ["7"]
  assert storage.listdir(directory) == ["5"]


def test_unsupported_paths_are_refused():
  with pytest.raises(storage.StorageError, match="only local paths and gs://"):
    storage.normalize("s3://bucket/run")
  with pytest.raises(storage.StorageError, match="needs a bucket"):
    storage.normalize("gs:///run")
  assert storage.normalize("gs://b/run/") == "gs://b/run"


def _lease(path, seconds, host=None):
  lock = robust.LeaseLock(path, seconds)
  if host:
    lock.owner["host"] = host  # Another machine.
  return lock


def test_lease_lock_excludes_a_live_holder_and_takes_over_a_dead_one(gcs):
  path = f"{gcs}/lease/.lock"
  a = _lease(path, 2.0, host="host-a")
  a.acquire()
  # A live holder renews its lease: a second run notices the renewal and gives up at once.
  start = time.monotonic()
  with pytest.raises(robust.WorkdirLockedError, match="renewed its lease"):
    _lease(path, 2.0, host="host-b").acquire(poll_seconds=0.1)
  assert time.monotonic() - start < 2.0
  # The holder dies (its renewals stop): after one silent lease period, B takes over.
  a._stop.set()
  a._thread.join()
  b = _lease(path, 2.0, host="host-b")
  start = time.monotonic()
  b.acquire(poll_seconds=0.1)
  assert time.monotonic() - start >= 2.0
  # A comes back (it was only stalled): its next renewal finds B's lease and it stands down.
  a._stop.clear()
  renewals = threading.Thread(target=a._renew)
  renewals.start()
  renewals.join(timeout=4.0)  # It stops by itself at its first renewal (half a second).
  a._stop.set()
  renewals.join()
  with pytest.raises(robust.WorkdirLockedError, match="took over"):
    a.check()
  b.check()
  b.release()
  assert not storage.exists(path)
  # A dead process on this machine is taken over at once (a restart after SIGKILL).
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  storage.write_atomic(path, json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                         "lease_seconds": 60.0}))
  c = _lease(path, 60.0)
  start = time.monotonic()
  c.acquire()
  assert time.monotonic() - start < 5.0
  c.release()


def test_backbones_and_importance_weights_live_on_gcs(gcs, monkeypatch):
  params, info = _tiny_classifier()
  directory = f"{gcs}/backbone"
  backbones.save_classifier(directory, params, info)
  loaded = backbones.load_classifier(directory)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(loaded.variables)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(FileExistsError):
    backbones.save_classifier(directory, params, info)

  fits = []

  def fake_fit(config, source):
    fits.append(1)
    return np.linspace(0.5, 2.0, len(source)).astype(np.float32), {"diagnostics": {}}

  monkeypatch.setattr(importance, "fit_importance_weights", fake_fit)
  source = data.load({"name": "mnist_5k"}, "train")
  first = importance.cached_weights(None, source, f"{gcs}/weights_run")
  again = importance.cached_weights(None, source, f"{gcs}/weights_run")
  assert len(fits) == 1  # The second call read the weights the first wrote to the bucket.
  np.testing.assert_array_equal(first, again)


def _tiny_classifier():
  """A mnist_5k classifier of 2 steps (its accuracy is not the point)."""
  return fit.train_classifier(data.load({"name": "mnist_5k"}, "train"),
                              data.load({"name": "mnist_5k"}, "test"), steps=2, batch_size=16,
                              width=4, feature_dim=8, augment=False)


def _objects(prefix):
  import gcsfs
  fs = gcsfs.GCSFileSystem()
  return sorted(o[len(prefix) - len("gs://") + 1:] for o in fs.find(prefix[len("gs://"):]))


def test_gs_workdir_resumes_after_sigkill_bit_identically_then_evaluates_and_samples(
    gcs, tmp_path):
  """The DCGAN smoke job on a gs:// workdir is SIGKILLed mid-save, resumes to the same final
  state as an uninterrupted local run, then evaluates and samples from the bucket."""
  backbone = f"{gcs}/mnist_backbone"  # Evaluation reads its backbone from the bucket too.
  backbones.save_classifier(backbone, *_tiny_classifier())
  flags = ("--config.train.num_steps=10", "--config.train.checkpoint_every_steps=2",
           "--config.log.every_steps=1", "--config.log.sample_every_steps=5",
           "--config.eval.every_steps=5", f"--config.eval.backbone_dir={backbone}",
           "--config.eval.num_samples=64", "--config.eval.batch_size=32",
           "--config.eval.kid_subsets=2", "--config.eval.kid_subset_size=32",
           "--config.eval.is_splits=2")
  env = killed_process_cache_env(tmp_path)
  straight = str(tmp_path / "straight")
  result = run_main(f"--config={CONFIG}", f"--workdir={straight}", *flags, env_extra=env)
  assert result.returncode == 0, result.stderr[-3000:]

  workdir = f"{gcs}/run"
  ckpt_dir = f"{workdir}/checkpoints"
  proc = subprocess.Popen(
      [sys.executable, "-m", "fairgen.main", f"--config={CONFIG}", f"--workdir={workdir}",
       *flags], cwd=REPO, env=subprocess_env(env), stdout=subprocess.DEVNULL,
      stderr=open(tmp_path / "killed.txt", "w"))
  try:
    # Kill once a step directory exists without its commit marker: in the middle of a save
    # (on GCS, Orbax writes in place and commits with commit_success.txt).
    deadline = time.monotonic() + 240
    while True:
      names = [n for n in storage.listdir(ckpt_dir) if n.isdigit() and int(n) >= 4]
      if any(not storage.exists(f"{ckpt_dir}/{n}/commit_success.txt") for n in names):
        break
      assert proc.poll() is None, open(tmp_path / "killed.txt").read()[-3000:]
      assert time.monotonic() < deadline
      time.sleep(0.02)
    proc.kill()
  finally:
    proc.kill()
    proc.wait()
  assert storage.exists(f"{workdir}/.lock")  # SIGKILL left the lease object behind.

  result = run_main(f"--config={CONFIG}", f"--workdir={workdir}", *flags, env_extra=env)
  assert result.returncode == 0, result.stderr[-3000:]
  config = load_config("dcgan_mnist", "smoke")
  (step_a, a), (step_b, b) = final_state(workdir, config), final_state(straight, config)
  assert step_a == step_b == 10
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  objects = _objects(workdir)
  assert ".lock" not in objects  # Released at the end.
  assert {"config.json", "metrics.jsonl", "samples/step_000005.png", "samples/step_000010.png",
          "checkpoints/10/commit_success.txt", "eval/step_000005.json",
          "eval/step_000010.json", "best.json"} <= set(objects)
  best = json.loads(storage.read_text(f"{workdir}/best.json"))
  assert f"best/{best['step']}/commit_success.txt" in objects
  assert any(o.startswith("events.out.tfevents") for o in objects)
  # The step the kill interrupted was recognised as uncommitted and removed (not quarantined
  # as damaged), and every step directory left is committed.
  steps_saved = {o.split("/")[1] for o in objects if o.startswith("checkpoints/")}
  assert all(f"checkpoints/{n}/commit_success.txt" in objects for n in steps_saved)
  assert not any(o.startswith("checkpoints_damaged") for o in objects)
  steps = [json.loads(line)["step"] for line in
           storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  assert steps[0] == 1 and steps[-1] == 10 and set(steps) == set(range(1, 11))

  storage.remove(f"{workdir}/eval/step_000010.json")  # Written again by --mode=evaluate.
  for mode in ("evaluate", "sample"):
    result = run_main(f"--config={CONFIG}", f"--workdir={workdir}", *flags,
                      f"--mode={mode}", env_extra=env)
    assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(storage.read_text(f"{workdir}/eval/step_000010.json"))
  assert report["step"] == 10 and report["checkpoint"] == "latest" and "fid" in report["metrics"]
  assert report["provenance"]["backbone"]["path"] == backbone
  assert "sample/step_000010/grid.png" in _objects(workdir)
  # The Python API reads the same bucket: its samples are --mode=sample's (to float32
  # rounding: that process ran on its own device setup; tests/test_api.py checks bit for
  # bit within one).
  with np.load(io.BytesIO(storage.read_bytes(f"{workdir}/sample/step_000010/grid.npz"))) as f:
    written = f["images"]
  run = fairgen.load(workdir)
  assert run.steps[-1] == 10
  np.testing.assert_allclose(run.sample(len(written)), written, rtol=0, atol=1e-5)


def test_bad_gs_workdirs_fail_in_one_line(gcs):
  for workdir, message in ((f"gs://no-such-bucket-{os.getpid()}/run", "cannot be written"),
                           ("s3://bucket/run", "only local paths and gs://")):
    result = run_main(f"--config={CONFIG}", f"--workdir={workdir}")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fairgen: error:") and message in last, last
    assert "Traceback" not in result.stderr
