"""The cluster launchers: their dry-run output, and the TPU launcher's preemption loop."""

import importlib.util
import os
import shlex
import subprocess
import sys

from conftest import REPO
from fairgen import parallel


def _tool(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(*args):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=60)


TPU = ["tools/launch_tpu.py", "--name=fg", "--zone=us-central2-b", "--accelerator_type=v4-32",
       "--workdir=gs://bucket/runs/dcgan"]
MAIN = ["--", "--config=experiments/dcgan_mnist.py:full", "--config.train.num_steps=100"]


def test_tpu_dry_run_prints_every_gcloud_step():
  proc = _run(*TPU, "--spot", "--dry_run", *MAIN)
  assert proc.returncode == 0, proc.stderr
  commands = [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("gcloud")]
  verbs = [c[4] for c in commands]
  assert verbs == ["describe", "create", "scp", "ssh", "ssh", "delete"], proc.stdout
  create, scp, install, run = commands[1:5]
  assert {"--accelerator-type=v4-32", "--spot", "--zone=us-central2-b"} <= set(create)
  assert "--worker=all" in scp and scp[-2].endswith(":~/fairgen-code.tar.gz")
  assert "--worker=all" in install and "pip install" in install[-1]
  remote = shlex.split(run[-1].removeprefix("--command="))
  assert "--worker=all" in run
  assert remote[remote.index("python"):] == [
      "python", "-m", "fairgen.main", "--config=experiments/dcgan_mnist.py:full",
      "--config.train.num_steps=100", "--workdir=gs://bucket/runs/dcgan",
      "--config.mesh.distributed=True"]


def test_tpu_bad_arguments_are_one_line():
  for args, message in [
      ([a if not a.startswith("--workdir") else "--workdir=/tmp/run" for a in TPU] + MAIN,
       "gs:// path"),
      (TPU + ["--", "--config.train.num_steps=3"], "no --config"),
      ([a for a in TPU if not a.startswith("--accelerator")] + MAIN, "--accelerator_type"),
      (TPU + MAIN + ["--workdir=gs://b/other"], "--workdir, before --")]:
    proc = _run(*args, "--dry_run")
    assert proc.returncode == 2 and proc.stdout == "", (args, proc.stdout)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fairgen: error:") and message in lines[0]


class FakeGcloud:
  """Answers the launcher's gcloud calls: ``states`` after each failed run, run statuses."""

  def __init__(self, exists, run_statuses, states):
    self.exists, self.run_statuses, self.states, self.calls = exists, run_statuses, states, []

  def __call__(self, cmd, capture):
    verb = cmd[4]
    self.calls.append(verb if verb != "ssh" else
                      ("run" if "fairgen.main" in cmd[-1] else "install"))
    if verb == "describe":
      if not self.exists:
        return 1, ""
      return 0, self.states.pop(0) if self.states else "READY\n"
    if verb == "create":
      self.exists = True
    if verb == "delete":
      self.exists = False
    if self.calls[-1] == "run":
      return self.run_statuses.pop(0), ""
    return 0, ""


def test_tpu_launch_recreates_after_preemption_and_not_after_a_failing_run():
  tool = _tool("launch_tpu")
  args = tool.parse_args(TPU[1:] + ["--max_restarts=2"] + MAIN)
  # Two preemptions, then the run completes: re-created twice, the same command each time.
  fake = FakeGcloud(False, [143, 143, 0], ["PREEMPTED\n", "PREEMPTED\n"])
  assert tool.launch(args, "/tmp/code.tar.gz", fake) == 0
  setup = ["create", "scp", "install", "run"]
  again = ["describe", "delete"] + setup
  assert fake.calls == ["describe"] + setup + again + again
  # An existing TPU is reused; a run that fails on a READY TPU is a bug, not a preemption.
  fake = FakeGcloud(True, [1], [])
  assert tool.launch(args, "/tmp/code.tar.gz", fake) == 1
  assert fake.calls == ["describe", "scp", "install", "run", "describe"]
  # Preempted more often than --max_restarts: the run's status, no endless loop.
  fake = FakeGcloud(True, [143] * 5, ["PREEMPTED\n"] * 5)
  assert tool.launch(args, "/tmp/code.tar.gz", fake) == 143
  assert fake.calls.count("run") == 3 and fake.calls.count("create") == 2


def test_slurm_dry_run_is_a_valid_requeueing_batch_script(tmp_path):
  proc = _run("tools/launch_cluster.py", "slurm", "--nodes=2", "--gpus_per_node=4",
              "--time=1-00:00:00", "--partition=gpu", "--workdir=/shared/runs/dcgan",
              "--dry_run", *MAIN)
  assert proc.returncode == 0, proc.stderr
  script = proc.stdout
  directives = {line.split()[1] for line in script.splitlines() if line.startswith("#SBATCH")}
  assert {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--requeue",
          "--time=1-00:00:00", "--partition=gpu", "--signal=B:USR1@300"} <= directives
  path = tmp_path / "job.sbatch"
  path.write_text(script)
  assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
  srun = next(shlex.split(line) for line in script.splitlines() if line.startswith("srun"))
  assert srun[srun.index("python"):-1] == [
      "python", "-m", "fairgen.main", "--config=experiments/dcgan_mnist.py:full",
      "--config.train.num_steps=100", "--workdir=/shared/runs/dcgan",
      "--config.mesh.distributed=True"]
  assert "trap requeue USR1" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script


def test_ssh_dry_run_gives_every_host_the_job_environment():
  proc = _run("tools/launch_cluster.py", "ssh", "--hosts=node1,node2,node3", "--port=4321",
              "--repo=/shared/fairgen", "--workdir=/shared/runs/x", "--dry_run", *MAIN)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 3
  for index, line in enumerate(lines):
    ssh = shlex.split(line)
    assert ssh[0] == "ssh" and ssh[-2] == f"node{index + 1}"
    remote = shlex.split(ssh[-1])
    assert remote[:3] == ["cd", "/shared/fairgen", "&&"]
    env = dict(word.split("=", 1) for word in remote[3:6])
    # The variables fairgen.parallel.initialize_distributed reads.
    assert env == {"JAX_COORDINATOR_ADDRESS": "node1:4321",
                   parallel.NUM_PROCESSES_ENV: "3", parallel.PROCESS_ID_ENV: str(index)}
    assert remote[6:9] == ["python", "-m", "fairgen.main"]
    assert remote[-2:] == ["--workdir=/shared/runs/x", "--config.mesh.distributed=True"]
  bad = _run("tools/launch_cluster.py", "ssh", "--hosts=a,a", "--workdir=/x", *MAIN)
  assert bad.returncode == 2 and bad.stderr.startswith("fairgen: error: --hosts")
