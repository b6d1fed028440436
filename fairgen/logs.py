"""Run logs on process 0: ``metrics.jsonl``, TensorBoard events (scalars, and the sample
grids and charts as images), progress lines, PNG grids, and ``jax.profiler`` traces.

TensorBoard events are written with tensorboardX (clu's writers import TensorFlow); on a
gs:// workdir its GCS writer uploads the events file again at each flush.
After a crash, steps between the last checkpoint and the crash are logged again on resume;
readers take the last entry of each step.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from PIL import Image

from fairgen import storage

METRICS_FILE = "metrics.jsonl"


def summary_writer(logdir: str) -> Any:
  """tensorboardX's ``SummaryWriter`` for ``logdir``, imported without PyTorch.

  tensorboardX imports torch whenever it is installed (only to accept torch tensors; fairgen
  passes NumPy arrays), which took 2.2 s of every run's start here (torch 2.13, CPU build):
  more than JAX's own import. A torch that is already imported stays; later imports of torch
  work as usual.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
  else:
    sys.modules["torch"] = None  # ``import torch`` raises ImportError, which it catches.
    try:
      from tensorboardX import SummaryWriter
    finally:
      if sys.modules.get("torch", 0) is None:
        del sys.modules["torch"]
  return SummaryWriter(logdir=logdir, flush_secs=30)


class MetricLogger:
  """Writes scalars to ``WORKDIR/metrics.jsonl`` and TensorBoard; prints progress."""

  def __init__(self, workdir: str, total_steps: int, start_step: int):
    self.workdir = workdir
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self._last_time = time.perf_counter()
    self._last_step = start_step
    self._tb = None
    self._metrics: storage.Appender | None = None
    if self.enabled:
      self._metrics = storage.Appender(os.path.join(workdir, METRICS_FILE))
      self._tb = summary_writer(workdir)  # Only process 0 writes events.

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Appends one JSON line and the TensorBoard scalars for ``step``."""
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._metrics.append(json.dumps(record) + "\n")
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(v), int(step))

  def image(self, tag: str, images: np.ndarray, step: int) -> None:
    """Adds NHWC images in [-1, 1], tiled into one grid, to TensorBoard as ``tag``."""
    if self.enabled:
      self._tb.add_image(tag, image_grid(images), int(step), dataformats="HWC")

  def image_file(self, tag: str, path: str, step: int) -> None:
    """Adds a PNG file (e.g. an evaluator's chart) to TensorBoard as ``tag``, if it exists."""
    if self.enabled and storage.exists(path):
      with Image.open(io.BytesIO(storage.read_bytes(path))) as image:
        pixels = np.asarray(image.convert("RGB"))
      self._tb.add_image(tag, pixels, int(step), dataformats="HWC")

  def progress(self, step: int, scalars: Mapping[str, float]) -> dict[str, float]:
    """Logs a progress line; returns the throughput scalars it computed."""
    now = time.perf_counter()
    steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else math.inf
    losses = " ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items()))
    if self.enabled:
      logging.info("step %d/%d  %s  %.2f steps/s  ETA %s", step, self.total_steps, losses,
                   steps_per_sec, _format_seconds(eta))
    return {"steps_per_sec": steps_per_sec}

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}"


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
  """Tiles NHWC images in [-1, 1] into one uint8 HxWxC grid."""
  images = np.asarray(images, np.float32)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  pixels = np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = pixels[i]
  return grid


class Profiler:
  """Traces train steps ``[start, stop)`` with ``jax.profiler`` into ``WORKDIR/profile``
  (``train.profile_steps``; process 0). The trace (``plugins/profile/<run>/*.xplane.pb``
  and ``*.trace.json.gz``) opens in TensorBoard's profile plugin (``tensorboard
  --logdir=WORKDIR``, with ``tensorboard-plugin-profile``) or, the ``.trace.json.gz``, in
  Perfetto (ui.perfetto.dev). On a gs:// workdir it is traced locally and then copied."""

  def __init__(self, workdir: str, steps: tuple[int, ...]):
    self.enabled = bool(steps) and jax.process_index() == 0
    self.start, self.stop = (tuple(steps) + (0, 0))[:2]
    self.target = os.path.join(workdir, "profile")
    self.local = self.target if not storage.is_remote(workdir) else tempfile.mkdtemp()
    self.active = False

  def before(self, step: int) -> None:
    """Starts the trace before step ``start``."""
    if self.enabled and step == self.start and not self.active:
      jax.profiler.start_trace(self.local)
      self.active = True

  def after(self, done: int, outputs: object) -> None:
    """Stops the trace once ``stop`` steps are done (waiting for ``outputs``)."""
    if self.active and done >= self.stop:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    """Stops a running trace and copies it to a remote workdir."""
    if not self.active:
      return
    jax.profiler.stop_trace()
    self.active = False
    logging.info("Profile of steps [%d, %d) in %s.", self.start, self.stop, self.target)
    if self.local != self.target:
      for root, _, files in os.walk(self.local):
        for name in files:
          path = os.path.join(root, name)
          with open(path, "rb") as f:
            storage.write_atomic(os.path.join(
                self.target, os.path.relpath(path, self.local)), f.read())


def save_image_grid(images: np.ndarray, path: str, ncols: int | None = None,
                    scale: int = 1) -> None:
  """Writes a PNG grid of NHWC images in [-1, 1] (``scale`` enlarges small images)."""
  grid = image_grid(images, ncols)
  if grid.shape[-1] == 1:
    grid = grid[..., 0]
  image = Image.fromarray(grid)
  if scale > 1:
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  storage.write_atomic(path, buf.getvalue())
