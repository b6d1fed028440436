"""CPU load and timing helpers shared by the benchmark tools (Linux ``/proc/stat``).

Shared by ``benchmark.py``, ``bench_torch.py``, ``bench_tf.py`` and ``compare_peers.py``;
imports neither JAX, PyTorch nor TensorFlow.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Callable, Mapping, Sequence

# A repeat or round counts as quiet if other processes used less than this share of all cores.
QUIET_SHARE = 0.05


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


def sig(value: float, digits: int = 5) -> float:
  """``value`` to ``digits`` significant digits: small times keep their relative precision."""
  return float(f"{value:.{digits}g}")


def stats(values: Sequence[float]) -> dict[str, float]:
  """{median, min, max} of ``values``, to 5 significant digits."""
  return {"median": sig(statistics.median(values)),
          "min": sig(min(values)), "max": sig(max(values))}


def quiet_stats(values: Sequence[float], shares: Sequence[float],
                count_key: str = "repeats") -> dict[str, Any] | None:
  """``stats`` over the values during which other processes used < QUIET_SHARE of the CPU.

  Returns None if there were none; else the stats and their count under ``count_key``.
  """
  quiet = [v for v, share in zip(values, shares) if share < QUIET_SHARE]
  return {**stats(quiet), count_key: len(quiet)} if quiet else None


def time_rounds(steps: Mapping[str, Callable[[], Any]], rounds: int, iters: int,
                tag: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
  """Times named step functions in interleaved rounds (round 1: A, B, ...; round 2: ...).

  Args:
    steps: name -> a function that runs one iteration and returns when its work is done.
    rounds: how many rounds; iters: iterations of each step per round.
    tag: the progress lines' prefix (on stderr).

  Returns:
    ({name: iterations/s per round}, {name: the others' CPU share during each round}).
  """
  rates: dict[str, list[float]] = {name: [] for name in steps}
  others: dict[str, list[float]] = {name: [] for name in steps}
  for r in range(rounds):
    for name, step in steps.items():
      before = cpu_snapshot()
      for _ in range(iters):
        step()
      after = cpu_snapshot()
      rates[name].append(iters / (after[0] - before[0]))
      others[name].append(others_share(before, after))
    print(f"[{tag}] round {r + 1}/{rounds}: " +
          ", ".join(f"{n} {v[-1]:.3f} it/s" for n, v in rates.items()),
          file=sys.stderr, flush=True)
  return rates, others


def wait_quiet(max_share: float = QUIET_SHARE, window_s: float = 1.0,
               timeout_s: float = 60.0) -> float:
  """Waits until other processes use < ``max_share`` of all cores over a ``window_s`` window.

  Gives up after ``timeout_s`` (the caller reports the load it ran under). Returns the
  share measured in the last window.
  """
  deadline = time.perf_counter() + timeout_s
  while True:
    before = cpu_snapshot()
    time.sleep(window_s)
    share = others_share(before, cpu_snapshot())
    if share < max_share or time.perf_counter() >= deadline:
      return share
