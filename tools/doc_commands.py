"""The code blocks of the README and the docs, how each is run, and their smoke forms.

Every fenced block in ``README.md`` and ``docs/*.md`` names its language. A ``bash`` or
``python`` block is preceded by one marker line, an HTML comment that neither GitHub nor
Sphinx shows, saying how a test runs it:

- ``<!-- run: smoke -->``: ``tests/test_docs.py`` runs each command of the block in its
  smoke form (``smoke_form``): the experiment's ``:smoke`` variant, ``/tmp/fg/`` inside a
  temporary directory, ``$FAIRGEN_CACHE`` there too. The smoke blocks of one page run in
  order in one directory, so a page can train, then evaluate what it trained. ``python``
  blocks run as written (``/tmp/fg/`` moved); consecutive ones are the cells of one
  session, as in a notebook.
- ``<!-- run: ci -->``: the block is ``.ci/run``'s command (the test checks it is).
- ``<!-- run: tested by tests/FILE.py::TEST -->``: an existing test runs it (the test checks
  that the test exists and names the block's script).
- ``<!-- run: no, REASON -->``: not runnable offline or in a test, for the stated reason
  (an accelerator, a download, hours of CPU time).

Blocks of any other language (``text``, ``bibtex``, ``json``) are not run.

  python tools/doc_commands.py            # every block, its marker and its smoke form
  python tools/doc_commands.py --check    # exit 1 if a block lacks a valid marker
  python tools/doc_commands.py --run README.md docs/quickstart.md   # run their smoke blocks
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNABLE = ("bash", "python")
OTHER = ("text", "bibtex", "json")
SMOKE_STEPS = 8  # A resume command's num_steps, in smoke form: twice the smoke run's 4.
CLASSIFIER_SMOKE = ("--steps=20", "--log_every=10")
_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_MARKER = re.compile(r"^<!--\s*run:\s*(.*?)\s*-->$")


@dataclasses.dataclass(frozen=True)
class Block:
  """One fenced code block: where it is, its language, its marker and its text."""
  path: str
  line: int
  language: str
  marker: str
  text: str

  @property
  def where(self) -> str:
    return f"{os.path.relpath(self.path, REPO)}:{self.line}"


def doc_files() -> list[str]:
  """The README and every docs page."""
  return [os.path.join(REPO, "README.md")] + sorted(
      glob.glob(os.path.join(REPO, "docs", "*.md")))


def blocks(path: str) -> list[Block]:
  """The fenced blocks of one Markdown file, each with the marker line above it."""
  lines = open(path, encoding="utf-8").read().split("\n")
  found, i = [], 0
  while i < len(lines):
    match = _FENCE.match(lines[i])
    if not match:
      i += 1
      continue
    end = i + 1
    while end < len(lines) and lines[end].strip() != "```":
      end += 1
    above = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
    marker = _MARKER.match(above)
    text = "\n".join(l[len(match.group(1)):] for l in lines[i + 1:end])
    found.append(Block(path, i + 1, match.group(2), marker.group(1) if marker else "", text))
    i = end + 1
  return found


def commands(text: str) -> list[str]:
  """A bash block's commands: comments dropped, backslash continuations joined."""
  joined = re.sub(r"\\\n\s*", " ", text)
  return [line.strip() for line in joined.split("\n")
          if line.strip() and not line.strip().startswith("#")]


def problems(block: Block) -> list[str]:
  """What is wrong with a block's language or marker (empty if nothing)."""
  if block.language in OTHER or block.language.startswith("{"):  # Text, MyST directives.
    return []
  if block.language not in RUNNABLE:
    return [f"{block.where}: a code block's language must be one of "
            f"{RUNNABLE + OTHER}, not {block.language!r}"]
  kind = block.marker
  if kind in ("smoke", "ci") or kind.startswith("tested by tests/"):
    return []
  if kind.startswith("no, ") and len(kind) > 8:
    return []
  return [f"{block.where}: a {block.language} block needs a marker line above it: "
          f"<!-- run: smoke|ci|tested by tests/FILE.py::TEST|no, REASON --> "
          f"(found {kind!r})"]


def _smoke_config(arg: str) -> str:
  """``--config=FILE[:ARGS]`` with ``smoke`` added to its variant arguments."""
  path, _, variant = arg.partition(":")
  args = [a for a in variant.split(",") if a] if variant else []
  if "smoke" not in args:
    args.append("smoke")
  return f"{path}:{','.join(args)}"


def smoke_form(command: str, root: str) -> str:
  """A documented command as a test runs it: ``/tmp/fg`` under ``root``, the smoke variant
  of its config, a resume's ``num_steps`` cut to ``SMOKE_STEPS``, the install dropped (the
  test runs in the installed checkout), a classifier's training cut to a few steps."""
  command = under_root(re.sub(r"^pip install [^&]*&&\s*", "", command), root)
  words = []
  for word in shlex.split(command, comments=True):
    if word.startswith("--config=") and ".py" in word:
      word = "--config=" + _smoke_config(word[len("--config="):])
    elif word.startswith("--config.train.num_steps="):
      word = f"--config.train.num_steps={SMOKE_STEPS}"
    words.append(word)
  if any(w.endswith("tools/train_classifier.py") for w in words):
    words += CLASSIFIER_SMOKE
  # A command's own XLA_FLAGS come first; the test environment's (compile options) follow.
  words = [f'XLA_FLAGS="{w[len("XLA_FLAGS="):]} ${{XLA_FLAGS:-}}"'
           if w.startswith("XLA_FLAGS=") else w for w in words]
  return " ".join(shlex.quote(w) if not re.match(r"^\w+=", w) else w for w in words)


def under_root(text: str, root: str) -> str:
  """A documented command or Python block with its ``/tmp/fg/`` paths under ``root``."""
  return text.replace("/tmp/fg/", os.path.join(root, "fg") + "/")


def sphinx_build(out: str, docs: str = os.path.join(REPO, "docs")) -> list[str]:
  """The command that builds the site in ``docs`` into ``out``: HTML, warnings as errors."""
  return [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", docs, out]


@dataclasses.dataclass
class Outcome:
  """What running one smoke command or Python block gave."""
  where: str
  what: str
  returncode: int
  seconds: float
  output: str


# A process that imports JAX and fairgen once, then forks one child per command (before any
# JAX backend starts, so the children start their own), instead of paying the imports (about
# 2 s) in every process. Requests and answers are JSON lines on stdin and stdout.
_SERVER = r"""
import json, os, runpy, sys, threading, traceback
import jax, flax, optax, orbax.checkpoint  # noqa: F401
import fairgen.audit, fairgen.evaluation.modes, fairgen.train  # noqa: F401
assert threading.active_count() == 1, "a thread at fork time could hold a lock"
answers = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
  request = json.loads(line)
  pid = os.fork()
  if pid == 0:
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    code = 0
    try:
      if "cells" in request:
        namespace = {"__name__": "__main__"}
        for where, text in json.load(open(request["cells"])):
          exec(compile(text, where, "exec"), namespace)
      elif request["argv"][0] == "-m":
        sys.argv = request["argv"][1:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
      else:
        sys.argv = request["argv"]
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
    except BaseException:
      traceback.print_exc()
      code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  _, status = os.waitpid(pid, 0)
  answers.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
  answers.flush()
"""


def _in_process(command: str) -> list[str] | None:
  """``python -m MODULE ...`` or ``python SCRIPT ...`` as the server's argv; None for a
  command that needs a shell or an environment of its own (``XLA_FLAGS=...``)."""
  words = shlex.split(command)
  if words[0] != "python" or any(c in command for c in "$|&;<>`"):
    return None
  return words[1:]


def _steps(path: str, root: str, done: set[str] | None) -> list[tuple[str, str, dict]]:
  """``(where, what, request)`` of each step that runs the page's smoke blocks, in order.

  Consecutive Python blocks are the cells of one session (one process, one namespace), as
  in a notebook; each shell command is a process of its own.
  """
  steps, cells = [], []
  for block in [b for b in blocks(path) if b.marker == "smoke"] + [None]:
    if block is not None and block.language == "python":
      cells.append((block.where, under_root(block.text, root)))
      continue
    if cells:
      cell_file = os.path.join(root, f"cells_{len(os.listdir(root))}.json")
      with open(cell_file, "w") as f:
        json.dump(cells, f)
      steps.append((cells[0][0], f"{len(cells)} python cell(s)", {"cells": cell_file}))
      cells = []
    for command in commands(block.text) if block is not None else []:
      key = smoke_form(command, "$ROOT")
      if done is not None and key in done:
        continue
      if done is not None:
        done.add(key)
      form = smoke_form(command, root)
      argv = _in_process(form)
      steps.append((block.where, form, {"argv": argv} if argv else {"shell": form}))
  return steps


def run_smoke_blocks(path: str, root: str, env: dict[str, str],
                     done: set[str] | None = None) -> list[Outcome]:
  """Runs the smoke blocks of one page in order, in ``root``, from the repository root.

  ``done``: smoke commands (in their ``$ROOT`` form) already run in this ``root``; they are
  skipped and the set is updated, so pages sharing a root run a shared command once. A
  failing command stops the page (what follows depends on it). Python commands and cells
  run in children forked from one process that imported fairgen (``_SERVER``); a command
  with a shell or an environment of its own runs under ``bash``.
  """
  env = dict(env, FAIRGEN_CACHE=os.path.join(root, "cache"))
  os.makedirs(root, exist_ok=True)
  steps = _steps(path, root, done)
  server = None
  if any("shell" not in request for _, _, request in steps):
    server = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=REPO, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
  outcomes = []
  try:
    for where, what, request in steps:
      start, log = time.time(), os.path.join(root, f"step_{len(os.listdir(root))}.log")
      if "shell" in request:
        result = subprocess.run(["bash", "-c", request["shell"]], cwd=REPO, env=env,
                                capture_output=True, text=True)
        code, output = result.returncode, result.stdout + result.stderr
      else:
        server.stdin.write(json.dumps(dict(request, log=log)) + "\n")
        server.stdin.flush()
        answer = server.stdout.readline()
        code = json.loads(answer)["status"] if answer else -1
        output = open(log).read() if os.path.exists(log) else "the command server died"
      outcomes.append(Outcome(where, what, code, time.time() - start, output[-3000:]))
      if code:
        break
  finally:
    if server is not None:
      server.stdin.close()
      server.wait()
  return outcomes


def main(argv: list[str] | None = None) -> int:
  """Lists every block with its marker (and smoke forms), or checks the markers."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--check", action="store_true", help="Only check the markers.")
  parser.add_argument("--run", nargs="+", metavar="PAGE", default=None,
                      help="Run these pages' smoke blocks (in a temporary directory).")
  args = parser.parse_args(argv)
  if args.run:
    root, done, failed = tempfile.mkdtemp(prefix="fairgen_docs_"), set(), False
    for page in args.run:
      for o in run_smoke_blocks(os.path.abspath(page), root, dict(os.environ), done):
        print(f"{o.seconds:6.1f} s  exit {o.returncode}  {o.where}  {o.what}")
        failed |= o.returncode != 0
        if o.returncode:
          print(o.output)
    return 1 if failed else 0
  found = [b for path in doc_files() for b in blocks(path)]
  errors = [p for b in found for p in problems(b)]
  if args.check:
    print("\n".join(errors) or f"{len(found)} code blocks, every one marked")
    return 1 if errors else 0
  for b in found:
    if b.language in RUNNABLE:
      print(f"{b.where} [{b.language}] {b.marker or 'UNMARKED'}")
      if b.marker == "smoke" and b.language == "bash":
        for c in commands(b.text):
          print("   ", smoke_form(c, "$ROOT"))
  print("\n".join(errors))
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
