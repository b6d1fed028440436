r"""Runs one multi-process JAX job on this machine: N processes of the same command.

    python tools/launch_local.py --processes=2 --devices_per_process=4 -- \
        python -m fairgen.main --config=experiments/dcgan_mnist.py:smoke --workdir=/tmp/fg/mp

Each process gets the environment of one host of a multi-host job:

- ``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT`` (process 0 serves it), ``FAIRGEN_NUM_PROCESSES``
  and ``FAIRGEN_PROCESS_ID``: ``fairgen.main`` sees them and calls
  ``jax.distributed.initialize`` with them (``fairgen.parallel.initialize_distributed``);
- ``--devices_per_process`` fake CPU devices (``XLA_FLAGS``), whose collectives across
  processes go through gloo, JAX's CPU collectives implementation.

2 processes x 4 devices is one 8-device job: the same mesh, the same global batch and the
same numbers as 1 process x 8 devices. The output of every process is streamed, each line
prefixed with ``[N]``. SIGTERM or SIGINT to the launcher is forwarded to every process, as a
preemption reaches every host of a slice. When a process fails, the others are stopped
(they would wait for it in the next collective). The exit status is the first nonzero
status of a process (by process index; 128 + S for one killed by signal S), else 0.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from fairgen import cli

GRACE_SECONDS = 20.0  # After a failure: how long the others get to stop on SIGTERM.
POLL_SECONDS = 0.05  # How often every process's status is read.


def free_port() -> int:
  """A TCP port that is free on localhost now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def job_env(coordinator: str, processes: int, index: int) -> dict[str, str]:
  """What process ``index`` of a job needs to join it (``fairgen.main`` reads these): the
  coordinator's ``HOST:PORT``, the process count and this process's index."""
  return {"JAX_COORDINATOR_ADDRESS": coordinator, "FAIRGEN_NUM_PROCESSES": str(processes),
          "FAIRGEN_PROCESS_ID": str(index)}


def process_env(base: dict[str, str], index: int, processes: int, port: int,
                devices_per_process: int) -> dict[str, str]:
  """The environment of local process ``index`` of the job: ``job_env`` and fake devices."""
  env = dict(base)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  env.update({"XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": env.get("JAX_PLATFORMS", "cpu"),
              **job_env(f"127.0.0.1:{port}", processes, index)})
  return env


def _die_with_parent() -> None:
  """In the child (Linux): SIGKILL when the launcher dies, even by SIGKILL, so no process of
  the job is left running alone."""
  try:
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def _stream(index: int, pipe, out, lock: threading.Lock) -> None:
  for line in pipe:
    with lock:
      out.write(f"[{index}] {line}")
      out.flush()


def launch(command: Sequence[str], processes: int, devices_per_process: int,
           port: int = 0, env: dict[str, str] | None = None, out=None,
           timeout: float | None = None) -> list[int]:
  """Starts the job, streams its output to ``out`` and returns every process's exit status.

  Args:
    command: the command each process runs (e.g. ``[python, -m, fairgen.main, ...]``).
    processes: the number of processes (hosts).
    devices_per_process: fake CPU devices of each process.
    port: the coordinator's port (0: a free one).
    env: the base environment (default: this process's).
    out: where the prefixed lines go (default: stdout).
    timeout: seconds before the job is stopped (SIGTERM, then SIGKILL); None: no limit.
  """
  port = port or free_port()
  base = dict(os.environ if env is None else env)
  envs = [process_env(base, i, processes, port, devices_per_process) for i in range(processes)]
  return run_processes([list(command)] * processes, envs, out, timeout)


def run_processes(commands: Sequence[Sequence[str]], envs: Sequence[dict[str, str]] | None,
                  out=None, timeout: float | None = None,
                  label: str = "launch_local", resume: str | None = None) -> list[int]:
  """Runs one process per command as one job; returns their exit statuses.

  Every line of process ``i`` is written to ``out`` as ``[i] line``. SIGTERM and SIGINT to
  this process are forwarded to all of them. When one fails, within ``POLL_SECONDS`` one
  ``fairgen: error:`` line (``failure_line``) says which, how and how to resume, and the
  others get SIGTERM, then SIGKILL after ``GRACE_SECONDS`` (the same when ``timeout``
  passes).

  Args:
    commands: one argv per process.
    envs: one environment per process (None: this process's for all).
    out: where the prefixed lines go (default: stdout).
    timeout: seconds before the job is stopped; None: no limit.
    label: the name in the ``[label] process i: pid N`` lines.
    resume: the command that resumes the job, for the failure line (default: this
      process's own command line).
  """
  out = out or sys.stdout
  lock = threading.Lock()
  procs, threads = [], []
  for index, command in enumerate(commands):
    proc = subprocess.Popen(
        list(command), env=None if envs is None else envs[index],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    procs.append(proc)
    with lock:
      out.write(f"[{label}] process {index}: pid {proc.pid}\n")
      out.flush()
    thread = threading.Thread(target=_stream, args=(index, proc.stdout, out, lock),
                              daemon=True)
    thread.start()
    threads.append(thread)

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGTERM, signal.SIGINT):
      previous[sig] = signal.signal(sig, forward)
  deadline = None if timeout is None else time.monotonic() + timeout
  stop_at = None  # When the survivors of a failure get SIGKILL.
  try:
    # Every process is polled on every pass (a list, not a short-circuiting any()).
    while [p.poll() for p in procs].count(None):
      now = time.monotonic()
      failed = next((i for i, p in enumerate(procs) if p.returncode not in (None, 0)), None)
      if stop_at is None and (failed is not None or (deadline is not None and now > deadline)):
        if failed is not None:
          print(failure_line(failed, procs[failed].pid, procs[failed].returncode, resume),
                file=sys.stderr, flush=True)
        forward(signal.SIGTERM, None)
        stop_at = now + GRACE_SECONDS
      if stop_at is not None and now > stop_at:
        for p in procs:
          if p.poll() is None:
            p.kill()
      time.sleep(POLL_SECONDS)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  for thread in threads:
    thread.join(timeout=5)
  return [p.returncode for p in procs]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      usage="%(prog)s --processes=N --devices_per_process=D -- COMMAND ...")
  parser.add_argument("--processes", type=int, default=2, help="number of processes (hosts)")
  parser.add_argument("--devices_per_process", type=int, default=4,
                      help="fake CPU devices per process")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--timeout", type=float, default=None,
                      help="stop the job after this many seconds")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="the command every process runs, after --")
  args = parser.parse_args(argv)
  command = after_dashes(args.command)
  problem = None
  if not command:
    problem = "no command given; put it after --, e.g. -- python -m fairgen.main ..."
  elif args.processes < 1:
    problem = f"--processes must be >= 1, got {args.processes}."
  elif args.devices_per_process < 1:
    problem = f"--devices_per_process must be >= 1, got {args.devices_per_process}."
  if problem:
    cli.fail(problem)
  codes = launch(command, args.processes, args.devices_per_process, args.port,
                 timeout=args.timeout)
  print(f"[launch_local] exit statuses: {codes}", file=sys.stderr)
  return job_status(codes)


def failure_line(index: int, pid: int, returncode: int, resume: str | None = None) -> str:
  """The one line printed when process ``index`` failed: which, how, and the command that
  resumes the job (default: this process's own command line)."""
  if returncode < 0:
    try:
      how = f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
      how = f"was killed by signal {-returncode}"
  else:
    how = f"exited with status {returncode}"
  resume = resume or shlex.join([os.path.basename(sys.executable), *sys.argv])
  return (f"fairgen: error: process {index} (pid {pid}) {how}; stopping the other processes. "
          f"The last committed checkpoint is kept; to resume, run the same command: {resume}")


def after_dashes(rest: Sequence[str]) -> list[str]:
  """An ``argparse.REMAINDER`` without the ``--`` that separates it from the launcher's flags."""
  return list(rest[1:] if rest[:1] == ["--"] else rest)


def job_status(codes: Sequence[int]) -> int:
  """The first nonzero status (a process killed by signal S reports -S: 128 + S), else 0."""
  return next((c if c > 0 else 128 - c for c in codes if c), 0)


if __name__ == "__main__":
  sys.exit(main())
