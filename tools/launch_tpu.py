r"""Runs a fairgen job on a Cloud TPU VM or slice, and resumes it after preemption.

    python tools/launch_tpu.py --name=fairgen-v4 --zone=us-central2-b \
        --accelerator_type=v4-32 --workdir=gs://BUCKET/runs/dcgan -- \
        --config=experiments/dcgan_mnist.py:full

What it does, with ``gcloud compute tpus tpu-vm`` (``--dry_run`` prints every command
instead of running it):

1. ``describe`` the TPU; ``create`` it if it does not exist (``--spot`` for a Spot slice);
2. pack this working tree (without .git and caches) and ``scp`` it to every worker;
3. ``ssh --worker=all``: unpack and ``pip install -e '.[gcs]' jax[tpu]`` on every worker;
4. ``ssh --worker=all``: the same ``python -m fairgen.main`` on every worker, with
   ``--config.mesh.distributed=True`` (JAX finds the slice's other hosts by itself) and the
   gs:// workdir every worker shares. gcloud streams every worker's output here.
5. If the run fails and the TPU is no longer READY (preempted, or being repaired), delete and
   re-create it, install again and run the same command: fairgen resumes from the newest
   checkpoint in the workdir. At most ``--max_restarts`` times. A run that fails on a READY
   TPU (bad config, a bug) is not retried: its exit status is returned.

Logs: each worker's output here; ``metrics.jsonl``, TensorBoard events, samples and
checkpoints in the workdir. Bad arguments print one ``fairgen: error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
from typing import Callable, Sequence

from fairgen import cli

# tools/, beside this script (found by path: the tests load this file by path, too).
launch_cluster = cli.import_beside(__file__, "launch_cluster")
launch_local = cli.import_beside(__file__, "launch_local")

REMOTE_DIR = "~/fairgen"
REMOTE_ARCHIVE = "~/fairgen-code.tar.gz"
# What is not copied to the workers.
EXCLUDED = (".git", "__pycache__", ".pytest_cache", "fairgen.egg-info")

# A command runner: (argv, capture) -> (exit status, captured stdout).
Runner = Callable[[Sequence[str], bool], "tuple[int, str]"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The launcher's flags; the ``fairgen.main`` flags come after ``--``."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              usage="%(prog)s --name=N --zone=Z --accelerator_type=T "
                                    "--workdir=gs://... -- --config=... [fairgen flags]")
  p.add_argument("--name", required=True, help="the TPU VM / slice name")
  p.add_argument("--zone", required=True, help="e.g. us-central2-b")
  p.add_argument("--project", default="", help="GCP project (default: gcloud's)")
  p.add_argument("--accelerator_type", default="",
                 help="e.g. v4-8, v4-32, v5litepod-16 (to create or re-create the TPU)")
  p.add_argument("--runtime_version", default="tpu-ubuntu2204-base",
                 help="the TPU VM software version")
  p.add_argument("--spot", action="store_true", help="create a Spot (preemptible) TPU")
  p.add_argument("--workdir", required=True, help="gs://BUCKET/PATH, shared by all workers")
  p.add_argument("--max_restarts", type=int, default=10,
                 help="re-creations after preemption before giving up")
  p.add_argument("--dry_run", action="store_true", help="print the gcloud commands only")
  p.add_argument("main_args", nargs=argparse.REMAINDER,
                 help="after --: fairgen.main's flags (--config=... is required)")
  args = p.parse_args(argv)
  args.main_args = launch_local.after_dashes(args.main_args)
  return args


def check_args(args: argparse.Namespace) -> str | None:
  """The first problem with ``args`` as one line, or None."""
  if not args.workdir.startswith("gs://"):
    return (f"--workdir must be a gs:// path that every worker can reach, got "
            f"{args.workdir!r}.")
  problem = launch_cluster.main_args_problem(args.main_args)
  if problem:
    return problem
  if not args.accelerator_type:
    return "--accelerator_type is needed (e.g. v4-32): the TPU is created, or re-created " \
           "after a preemption, with it."
  if args.max_restarts < 0:
    return f"--max_restarts must be >= 0, got {args.max_restarts}."
  return None


def gcloud(args: argparse.Namespace, verb: str, *rest: str) -> list[str]:
  """``gcloud compute tpus tpu-vm VERB NAME --zone=Z [--project=P] REST...``."""
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb]
  if verb != "scp":  # scp names the TPU in its source or destination.
    cmd.append(args.name)
  cmd.append(f"--zone={args.zone}")
  if args.project:
    cmd.append(f"--project={args.project}")
  return cmd + list(rest)


def describe_command(args: argparse.Namespace) -> list[str]:
  """Prints the TPU's state (READY, PREEMPTED, ...); fails if there is no such TPU."""
  return gcloud(args, "describe", "--format=value(state)")


def create_commands(args: argparse.Namespace, archive: str) -> list[list[str]]:
  """Create the TPU, copy the code to every worker and install it there."""
  create = gcloud(args, "create", f"--accelerator-type={args.accelerator_type}",
                  f"--version={args.runtime_version}", *(["--spot"] if args.spot else []))
  return [create] + install_commands(args, archive)


def install_commands(args: argparse.Namespace, archive: str) -> list[list[str]]:
  """Copy the code archive to every worker, unpack and install it."""
  copy = gcloud(args, "scp", archive, f"{args.name}:{REMOTE_ARCHIVE}", "--worker=all")
  install = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
             f"tar -xzf {REMOTE_ARCHIVE} -C {REMOTE_DIR} && cd {REMOTE_DIR} && "
             f"pip install -q -e '.[gcs]' 'jax[tpu]'")
  return [copy, gcloud(args, "ssh", "--worker=all", f"--command={install}")]


def run_command(args: argparse.Namespace) -> list[str]:
  """The same fairgen.main command on every worker, as one multi-process job."""
  main = ["python", "-m", "fairgen.main", *args.main_args, f"--workdir={args.workdir}",
          "--config.mesh.distributed=True"]
  remote = f"cd {REMOTE_DIR} && {shlex.join(main)}"
  return gcloud(args, "ssh", "--worker=all", f"--command={remote}")


def pack(root: str, path: str) -> int:
  """Writes ``root``'s tree (less ``EXCLUDED``) to the tar.gz ``path``; returns the file count."""
  count = 0

  def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    nonlocal count
    if any(part in EXCLUDED for part in info.name.split("/")):
      return None
    count += info.isfile()
    return info

  with tarfile.open(path, "w:gz") as tar:
    tar.add(root, arcname=".", filter=keep)
  return count


def subprocess_runner(cmd: Sequence[str], capture: bool) -> tuple[int, str]:
  """Runs ``cmd``; its output streams here unless captured."""
  print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
  proc = subprocess.run(list(cmd), stdout=subprocess.PIPE if capture else None, text=True,
                        check=False)
  return proc.returncode, proc.stdout or ""


def launch(args: argparse.Namespace, archive: str, run: Runner) -> int:
  """Creates or reuses the TPU, installs, runs, and re-creates it after preemptions."""
  status, state = run(describe_command(args), True)
  if status:
    setup = create_commands(args, archive)
  else:
    print(f"[launch_tpu] {args.name} exists ({state.strip() or 'state unknown'}); reusing it.",
          file=sys.stderr)
    setup = install_commands(args, archive)
  restarts = 0
  while True:
    for cmd in setup:
      status, _ = run(cmd, False)
      if status:
        return status
    status, _ = run(run_command(args), False)
    if status == 0:
      return 0
    _, state = run(describe_command(args), True)
    if state.strip() == "READY":
      print(f"[launch_tpu] the run failed (exit {status}) on a READY TPU: not retrying.",
            file=sys.stderr)
      return status
    if restarts == args.max_restarts:
      print(f"[launch_tpu] TPU {state.strip() or 'gone'} after {restarts} restart(s): "
            f"giving up.", file=sys.stderr)
      return status
    restarts += 1
    print(f"[launch_tpu] TPU {state.strip() or 'gone'}: re-creating it and resuming "
          f"(restart {restarts} of at most {args.max_restarts}).", file=sys.stderr)
    setup = [gcloud(args, "delete", "--quiet")] + create_commands(args, archive)


def dry_run(args: argparse.Namespace, archive: str) -> None:
  """Prints what ``launch`` would run on a TPU that does not exist yet, and after preemption."""
  lines = [f"# pack {os.getcwd()} (less {', '.join(EXCLUDED)}) into {archive}",
           shlex.join(describe_command(args)),
           "# if it does not exist:"]
  lines += [shlex.join(c) for c in create_commands(args, archive)]
  lines += ["# if it exists: the copy and install steps above, then:",
            shlex.join(run_command(args)),
            f"# if that fails and the state is not READY (preempted), up to "
            f"{args.max_restarts} times:",
            shlex.join(gcloud(args, "delete", "--quiet")),
            "# ... then create, copy, install and run again as above (the run resumes).",
            f"# logs: this terminal; metrics, samples and checkpoints: {args.workdir}"]
  print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point: launch (or print, with --dry_run) the TPU job."""
  args = parse_args(argv)
  problem = check_args(args)
  if problem:
    cli.fail(problem)
  archive = os.path.join(tempfile.gettempdir(), f"fairgen-code-{args.name}.tar.gz")
  if args.dry_run:
    dry_run(args, archive)
    return 0
  files = pack(os.getcwd(), archive)
  print(f"[launch_tpu] packed {files} files into {archive}", file=sys.stderr)
  return launch(args, archive, subprocess_runner)


if __name__ == "__main__":
  sys.exit(main())
