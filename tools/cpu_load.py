"""How busy other processes keep the CPU while a benchmark runs (Linux ``/proc/stat``).

Shared by ``benchmark.py`` and ``bench_torch.py``; imports neither JAX nor PyTorch.
"""

from __future__ import annotations

import os
import time


def cpu_snapshot() -> tuple[float, float, float]:
  """(wall s, CPU s used by all processes, CPU s used by this one); Linux /proc/stat."""
  own = sum(os.times()[:2])
  try:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
    busy = (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError):
    busy = float("nan")
  return time.perf_counter(), busy, own


def others_share(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
  """The share of all cores that other processes used between two ``cpu_snapshot``s."""
  wall = after[0] - before[0]
  others = (after[1] - before[1]) - (after[2] - before[2])
  return min(max(others / (wall * (os.cpu_count() or 1)), 0.0), 1.0)
