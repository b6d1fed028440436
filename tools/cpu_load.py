"""CPU load and timing helpers shared by the benchmark tools (Linux ``/proc/stat``).

Shared by ``benchmark.py``, ``bench_torch.py``, ``bench_tf.py`` and ``compare_peers.py``;
imports neither JAX, PyTorch nor TensorFlow.
"""

from __future__ import annotations

import argparse
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


def peer_parser(description: str, modes: Sequence[str], default_modes: str
                ) -> argparse.ArgumentParser:
  """The options ``bench_torch.py`` and ``bench_tf.py`` share (their own come on top)."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--model", choices=("dcgan", "vae", "edm_unet", "dit_s"), required=True)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--iters", type=int, default=0,
                 help="per round (default: 5 DCGAN, 200 VAE, 6 EDM U-Net, 2 DiT-S)")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--warmup", type=int, default=3, help="untimed iterations per mode")
  p.add_argument("--modes", default=default_modes, help=f"comma-separated: {', '.join(modes)}")
  return p


def parse_peer_args(p: argparse.ArgumentParser, argv: Sequence[str] | None,
                    modes: Sequence[str]) -> argparse.Namespace:
  """Parses and checks a peer's command line; ``iters`` gets its per-model default and
  ``modes`` becomes a list."""
  args = p.parse_args(argv)
  args.modes = [m for m in args.modes.split(",") if m]
  unknown = sorted(set(args.modes) - set(modes))
  if unknown or not args.modes:
    p.error(f"--modes: unknown {unknown}; valid: {', '.join(modes)}")
  if args.rounds < 1 or args.iters < 0 or args.warmup < 0 or args.batch < 1:
    p.error("--rounds, --batch >= 1 and --iters, --warmup >= 0, please")
  args.iters = args.iters or {"dcgan": 5, "edm_unet": 6, "dit_s": 2}.get(args.model, 200)
  return args


def time_peer(steps: Mapping[str, Callable[[], Any]], args: argparse.Namespace,
              tag: str) -> dict[str, Any]:
  """Warms each step up, times them in interleaved rounds, and returns the JSON fields a
  peer reports: rounds, iters, loadavg, compile_warmup_s, it_per_s, others_cpu_share,
  it_per_s_quiet and fastest."""
  warm = {}
  for name, step in steps.items():
    start = time.perf_counter()
    for _ in range(args.warmup):
      step()
    warm[name] = round(time.perf_counter() - start, 2)
    print(f"[{tag}] {name}: warm-up {warm[name]} s", file=sys.stderr, flush=True)
  rates, others = time_rounds(steps, args.rounds, args.iters, tag)
  speed = {n: stats(v) for n, v in rates.items()}
  return {"rounds": args.rounds, "iters": args.iters,
          "loadavg": [round(x, 2) for x in os.getloadavg()], "compile_warmup_s": warm,
          "it_per_s": speed,
          "others_cpu_share": {n: round(statistics.median(v), 3) for n, v in others.items()},
          "it_per_s_quiet": {n: quiet_stats(rates[n], others[n], "rounds") for n in steps},
          "fastest": max(speed, key=lambda n: speed[n]["median"])}
