"""Workdir I/O that works the same on local disk and on ``gs://`` (Google Cloud Storage).

Every file fairgen writes in a workdir goes through here (Orbax checkpoints go through
Orbax, which uses the same path library, etils.epath, and TensorStore). Paths stay strings;
``gs://bucket/dir`` is joined with ``os.path.join`` like a local path.

What differs on object storage, and how it is handled:
- No atomic rename: ``write_atomic`` writes a local file to a temporary name and renames it;
  on gs:// a single upload is already atomic (readers see the old object or the new one).
- No append: ``Appender`` keeps what the object held and uploads the whole text again
  (metrics.jsonl is a few hundred kB for a long run).
- No ``fcntl``: the workdir lock is a lease object (``robust.WorkdirLock``).
- Other writers: TensorStore and other hosts write objects that gcsfs does not see, so its
  listing cache is turned off.

Emulators: with ``STORAGE_EMULATOR_HOST`` set (the variable Google's clients read), gcsfs
and google-cloud-storage talk to the emulator; this module also points TensorStore (Orbax's
array I/O) at it and turns off gcsfs's gRPC bucket probe, which an HTTP emulator cannot
answer. Real buckets are untouched by this.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import tempfile
from typing import Any

REMOTE_PREFIX = "gs://"


class StorageError(RuntimeError):
  """A path fairgen cannot use (an unsupported scheme, gs:// without gcsfs)."""


def _configure_clients() -> None:
  # gcsfs caches directory listings forever by default; TensorStore (Orbax's arrays) and
  # other hosts write behind its back, so a cached listing would miss a new checkpoint.
  try:
    import fsspec.config  # pylint: disable=g-import-not-at-top
  except ImportError:
    pass
  else:
    for protocol in ("gs", "gcs"):
      fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if not host:
    return
  if "://" not in host:
    host = "http://" + host
  os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
  os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


_configure_clients()


def cache_dir() -> str:
  """``$FAIRGEN_CACHE``, or ``~/.cache/fairgen``: where fairgen keeps what it makes once per
  machine (backbones, decoded image folders, compiled programs)."""
  return os.environ.get("FAIRGEN_CACHE") or os.path.join("~", ".cache", "fairgen")


def is_remote(path: str) -> bool:
  """Whether ``path`` is on object storage (gs://)."""
  return str(path).startswith(REMOTE_PREFIX)


def normalize(path: str) -> str:
  """An absolute local path, or a gs:// path without a trailing slash.

  Raises:
    StorageError: for other URL schemes (s3://, http://, ...), or a gs:// path without
      a bucket, or gs:// when gcsfs is not installed.
  """
  path = str(path)
  if is_remote(path):
    bucket = path[len(REMOTE_PREFIX):].split("/")[0]
    if not bucket:
      raise StorageError(f"{path}: a gs:// path needs a bucket (gs://BUCKET/DIR).")
    if importlib.util.find_spec("gcsfs") is None:
      raise StorageError(f"{path}: gs:// paths need gcsfs; install it with "
                         f"pip install 'fairgen[gcs]'.")
    return path.rstrip("/")
  if "://" in path:
    raise StorageError(f"{path}: only local paths and gs:// are supported.")
  return os.path.abspath(os.path.expanduser(path))


def _epath(path: str) -> Any:
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path)


def exists(path: str) -> bool:
  """Whether a file or directory exists at ``path``."""
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  """Whether ``path`` is a directory (on gs://: a prefix with objects below it)."""
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  """Whether ``path`` is a file (an object)."""
  return _epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def makedirs(path: str) -> None:
  """Creates ``path`` and its parents (nothing to do on gs://, where prefixes are implicit)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """The names in directory ``path`` (empty if it does not exist)."""
  if not isdir(path):
    return []
  if is_remote(path):
    return sorted(p.name for p in _epath(path).iterdir())
  return sorted(os.listdir(path))


def read_bytes(path: str) -> bytes:
  """The contents of file ``path``."""
  if is_remote(path):
    return _epath(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  """The contents of text file ``path``."""
  return read_bytes(path).decode("utf-8")


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes ``path`` so that readers see the old contents or the new, never a part.

  Parent directories are created. Locally: a temporary file in the same directory, then
  ``os.replace``. On gs://: one upload (GCS objects are replaced atomically).
  """
  if isinstance(data, str):
    data = data.encode("utf-8")
  if is_remote(path):
    _epath(path).write_bytes(data)
    return
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save_npy(path: str, array: Any) -> None:
  """``np.save`` to any path, atomically."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  np.save(buf, array, allow_pickle=False)
  write_atomic(path, buf.getvalue())


def load_npy(path: str) -> Any:
  """``np.load`` from any path (no pickles)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def remove(path: str) -> None:
  """Deletes file ``path``."""
  if is_remote(path):
    _epath(path).unlink()
  else:
    os.remove(path)


def rmtree(path: str) -> None:
  """Deletes directory ``path`` and everything below it."""
  if is_remote(path):
    _epath(path).rmtree()
  else:
    shutil.rmtree(path)


def move(src: str, dst: str) -> None:
  """Moves a file or directory (on gs://: copies each object, then deletes the source)."""
  if not is_remote(src) and not is_remote(dst):
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    os.replace(src, dst)
    return
  _copy(_epath(src), _epath(dst))
  if isdir(src):
    rmtree(src)
  else:
    remove(src)


def _copy(source: Any, target: Any) -> None:
  """Copies a file or a directory tree object by object (epath has no recursive glob on
  gs://)."""
  if source.is_dir():
    target.mkdir(parents=True, exist_ok=True)
    for child in source.iterdir():
      _copy(child, target / child.name)
  else:
    target.write_bytes(source.read_bytes())


class Appender:
  """Appends text to one file. Locally a real append; on gs://, where objects cannot be
  appended to, the whole text (what the object held when opened, plus every append) is
  uploaded again at each ``append``."""

  def __init__(self, path: str):
    self.path = path
    self._text: str | None = None
    if is_remote(path):
      self._text = read_text(path) if isfile(path) else ""
    else:
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

  def append(self, text: str) -> None:
    """Adds ``text`` at the end of the file."""
    if self._text is None:
      with open(self.path, "a") as f:
        f.write(text)
      return
    self._text += text
    write_atomic(self.path, self._text)
