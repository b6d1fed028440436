"""Multi-process jobs with real processes: tools/launch_local.py starts 2 JAX processes x 4
fake CPU devices (one 8-device job, gloo collectives) of ``fairgen.main``.

Each job is compared with the same config run in this process (on 1 device, or 1 process x
8 devices where the process count is the point): the same numbers within the 1-vs-8
tolerance. Runs are tiny; each launch costs two interpreter starts and two compilations.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import REPO, TIMING_KEYS, final_state, load_config, run_main, subprocess_env
from fairgen import checkpoint, data, fairness, train

LAUNCH = os.path.join(REPO, "tools", "launch_local.py")
WORKER = os.path.join(REPO, "tests", "multiprocess_worker.py")


def _command(args, record=None, processes=2, devices=4):
  command = [sys.executable, LAUNCH, f"--processes={processes}",
             f"--devices_per_process={devices}", "--", sys.executable,
             WORKER if record else "-m", *([] if record else ["fairgen.main"]), *args]
  env = subprocess_env()
  if record:
    os.makedirs(record, exist_ok=True)
    env["FAIRGEN_TEST_RECORD"] = str(record)
  return command, env


def launch(*args, record=None, processes=2, devices=4, timeout=400):
  """Runs a job to the end; returns (exit status, {process index: its output lines}, the
  whole output)."""
  command, env = _command(args, record, processes, devices)
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)
  return done.returncode, _by_process(done.stdout), done.stdout + done.stderr


def _by_process(text):
  lines = {}
  for line in text.splitlines():
    if line.startswith("[") and "] " in line:
      index, _, rest = line[1:].partition("] ")
      if index.isdigit():
        lines.setdefault(int(index), []).append(rest)
  return lines


def _records(directory):
  out = {}
  for p in (0, 1):
    with open(os.path.join(directory, f"process_{p}.json")) as f:
      out[p] = json.load(f)
  return out


def _job_writes(record, workdir):
  """{process: the files under ``workdir`` it opened for writing}; a file written atomically
  (``storage.write_atomic``: a temporary ``NAME.XXXXXXXX.tmp``, then renamed) counts as
  NAME."""
  return {p: {re.sub(r"\.[a-z0-9_]{8}\.tmp$", "", os.path.relpath(w, workdir))
              for w in r["writes"] if w.startswith(workdir + "/")}
          for p, r in _records(record).items()}


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _assert_states_close(a, b, exact=False):
  for x, y in zip(a, b):
    if exact or x.dtype.kind != "f":
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _flags(name, steps, every):
  return [f"--config=experiments/{name}.py:smoke" if ":" not in name else
          f"--config=experiments/{name}", f"--config.train.num_steps={steps}",
          f"--config.train.checkpoint_every_steps={every}", f"--config.log.every_steps={every}"]


@pytest.mark.parametrize("name", ["dcgan_mnist", "fair_mnist.py:method=resample,model=vae,smoke"])
def test_two_processes_match_one_process(name, tmp_path, request):
  """2 processes x 4 devices = 1 device; each process reads only its half of every batch;
  only process 0 writes logs and samples; the 2-process checkpoint restores on 1 device.
  The VAE runs with a fairness method (resample: the sampler decides what each process
  reads); the plain VAE's 2-process jobs are the resume test's.

  The VAE jobs run in the RNG mode of training (``partitionable_rng``; the VAE draws its
  latent noise sharded over the batch); the DCGAN job, whose compilation takes twice as
  long in that mode, in the suite's (test_train checks the DCGAN on 1 vs 8 devices in it).
  """
  if "vae" in name:
    request.getfixturevalue("partitionable_rng")
  steps = 4
  config_name = name.split(".py")[0]
  arg = name.split(":", 1)[1] if ":" in name else "smoke"
  job = str(tmp_path / "job")
  record = tmp_path / "record"
  code, lines, text = launch(*_flags(name, steps, steps), f"--workdir={job}", record=record)
  assert code == 0, text[-4000:]
  # The in-process reference on 1 device (test_train checks 1 device = 8 devices).
  config = load_config(config_name, arg, **{
      "train.num_steps": steps, "train.checkpoint_every_steps": steps,
      "log.every_steps": steps})
  scalars = train.train_and_evaluate(config, str(tmp_path / "one"))["scalars"]
  logged = _metrics(job)
  assert [r["step"] for r in logged] == [steps]  # One writer: no duplicated lines.
  for key, value in scalars.items():
    if key not in TIMING_KEYS:
      np.testing.assert_allclose(logged[0][key], value, rtol=1e-5, err_msg=key)
  # The 2-process checkpoint, restored here on 1 device.
  (step, state), (_, reference) = final_state(job, config), final_state(str(tmp_path / "one"),
                                                                        config)
  assert step == steps
  _assert_states_close(state, reference)

  rec = _records(record)
  assert rec[0]["process_count"] == rec[1]["process_count"] == 2
  # Each process read its own half of each global batch, and nothing else.
  source = data.load(config.data, config.data.split)
  global_batch = config.train.batch_size
  _, sampler = fairness.prepare(config, source, str(tmp_path / "prepare"), global_batch)
  sampler = sampler or data.IndexSampler(len(source), global_batch, config.seed)
  for p in (0, 1):
    half = slice(p * global_batch // 2, (p + 1) * global_batch // 2)
    assert rec[p]["reads"] == [sampler.indices(s)[half].tolist() for s in range(steps)]
  # Logs, TensorBoard events and sample grids come from process 0 only.
  written = _job_writes(record, job)
  assert {"metrics.jsonl", "config.json"} <= written[0], written[0]
  assert any(w.startswith("events.out.tfevents") for w in written[0])
  assert f"samples/step_{steps:06d}.png" in written[0]
  # Process 1 wrote its part of the checkpoint (Orbax: its array metadata), and nothing else.
  assert written[1] and all(w.startswith("checkpoints/") for w in written[1]), written[1]
  assert any(w.endswith("array_metadatas/process_1") for w in written[1]), written[1]
  # Each process saw the whole job: 2 processes, 8 devices.
  for p in (0, 1):
    assert any("2 process(es), 8 device(s)" in line for line in lines[p]), lines[p][-20:]


def _sigterm_one_process(flags):
  """Starts a 2-process job, SIGTERMs process 1 once both ran a step; returns the step at
  which each process reports that it stopped (and the job's output)."""
  command, env = _command(flags)
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  out, first_steps = [], set()
  started = threading.Event()

  def read():
    for line in proc.stdout:
      out.append(line)
      if "First step" in line:
        first_steps.add(line[:3])
        if len(first_steps) == 2:
          started.set()
    started.set()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    assert started.wait(300) and len(first_steps) == 2, "".join(out[-40:])
    time.sleep(1.0)
    pids = [int(line.rsplit("pid ", 1)[1]) for line in out if "[launch_local] process" in line]
    assert len(pids) == 2, "".join(out[-40:])
    os.kill(pids[1], signal.SIGTERM)
    assert proc.wait(timeout=240) == 0, "".join(out[-40:])
  finally:
    if proc.poll() is None:
      proc.kill()
  reader.join(timeout=10)
  stopped = _by_process("".join(out))
  return [[int(line.split("at step ")[1].split(";")[0]) for line in stopped[p]
           if "stopped by a signal at step" in line] for p in (0, 1)], "".join(out[-40:])


def test_sigterm_resume_across_process_counts_then_evaluate_and_sample(tmp_path,
                                                                       partitionable_rng):
  """A preemption notice that reaches one host (SIGTERM to process 1 only): through JAX's
  preemption sync point both processes stop after the same step, its checkpoint commits,
  both exit 0. Resumed on 2 processes, the job ends bit-identical to an uninterrupted
  2-process run; resumed on 1 process, within the 1-vs-8 tolerance. (A 1-process checkpoint
  resumed on 2 processes restores through the same sharded-target path as the 2-process
  resume here.) Evaluation and sampling run as 2-process jobs; process 0 writes
  their files."""
  name, never = "vae_mnist", 100000
  paths = {k: str(tmp_path / k) for k in ("split", "straight", "two_then_one")}
  steps, tail = _sigterm_one_process(
      [*_flags(name, never, never), "--config.log.every_steps=1000",
       f"--workdir={paths['split']}"])
  assert len(steps[0]) == 1 and steps[0] == steps[1], tail
  stop = steps[0][0]
  assert checkpoint.Checkpointer(paths["split"], read_only=True).all_steps() == [stop]
  shutil.copytree(paths["split"], paths["two_then_one"])

  def job(workdir, *extra, record=None):
    code, lines, text = launch(*_flags(name, stop + 2, never), "--config.log.every_steps=1",
                               f"--workdir={workdir}", *extra, record=record)
    assert code == 0, text[-4000:]
    return lines

  lines = job(paths["split"])
  assert any("Resumed from" in line and line.endswith(f"/{stop}.") for line in lines[0]), \
      lines[0][-20:]
  assert checkpoint.Checkpointer(paths["split"], read_only=True).all_steps()[-1] == stop + 2
  job(paths["straight"])
  config = load_config(name, "smoke", **{"mesh.data": 8, "train.num_steps": stop + 2,
                                         "train.checkpoint_every_steps": never,
                                         "log.every_steps": 1})
  (step_a, a), (step_b, b) = final_state(paths["split"], config), final_state(
      paths["straight"], config)
  assert step_a == step_b == stop + 2
  _assert_states_close(a, b, exact=True)
  split_logs, straight_logs = _metrics(paths["split"]), _metrics(paths["straight"])
  assert split_logs[-1]["step"] == straight_logs[-1]["step"] == stop + 2
  assert {k: v for k, v in split_logs[-1].items() if k not in TIMING_KEYS} == {
      k: v for k, v in straight_logs[-1].items() if k not in TIMING_KEYS}
  # 2 processes -> 1 process.
  summary = train.train_and_evaluate(config, paths["two_then_one"])
  assert summary["start_step"] == stop
  step, state = final_state(paths["two_then_one"], config)
  assert step == stop + 2
  _assert_states_close(state, b)

  # Evaluation and sampling as 2-process jobs, against evaluation in this process.
  record = tmp_path / "record"
  eval_flags = ("--config.eval.metrics=('likelihood',)", "--config.eval.likelihood_examples=64",
                "--config.eval.iwae_k=8")
  job(paths["straight"], "--mode=evaluate", *eval_flags, record=record)
  with open(os.path.join(paths["straight"], "eval", f"step_{stop + 2:06d}.json")) as f:
    two_process = json.load(f)["metrics"]
  written = _job_writes(record, paths["straight"])
  assert f"eval/step_{stop + 2:06d}.json" in written[0] and not written[1], written
  config.eval.metrics, config.eval.likelihood_examples, config.eval.iwae_k = (
      ("likelihood",), 64, 8)
  from fairgen.evaluation import modes
  here = modes.evaluate(config, paths["straight"])["metrics"]
  for key, value in here.items():
    np.testing.assert_allclose(two_process[key], value, rtol=1e-5, err_msg=key)
  shutil.rmtree(record)
  job(paths["straight"], "--mode=sample", "--config.sample.num=16", record=record)
  grid = os.path.join(paths["straight"], "sample", f"step_{stop + 2:06d}", "grid.npz")
  with np.load(grid) as npz:
    assert npz["images"].shape == (16, 28, 28, 1)
  written = _job_writes(record, paths["straight"])
  assert os.path.relpath(grid, paths["straight"]) in written[0] and not written[1], written


def test_launcher_stops_the_job_when_a_process_fails_and_rejects_bad_flags(tmp_path):
  """The launcher alone (no JAX): a failing process stops the others and sets the status.

  Process 0 fails once process 1 has printed (its marker file exists), so that process 1
  is stopped mid-sleep whatever the load."""
  marker = os.path.join(str(tmp_path), "printed")
  code = ("import os, sys, time; i = int(os.environ['FAIRGEN_PROCESS_ID']); "
          "print('process', i, 'of', os.environ['FAIRGEN_NUM_PROCESSES'], flush=True); "
          f"open({marker!r}, 'w').close() if i == 1 else None; "
          f"[time.sleep(0.05) for _ in range(600) if not os.path.exists({marker!r})]; "
          "sys.exit(3) if i == 0 else time.sleep(60)")
  start = time.monotonic()
  done = subprocess.run([sys.executable, LAUNCH, "--processes=2", "--", sys.executable, "-c",
                         code], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert done.returncode == 3, done.stdout + done.stderr
  assert time.monotonic() - start < 30  # process 1 was stopped, not waited for
  lines = _by_process(done.stdout)
  assert lines[0] == ["process 0 of 2"] and lines[1] == ["process 1 of 2"]
  assert done.stderr.splitlines()[0].startswith(
      "fairgen: error: process 0 (pid "), done.stderr
  assert ") exited with status 3; stopping the other processes." in done.stderr
  # A process other than the first one dies (SIGKILL) while process 0 runs on: noticed
  # within a poll, named, and the job stopped; process 0 gets SIGTERM (it exits 0 on it).
  code = ("import os, signal, sys, time; i = int(os.environ['FAIRGEN_PROCESS_ID']); "
          "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
          "time.sleep(1); os.kill(os.getpid(), signal.SIGKILL) if i == 1 else time.sleep(20)")
  start = time.monotonic()
  done = subprocess.run([sys.executable, LAUNCH, "--processes=2", "--", sys.executable, "-c",
                         code], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert time.monotonic() - start < 10, done.stdout + done.stderr
  assert done.returncode == 128 + signal.SIGKILL, done.stdout + done.stderr
  failure = [line for line in done.stderr.splitlines() if line.startswith("fairgen: error:")]
  assert len(failure) == 1 and failure[0].startswith("fairgen: error: process 1 (pid "), failure
  assert ") was killed by SIGKILL; stopping the other processes. The last committed " \
      "checkpoint is kept; to resume, run the same command: " in failure[0], failure
  resume = shlex.split(failure[0].split("run the same command: ", 1)[1])
  assert resume[1:] == [LAUNCH, "--processes=2", "--", sys.executable, "-c", code], resume
  for flags in (["--processes=0", "--", "true"], ["--processes=2"]):
    bad = subprocess.run([sys.executable, LAUNCH, *flags], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("fairgen: error: "), bad.stderr
    assert len(bad.stderr.splitlines()) == 1


def test_distributed_without_a_job_is_one_clear_line(tmp_path):
  result = run_main("--config=experiments/vae_mnist.py:smoke", f"--workdir={tmp_path}",
                    "--config.mesh.distributed=True")
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert result.stderr.startswith("fairgen: error: mesh.distributed=True, but this process "
                                  "could not join a multi-process job: coordinator_address")
  assert len(result.stderr.splitlines()) == 1 and not os.listdir(tmp_path)
