"""What fairgen's command lines share: the one bad-input line, and loading scripts' neighbours.

A leaf: it imports no other part of fairgen (nor JAX), so a launcher or tool can use it
before anything heavy starts. ``fairgen.main`` and every script under ``tools/`` and
``experiments/repro/`` report bad input with ``fail``: one ``fairgen: error:`` line on stderr
and exit status 2. Scripts load the modules beside them with ``import_beside``, never by
editing ``sys.path``, so that they work when loaded by file path (as the tests load them),
not only when run as ``python tools/x.py``. Experiment configs load with
``fairgen.config.load_config_file``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types
from typing import NoReturn

EXIT_USAGE = 2  # The exit status of bad input (argparse's and absl's, too).


def error_line(message: object) -> str:
  """``fairgen: error: <message>``, the message's lines joined into one."""
  text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
  return f"fairgen: error: {text}"


def fail(message: object) -> NoReturn:
  """Prints ``fairgen: error: <message>`` on one line to stderr and exits with status 2.

  Args:
    message: what is wrong and, where it helps, what to do; an exception's text works too
      (``fairgen.config.one_line`` makes ``Type: message`` of one).

  Raises:
    SystemExit: always, with code 2.
  """
  print(error_line(message), file=sys.stderr)
  sys.exit(EXIT_USAGE)


def load_module(path: str, name: str | None = None) -> types.ModuleType:
  """Imports the Python file ``path`` as module ``name`` (default: the file's stem).

  The module is registered in ``sys.modules`` before it runs (dataclasses look their module
  up there while decorating), so every later ``load_module`` or ``import`` of the name gets
  the same module; one already registered under ``name`` from the same file is returned.

  Raises:
    FileNotFoundError: ``path`` is not a file.
  """
  path = os.path.realpath(path)
  name = name or os.path.splitext(os.path.basename(path))[0]
  previous = sys.modules.get(name)
  known = getattr(previous, "__file__", None)
  if known and os.path.realpath(known) == path:
    return previous
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such Python file (module {name}).")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    if previous is None:  # As a failed import does: the next attempt starts afresh.
      del sys.modules[name]
    else:
      sys.modules[name] = previous
    raise
  return module


def import_beside(script: str, name: str) -> types.ModuleType:
  """The module ``name`` from ``name.py`` in the directory of ``script`` (its ``__file__``).

  ``python tools/x.py`` finds a module beside it by ``import`` alone, but a script loaded by
  file path (``importlib``, as the tests do) does not: this finds it either way.
  """
  return load_module(os.path.join(os.path.dirname(os.path.abspath(script)), f"{name}.py"), name)


class QuietLibraries(logging.Filter):
  """A filter for the launcher's log: drops the INFO chatter of Orbax and TFDS (several
  lines per checkpoint), and turns the traceback Orbax logs beside an error of its
  background commit thread into the record's last clause. That error reaches the main
  thread (``wait_until_finished`` raises it), or, when a peer of a multi-process job died
  mid-commit, the job's own one-line explanation says what happened."""

  def filter(self, record: logging.LogRecord) -> bool:
    noisy = any(f"/{name}/" in record.pathname
                for name in ("orbax", "tensorflow_datasets", "fsspec", "gcsfs"))
    if noisy and record.exc_info and record.exc_info[1] is not None:
      error = record.exc_info[1]
      lines = str(error).strip().splitlines()
      record.msg = f"{record.getMessage()} ({type(error).__name__}: {lines[0] if lines else ''})"
      record.args, record.exc_info, record.exc_text = (), None, None
    return record.levelno >= logging.WARNING or not noisy
