"""Decoding images into a cache file, in worker processes that import no JAX.

``decode(path, size, channels)`` reads one PNG or JPEG into a ``uint8`` square: its shorter
side resized to ``size``, centre-cropped, with ``channels`` (1 or 3). ``decode_into(out,
paths, size, channels, workers)`` fills a ``.npy`` file's rows, one per path, with
``workers`` processes that each take every ``workers``-th chunk of rows and write them
straight into the file's memory map. The processes are fresh interpreters running this
module (``python -m fairgen.images JOB``), not forks: forking a process that runs JAX can
deadlock, and this module imports only NumPy and Pillow, so a worker starts in a fraction
of a second. Processes rather than threads because Pillow holds the GIL between its decode
and resize calls, which kept two threads at 0.66x the speed of tf.data's and PyTorch's
process workers (``tools/bench_image_folder.py``).

This module is a leaf: it imports nothing of fairgen's (``fairgen/__init__.py`` loads its
API lazily), which is what keeps the workers light.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

CHUNK = 64  # Rows a worker decodes between two looks at its share.


class DecodeError(ValueError):
  """An image that does not decode; the message names the file."""


def decode(path: str, size: int, channels: int) -> np.ndarray:
  """One image: shorter side resized to ``size``, centre-cropped square, ``channels``.

  A JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps the shorter side
  at least ``size`` (Pillow's ``draft``: far fewer pixels to decode), and the crop is
  resampled straight from its box of the decoded image (one bicubic pass).

  Raises:
    DecodeError: for a file Pillow cannot read.
  """
  mode = "L" if channels == 1 else "RGB"
  try:
    with Image.open(path) as image:
      image.draft(mode, (size, size))
      image.load()
      image = image if image.mode == mode else image.convert(mode)
  except Exception as e:  # PIL raises several types for truncated or foreign files.
    raise DecodeError(f"cannot decode {path}: {type(e).__name__}: {e}") from None
  w, h = image.size
  scale = size / min(w, h)
  left = (max(size, round(w * scale)) - size) // 2
  top = (max(size, round(h * scale)) - size) // 2
  box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
  array = np.asarray(image.resize((size, size), Image.BICUBIC, box=box), np.uint8)
  return array.reshape(size, size, channels)


def _work(job: dict, worker: int) -> None:
  """Worker ``worker``'s share of ``job``: chunks ``worker``, ``worker + n``, ... ."""
  out = np.load(job["out"], mmap_mode="r+")
  paths, n, size, channels = job["paths"], job["workers"], job["size"], job["channels"]
  for start in range(worker * CHUNK, len(paths), n * CHUNK):
    for i in range(start, min(start + CHUNK, len(paths))):
      out[i] = decode(paths[i], size, channels)
  out.flush()


def decode_into(out: str, paths: list[str], size: int, channels: int, workers: int) -> None:
  """Fills the ``.npy`` file ``out`` (``uint8 [len(paths), size, size, channels]``, already
  created) with the decoded ``paths``, in ``workers`` processes (fewer for few images).

  Raises:
    DecodeError: the first worker's error line, for an image that does not decode (the
      other workers are stopped).
  """
  workers = max(1, min(workers, -(-len(paths) // CHUNK)))
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump({"out": out, "paths": paths, "size": size, "channels": channels,
               "workers": workers}, f)
  procs = []
  try:
    procs = [subprocess.Popen([sys.executable, "-m", "fairgen.images", f.name, str(k)],
                              stderr=subprocess.PIPE, text=True) for k in range(workers)]
    while any(p.poll() is None for p in procs) and not any(p.returncode for p in procs):
      time.sleep(0.01)
  finally:
    for p in procs:
      if p.poll() is None:  # A failed sibling, or an interrupt here: stop the rest.
        p.kill()
        p.wait()
    os.unlink(f.name)
  for p in procs:
    if p.returncode:
      lines = p.stderr.read().strip().splitlines()
      raise DecodeError(lines[-1] if lines else f"a decoding worker exited {p.returncode}")


def main(argv: list[str]) -> int:
  """A worker: ``python -m fairgen.images JOB_FILE WORKER``."""
  with open(argv[0]) as f:
    job = json.load(f)
  try:
    _work(job, int(argv[1]))
  except DecodeError as e:
    print(e, file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
