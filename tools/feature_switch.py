r"""Switches each feature off in a copy of the repository and runs the test that must fail.

    python tools/feature_switch.py                  # every entry of tests/feature_switches.py
    python tools/feature_switch.py --only dp_vae_noise,gp_at_interpolates
    python tools/feature_switch.py --list
    python tools/feature_switch.py --check          # only that every text is found once

Each entry of ``tests/feature_switches.py`` names a file, an exact text in it (found exactly
once) and its replacement, which switches one feature off where the product wires it in,
and the tests that must then fail. For each entry this copies the working tree (tracked and
untracked files that git does not ignore) to a temporary directory, applies the switch, runs
the tests there with pytest in one process, and prints ``killed`` (a test failed: the
feature is pinned), ``survived`` (every test passed: nothing notices the feature is gone) or
``stale`` (the text is not in the file exactly once), with the time it took. The exit status
is 0 only when every entry is killed.

Not part of CI (an entry runs its tests cold, tens of seconds each); run it before resolving
an issue that adds a feature, and add that feature's entry.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from fairgen import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_switches() -> list:
  """The entries of tests/feature_switches.py (a plain module of data, loaded by path)."""
  return cli.load_module(os.path.join(REPO, "tests", "feature_switches.py")).SWITCHES


def _tree_files() -> list[str]:
  """The working tree's files that a fresh clone plus local edits would hold."""
  out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                       cwd=REPO, capture_output=True, check=True).stdout
  return [f for f in out.decode().split("\0") if f and os.path.isfile(os.path.join(REPO, f))]


def _copy_tree(files: list[str], dest: str) -> None:
  for name in files:
    target = os.path.join(dest, name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(os.path.join(REPO, name), target)


def apply_switch(root: str, switch, dry_run: bool = False) -> bool:
  """Replaces ``switch.old`` by ``switch.new`` in ``root/switch.file`` (only checks, with
  ``dry_run``); False if the old text is not there exactly once."""
  path = os.path.join(root, switch.file)
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    text = f.read()
  if text.count(switch.old) != 1:
    return False
  if dry_run:
    return True
  with open(path, "w") as f:
    f.write(text.replace(switch.old, switch.new))
  return True


def run_switch(switch, files: list[str], timeout: int) -> tuple[str, float, str]:
  """(verdict, seconds, the tail of pytest's output) of one entry."""
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="fairgen_switch_") as root:
    _copy_tree(files, root)
    if not apply_switch(root, switch):
      return "stale", time.perf_counter() - start, f"{switch.old!r} not once in {switch.file}"
    env = dict(os.environ, PYTHONPATH=root)
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
               *switch.tests]
    try:
      result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
      return "killed (timeout)", time.perf_counter() - start, ""
    verdict = "survived" if result.returncode == 0 else "killed"
    if result.returncode not in (0, 1):  # 1: tests failed; anything else: pytest itself.
      verdict = f"killed (pytest exit {result.returncode})"
    lines = result.stdout.splitlines()
    # How it was killed: pytest's summary line of the first failure (an assertion, not an
    # import error, is what a pinned feature looks like).
    failed = [l for l in lines if l.startswith(("FAILED", "ERROR"))]
    tail = failed[0] if failed and verdict == "killed" else "\n".join(lines[-3:])
    return verdict, time.perf_counter() - start, tail


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="Comma-separated entry names.")
  parser.add_argument("--list", action="store_true", help="List the entries and exit.")
  parser.add_argument("--check", action="store_true",
                      help="Only check that every entry's text is in its file once.")
  parser.add_argument("--timeout", type=int, default=900, help="Seconds per entry.")
  args = parser.parse_args(argv)
  switches = _load_switches()
  if args.only:
    names = set(args.only.split(","))
    unknown = names - {s.name for s in switches}
    if unknown:
      cli.fail(f"unknown entries {sorted(unknown)}")
    switches = [s for s in switches if s.name in names]
  if args.list:
    for s in switches:
      print(f"{s.name:32s} {s.feature}  [{s.file}]  -> {' '.join(s.tests)}")
    return 0
  if args.check:
    stale = [s.name for s in switches if not apply_switch(REPO, s, dry_run=True)]
    print(f"{len(switches)} entries, {len(set(s.row for s in switches))} rows; stale: "
          f"{', '.join(stale) or 'none'}")
    return 1 if stale else 0
  files = _tree_files()
  counts: dict[str, int] = {}
  for s in switches:
    verdict, seconds, tail = run_switch(s, files, args.timeout)
    counts[verdict.split()[0]] = counts.get(verdict.split()[0], 0) + 1
    print(f"{verdict:10s} {seconds:6.1f} s  {s.name:26s} {s.feature}", flush=True)
    print(f"    {tail[:150]}", flush=True)
  print(f"{len(switches)} entries: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
  return 0 if counts.get("killed", 0) == len(switches) else 1


if __name__ == "__main__":
  sys.exit(main())
