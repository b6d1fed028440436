"""JAX's persistent compilation cache for ``fairgen.main``: a program compiles once per machine.

Every run, resume, evaluation and sampling of a config compiles the same programs (the
initial state, the train step, the samplers, the backbones). With the cache on, the first
process writes each compiled executable to a directory and later processes load it instead
of compiling (``docs/benchmarks.md``: time to the first step, cold and warm).

Where: ``--compilation_cache=DIR``, a local directory; by default
``$JAX_COMPILATION_CACHE_DIR`` if it is set, else ``$FAIRGEN_CACHE/xla``
(``~/.cache/fairgen/xla``), on the host's own disk also when the workdir is on gs://
(a gs:// cache is refused: against an unreachable bucket JAX retries for minutes and then
compiles anyway); ``none`` turns it off. In a multi-process job JAX writes entries from
process 0 only: the other hosts load programs only from a directory they share with it
(e.g. a mounted network disk), and otherwise compile their own every time.

What the key covers (JAX's ``jax._src.cache_key``, a SHA-256 over):
  - the program itself (its StableHLO): every value a config bakes into it (learning rates,
    loss weights, shapes and dtypes, ``model.dtype``, the mesh's shardings and the random
    bits' implementation);
  - the compile options: the device assignment and partition count (so the device and
    process counts), and jit's ``compiler_options`` (``train.xla_options``,
    ``parallel.cpu_convolution_options``);
  - ``XLA_FLAGS`` and ``--xla*`` arguments (less dump and device-count flags, which do not
    change the executable);
  - the device kinds, the backend and its version (a jaxlib upgrade starts afresh).
A config value that is not in any program (a directory, a logging interval) leaves the key
alone, rightly: the program is the same. ``tests/test_compile_cache.py`` checks that a warm
run (and one with the cache off) trains exactly as the cold one did, and that runs which
differ in a learning rate, in ``train.xla_options`` or in the device count compile their
own programs against the same warm cache instead of repeating the first run's losses.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax

from fairgen import storage

DEFAULT_SUBDIR = "xla"
OFF = "none"
# Cache every program, however fast it compiled (JAX's default is 1 s): a run's many small
# programs (initializers, eager ops, metrics) add up; measured in docs/benchmarks.md.
MIN_COMPILE_SECONDS = 0.0
_EVENTS = {"/jax/compilation_cache/cache_hits": "hits",
           "/jax/compilation_cache/cache_misses": "misses"}


def default_dir() -> str:
  """``$JAX_COMPILATION_CACHE_DIR`` if set, else ``$FAIRGEN_CACHE/xla``."""
  return (os.environ.get("JAX_COMPILATION_CACHE_DIR") or
          os.path.join(storage.cache_dir(), DEFAULT_SUBDIR))


def enable(directory: str | None = None) -> str | None:
  """Turns JAX's persistent compilation cache on in ``directory`` (None: ``default_dir()``),
  or off for ``'none'``; call it before the first compilation.

  ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``, if set, overrides ``MIN_COMPILE_SECONDS``.

  Returns:
    The cache directory, or None when it is off.

  Raises:
    StorageError: a remote (gs://) path, or a directory that cannot be created.
  """
  if directory is not None and directory.strip().lower() == OFF:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  path = directory or default_dir()
  if storage.is_remote(path):  # Unreachable buckets cost minutes of retries per program.
    raise storage.StorageError(
        f"{path}: the compilation cache must be a local directory (each host keeps its own).")
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise storage.StorageError(f"{path}: cannot create it ({e.strerror}).") from None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return path


def counter() -> Callable[[], dict[str, int]]:
  """Starts counting this process's cache hits and misses; the result reads them.

  A miss is a program compiled here (and then written, on process 0); a hit one loaded.
  """
  counts = {name: 0 for name in _EVENTS.values()}

  def listen(event: str, **_: Any) -> None:
    if event in _EVENTS:
      counts[_EVENTS[event]] += 1

  jax.monitoring.register_event_listener(listen)
  return lambda: dict(counts)
