r"""Decode-and-resize throughput of a folder of JPEGs: fairgen's ``image_folder`` against
tf.data and PyTorch's ``DataLoader``, on the same folder, in interleaved rounds.

    python tools/bench_image_folder.py --num 20000 --rounds 2
    python tools/bench_image_folder.py --num 20000 --tf_python /tmp/tfvenv/bin/python

It writes ``--num`` CelebA-sized JPEGs (178x218, quality 90) into ``--folder`` (kept for
later runs), then times, round after round and peer after peer:
- ``fairgen_first``: ``image_folder.decoded`` into an empty cache (``--workers`` worker
  processes decode, resize the shorter side to ``--size`` and centre-crop);
- ``fairgen_cached``: reading every image of the cached ``FolderSource`` in shuffled batches
  of 256, as float32 in [-1, 1] (what the loader hands the step);
- ``torch``: ``torch.utils.data.DataLoader`` with ``--workers`` workers, batch 256, the
  same PIL decode, resize and crop per image;
- ``tf`` (with ``--tf_python``, a Python that has TensorFlow; it runs this file with
  ``--peer tf``): ``tf.io.decode_jpeg``, ``tf.image.resize`` and a crop in
  ``Dataset.map(num_parallel_calls=AUTOTUNE)``, batch 256.
Prints one JSON line per measurement and a table of the medians in images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

try:
  from fairgen import cli
  from fairgen import images
  from fairgen.data import image_folder
except ImportError:  # --peer=tf runs under a Python that has TensorFlow but not fairgen.
  cli = images = image_folder = None

W, H = 178, 218  # CelebA's aligned images.
BATCH = 256


def write_folder(folder: str, num: int, seed: int = 0) -> list[str]:
  """``num`` smooth random JPEGs in ``folder`` (reused if they are there); their names."""
  os.makedirs(folder, exist_ok=True)
  names = [f"{i:06d}.jpg" for i in range(num)]
  rng = np.random.default_rng(seed)
  for name in names:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
      small = rng.integers(0, 256, (H // 8, W // 8, 3), np.uint8)
      Image.fromarray(small).resize((W, H), Image.BILINEAR).save(path, quality=90)
  return names


def time_fairgen(folder: str, names: list[str], size: int, workers: int) -> dict[str, float]:
  """Images/s of the first (decoding) epoch and of a cached one."""
  cache = tempfile.mkdtemp(prefix="fairgen_bench_cache_")
  try:
    start = time.perf_counter()
    images = image_folder.decoded(folder, names, size, 3, cache, workers)
    first = len(names) / (time.perf_counter() - start)
    spec = image_folder.base.DataSpec("bench", (size, size, 3), 1)
    source = image_folder.FolderSource(spec, images, np.arange(len(names)),
                                       {"label": np.zeros(len(names), np.int32)})
    order = np.random.default_rng(0).permutation(len(names))
    start = time.perf_counter()
    for i in range(0, len(order), BATCH):
      source.get(order[i:i + BATCH])
    cached = len(names) / (time.perf_counter() - start)
    del images, source
  finally:
    shutil.rmtree(cache, ignore_errors=True)
  return {"fairgen_first": first, "fairgen_cached": cached}


class _TorchFolder:
  """The same decode, resize and crop as ``image_folder`` (a map-style dataset)."""

  def __init__(self, paths: list[str], size: int):
    self.paths, self.size = paths, size

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> np.ndarray:
    return images.decode(self.paths[i], self.size, 3)


def time_torch(folder: str, names: list[str], size: int, workers: int) -> float:
  """Images/s of one epoch of a ``DataLoader`` with ``workers`` worker processes."""
  import torch  # pylint: disable=g-import-not-at-top (optional: only this peer needs it)
  torch.set_num_threads(1)
  dataset = _TorchFolder([os.path.join(folder, n) for n in names], size)
  loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True,
                                       num_workers=workers)
  start = time.perf_counter()
  for _ in loader:
    pass
  return len(names) / (time.perf_counter() - start)


def time_tf(folder: str, names: list[str], size: int) -> float:
  """Images/s of one tf.data epoch (run under a Python that has TensorFlow)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def load(path):
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, new, method="bicubic")
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return tf.cast(tf.clip_by_value(image[top:top + size, left:left + size], 0, 255), tf.uint8)

  paths = [os.path.join(folder, n) for n in names]
  dataset = (tf.data.Dataset.from_tensor_slices(paths).shuffle(len(paths), seed=0)
             .map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH)
             .prefetch(tf.data.AUTOTUNE))
  start = time.perf_counter()
  for _ in dataset:
    pass
  return len(names) / (time.perf_counter() - start)


def run_rounds(args: argparse.Namespace, names: list[str]) -> dict[str, list[float]]:
  """Every peer once per round, interleaved; ``{peer: [images/s per round]}``."""
  results: dict[str, list[float]] = {}
  for r in range(args.rounds):
    measured = time_fairgen(args.folder, names, args.size, args.workers)
    if "torch" in args.peers:
      measured["torch"] = time_torch(args.folder, names, args.size, args.workers)
    if args.tf_python:
      out = subprocess.run([args.tf_python, os.path.abspath(__file__), "--peer=tf",
                            f"--folder={args.folder}", f"--num={args.num}",
                            f"--size={args.size}"], capture_output=True, text=True)
      if out.returncode != 0:
        cli.fail(f"--tf_python={args.tf_python}: {out.stderr.strip().splitlines()[-1:]}")
      measured["tf"] = float(out.stdout.strip().splitlines()[-1])
    for peer, value in measured.items():
      results.setdefault(peer, []).append(value)
      print(json.dumps({"round": r, "peer": peer, "images_per_s": round(value, 1)}),
            flush=True)
  return results


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(),
                                                       "fairgen_bench_jpegs"))
  parser.add_argument("--num", type=int, default=20000)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--peers", default="torch", help="'torch', or '' for fairgen alone")
  parser.add_argument("--tf_python", default="", help="a Python with TensorFlow (the tf peer)")
  parser.add_argument("--peer", default="", help=argparse.SUPPRESS)  # Internal: tf's side.
  args = parser.parse_args(argv)
  if args.num < 1 or args.rounds < 1 or args.workers < 1:
    cli.fail("--num, --rounds and --workers must be >= 1.")
  names = [f"{i:06d}.jpg" for i in range(args.num)]
  if args.peer == "tf":
    print(time_tf(args.folder, names, args.size))
    return
  names = write_folder(args.folder, args.num)
  results = run_rounds(args, names)
  medians = {peer: statistics.median(v) for peer, v in results.items()}
  print(f"\n{args.num} JPEGs {W}x{H} -> {args.size}x{args.size}, {args.workers} workers, "
        f"medians of {args.rounds} round(s), images/s:")
  for peer, value in medians.items():
    print(f"  {peer:16s} {value:10.1f}")


if __name__ == "__main__":
  main()
