r"""Launches a fairgen job on a GPU cluster: a SLURM batch job, or plain SSH to N nodes.

SLURM (one process per GPU; JAX reads the job's layout from SLURM's environment):

    python tools/launch_cluster.py slurm --nodes=2 --gpus_per_node=8 --time=24:00:00 \
        --workdir=/shared/runs/dcgan -- --config=experiments/dcgan_mnist.py:full

writes ``WORKDIR/job.sbatch`` and submits it with ``sbatch`` (``--dry_run`` prints the script
instead). The script runs ``srun python -m fairgen.main ... --config.mesh.distributed=True``
with ``--requeue``: SLURM's SIGTERM 5 minutes before the time limit (``--signal``) makes
every process save a checkpoint at the same step and exit; the script then requeues the job,
which resumes from the workdir. A job preempted by SLURM is requeued the same way.

Plain multi-node (no scheduler; one process per node, all GPUs of a node in it):

    python tools/launch_cluster.py ssh --hosts=node1,node2 --workdir=/shared/runs/dcgan \
        -- --config=experiments/dcgan_mnist.py:full

runs ``ssh HOST 'cd REPO && JAX_COORDINATOR_ADDRESS=node1:PORT FAIRGEN_NUM_PROCESSES=2
FAIRGEN_PROCESS_ID=i python -m fairgen.main ...'`` on every host at once (the repository at
the same path on every node, e.g. a shared file system), streams their output prefixed with
``[i]`` and stops them all when one fails; ``--dry_run`` prints the commands. Resume: run
the same command again.

The workdir must be reachable from every node (a shared file system or gs://). Bad
arguments print one ``fairgen: error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Sequence

from fairgen import cli

# tools/, beside this script (found by path: the tests load the launchers by path, too).
launch_local = cli.import_beside(__file__, "launch_local")

DEFAULT_PORT = 12355
TERM_BEFORE_LIMIT_S = 300  # SIGTERM this long before the time limit: time to checkpoint.


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """``slurm`` or ``ssh`` and their flags; ``fairgen.main``'s flags come after ``--``."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="scheduler", required=True)
  slurm = sub.add_parser("slurm", help="a SLURM batch job (one process per GPU)")
  slurm.add_argument("--nodes", type=int, default=1)
  slurm.add_argument("--gpus_per_node", type=int, default=8)
  slurm.add_argument("--cpus_per_gpu", type=int, default=8)
  slurm.add_argument("--time", default="24:00:00", help="the time limit, HH:MM:SS")
  slurm.add_argument("--partition", default="")
  slurm.add_argument("--account", default="")
  slurm.add_argument("--job_name", default="fairgen")
  ssh = sub.add_parser("ssh", help="plain multi-node: one process per host over ssh")
  ssh.add_argument("--hosts", required=True, help="comma-separated; the first coordinates")
  ssh.add_argument("--port", type=int, default=DEFAULT_PORT, help="the coordinator's port")
  ssh.add_argument("--repo", default=os.getcwd(),
                   help="the repository's path on every host (default: this one)")
  for parser in (slurm, ssh):
    parser.add_argument("--workdir", required=True, help="reachable from every node")
    parser.add_argument("--python", default="python", help="the Python on the nodes")
    parser.add_argument("--dry_run", action="store_true", help="print, do not run")
    parser.add_argument("main_args", nargs=argparse.REMAINDER,
                        help="after --: fairgen.main's flags (--config=... is required)")
  args = p.parse_args(argv)
  args.main_args = launch_local.after_dashes(args.main_args)
  return args


def main_args_problem(main_args: Sequence[str]) -> str | None:
  """What is wrong with the ``fairgen.main`` flags after ``--`` (also launch_tpu's), or None."""
  if not any(a.startswith("--config=") for a in main_args):
    return "no --config=... after --; e.g. -- --config=experiments/dcgan_mnist.py:full"
  if any(a.startswith(("--workdir", "--config.mesh.distributed")) for a in main_args):
    return "put the workdir in --workdir, before --; the launcher sets mesh.distributed."
  return None


def check_args(args: argparse.Namespace) -> str | None:
  """The first problem with ``args`` as one line, or None."""
  problem = main_args_problem(args.main_args)
  if problem:
    return problem
  if args.scheduler == "slurm":
    if args.nodes < 1 or args.gpus_per_node < 1 or args.cpus_per_gpu < 1:
      return "--nodes, --gpus_per_node and --cpus_per_gpu must be >= 1."
    if not re.fullmatch(r"(\d+-)?\d+(:\d\d){0,2}", args.time):
      return f"--time must look like HH:MM:SS or D-HH:MM:SS, got {args.time!r}."
  else:
    hosts = [h for h in args.hosts.split(",") if h]
    if not hosts or len(set(hosts)) != len(hosts):
      return f"--hosts must name distinct hosts, got {args.hosts!r}."
    if not 0 < args.port < 65536:
      return f"--port must be a TCP port, got {args.port}."
  return None


def main_command(args: argparse.Namespace) -> list[str]:
  """The ``fairgen.main`` command every process runs."""
  return [args.python, "-m", "fairgen.main", *args.main_args, f"--workdir={args.workdir}",
          "--config.mesh.distributed=True"]


def sbatch_script(args: argparse.Namespace) -> str:
  """The SLURM batch script: one task per GPU, SIGTERM before the limit, then requeue."""
  directives = [f"--job-name={args.job_name}", f"--nodes={args.nodes}",
                f"--ntasks-per-node={args.gpus_per_node}",
                f"--gpus-per-node={args.gpus_per_node}", f"--cpus-per-task={args.cpus_per_gpu}",
                f"--time={args.time}", "--requeue", "--open-mode=append",
                f"--signal=B:USR1@{TERM_BEFORE_LIMIT_S}",
                f"--output={os.path.join(args.workdir, 'slurm-%j.out')}"]
  if args.partition:
    directives.append(f"--partition={args.partition}")
  if args.account:
    directives.append(f"--account={args.account}")
  lines = ["#!/bin/bash"] + [f"#SBATCH {d}" for d in directives] + [
      "# One process per GPU. jax.distributed.initialize() (mesh.distributed=True) reads",
      "# the coordinator, process count and index from SLURM's environment.",
      f"cd {shlex.quote(os.getcwd())}",
      "requeue() {",
      "  echo \"fairgen: the time limit is near: checkpointing, then requeueing\"",
      "  kill -TERM \"$SRUN_PID\"  # srun forwards it to every task: all stop at one step.",
      "  wait \"$SRUN_PID\"",
      "  scontrol requeue \"$SLURM_JOB_ID\"",
      "}",
      "trap requeue USR1",
      f"srun --kill-on-bad-exit=1 {shlex.join(main_command(args))} &",
      "SRUN_PID=$!",
      "wait \"$SRUN_PID\"",
      ""]
  return "\n".join(lines)


def ssh_commands(args: argparse.Namespace) -> list[list[str]]:
  """One ``ssh`` per host, each starting process ``i`` of the job."""
  hosts = [h for h in args.hosts.split(",") if h]
  coordinator = f"{hosts[0]}:{args.port}"
  commands = []
  for index, host in enumerate(hosts):
    env = " ".join(f"{k}={v}" for k, v in
                   launch_local.job_env(coordinator, len(hosts), index).items())
    remote = f"cd {shlex.quote(args.repo)} && {env} {shlex.join(main_command(args))}"
    commands.append(["ssh", "-o", "BatchMode=yes", host, remote])
  return commands


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point: submit or run the job, or print it with --dry_run."""
  args = parse_args(argv)
  problem = check_args(args)
  if problem:
    cli.fail(problem)
  if args.scheduler == "slurm":
    script = sbatch_script(args)
    if args.dry_run:
      print(script, end="")
      return 0
    os.makedirs(args.workdir, exist_ok=True)  # SLURM writes its output file there.
    path = os.path.join(args.workdir, "job.sbatch")
    with open(path, "w", encoding="utf-8") as f:
      f.write(script)
    return subprocess.run(["sbatch", path], check=False).returncode
  commands = ssh_commands(args)
  if args.dry_run:
    print("\n".join(shlex.join(c) for c in commands))
    return 0
  codes = launch_local.run_processes(commands, None, label="launch_cluster")
  print(f"[launch_cluster] exit statuses: {codes}", file=sys.stderr)
  return launch_local.job_status(codes)


if __name__ == "__main__":
  sys.exit(main())
