"""Time from launch to the first finished step, with JAX's compilation cache cold and warm.

  python tools/bench_first_step.py                      # every scenario, 2 rounds
  python tools/bench_first_step.py --scenarios main,resume --rounds 1

Each run is ``python -m fairgen.main`` in a fresh process, timed from its start to the log
line of its first finished step (``train.py``: "First step ... took"), after which it is
stopped by SIGTERM (fairgen's preemption path: it checkpoints and exits cleanly). Evaluation
is timed to the process's exit. Scenarios (``fairgen.main`` on the full configs):
  main        experiments/dcgan_mnist.py (the main job)
  resnet_gan  experiments/resnet_gan_mnist.py
  ddpm        experiments/ddpm_mnist.py
  resume      the main job resumed from the checkpoint of its stopped run
  evaluate    --mode=evaluate of that checkpoint (1,000 samples, FID/KID/PRDC/IS on the
              mnist_5k classifier, which this tool trains first if ``$FAIRGEN_CACHE`` lacks it)
Cold: an empty cache directory (``--compilation_cache``); warm: the same directory after
the cold run (for ``resume``, after the run it resumes; for ``evaluate``, after a first
evaluation). Each round makes fresh directories under ``--root``.

Output: a Markdown table on stderr (for docs/benchmarks.md, with the date, machine and this
command) and one JSON object on stdout: {"date", "machine" ({"cpu", "cores", "flags"}, as
``benchmark.py --compare`` reports it), "rounds", "scenarios": {name:
{"cold_s": [...], "warm_s": [...], "warm_over_cold": median ratio, "cold_compiled",
"warm_loaded", "warm_compiled" (programs, the last round's)}}}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from fairgen import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = ("main", "resnet_gan", "ddpm", "resume", "evaluate")
CONFIGS = {"main": "experiments/dcgan_mnist.py", "resnet_gan": "experiments/resnet_gan_mnist.py",
           "ddpm": "experiments/ddpm_mnist.py", "resume": "experiments/dcgan_mnist.py",
           "evaluate": "experiments/dcgan_mnist.py"}
_FIRST_STEP = "First step ("
_COUNTS = re.compile(r"Compilation cache \S+: (\d+) program\(s\) loaded, (\d+) compiled\.")


def launch(config: str, workdir: str, cache: str, *extra: str, stop_at_first_step: bool = True
           ) -> dict[str, Any]:
  """Runs fairgen.main; {"seconds" to the first step (or to exit), "loaded", "compiled"}."""
  argv = [sys.executable, "-m", "fairgen.main", f"--config={config}", f"--workdir={workdir}",
          f"--compilation_cache={cache}", *extra]
  start = time.perf_counter()
  proc = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True)
  seconds, lines = None, []
  for line in proc.stderr:
    lines.append(line)
    if seconds is None and stop_at_first_step and _FIRST_STEP in line:
      seconds = time.perf_counter() - start
      proc.send_signal(signal.SIGTERM)
  code = proc.wait()
  if code != 0:
    raise RuntimeError(f"{' '.join(argv)} exited {code}: {''.join(lines[-5:])}")
  if seconds is None:
    if stop_at_first_step:
      raise RuntimeError(f"{' '.join(argv)} logged no first step")
    seconds = time.perf_counter() - start
  counts = _COUNTS.findall("".join(lines))
  loaded, compiled = (int(counts[-1][0]), int(counts[-1][1])) if counts else (None, None)
  return {"seconds": round(seconds, 2), "loaded": loaded, "compiled": compiled}


def ensure_classifier() -> None:
  """The mnist_5k classifier the main job evaluates with, trained if missing."""
  from fairgen.classifiers import backbones  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(os.path.expanduser(backbones.default_classifier_dir("mnist_5k"))):
    subprocess.run([sys.executable, "tools/train_classifier.py", "--dataset=mnist_5k"],
                   cwd=REPO, check=True, capture_output=True)


def one_round(scenario: str, root: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(cold, warm) of one scenario, in fresh directories under ``root``."""
  config, cache = CONFIGS[scenario], os.path.join(root, "xla")
  if scenario in ("main", "resnet_gan", "ddpm"):
    cold = launch(config, os.path.join(root, "cold"), cache)
    return cold, launch(config, os.path.join(root, "warm"), cache)
  stopped = os.path.join(root, "stopped")
  launch(config, stopped, cache)  # Stopped after its first step: a checkpoint at step 1.
  if scenario == "resume":
    for name in ("cold", "warm"):
      shutil.copytree(stopped, os.path.join(root, name))
    cold = launch(config, os.path.join(root, "cold"), os.path.join(root, "xla_empty"))
    return cold, launch(config, os.path.join(root, "warm"), cache)
  ensure_classifier()
  fresh = os.path.join(root, "xla_eval")
  runs = [launch(config, stopped, fresh, "--mode=evaluate", stop_at_first_step=False)
          for _ in range(2)]  # The second finds the cache the first filled.
  return runs[0], runs[1]


def summarize(results: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]]
              ) -> dict[str, Any]:
  """Per scenario: the cold and warm seconds of each round, their median ratio, and the
  last warm run's cache counts."""
  out = {}
  for name, rounds in results.items():
    cold = [c["seconds"] for c, _ in rounds]
    warm = [w["seconds"] for _, w in rounds]
    out[name] = {"cold_s": cold, "warm_s": warm,
                 "warm_over_cold": round(statistics.median(
                     w / c for c, w in zip(cold, warm)), 3),
                 "cold_compiled": rounds[-1][0]["compiled"],
                 "warm_loaded": rounds[-1][1]["loaded"],
                 "warm_compiled": rounds[-1][1]["compiled"]}
  return out


def markdown(summary: dict[str, Any]) -> str:
  """The table for docs/benchmarks.md."""
  lines = ["| scenario | cold, s | warm, s | warm / cold | programs compiled cold; "
           "loaded / compiled warm |", "|---|---|---|---|---|"]
  for name, s in summary.items():
    lines.append(f"| {name} | {', '.join(f'{x:.1f}' for x in s['cold_s'])} | "
                 f"{', '.join(f'{x:.1f}' for x in s['warm_s'])} | {s['warm_over_cold']:.2f} | "
                 f"{s['cold_compiled']}; {s['warm_loaded']} / {s['warm_compiled']} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--scenarios", default=",".join(SCENARIOS),
                 help=f"comma-separated: {', '.join(SCENARIOS)}")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--root", default=None, help="scratch directory (default: a temporary one)")
  args = p.parse_args(argv)
  scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
  bad = [s for s in scenarios if s not in SCENARIOS]
  if bad or args.rounds < 1:
    cli.fail(f"--scenarios: unknown {bad}; valid: {', '.join(SCENARIOS)}" if bad else
             f"--rounds must be >= 1, got {args.rounds}.")
  root = args.root or tempfile.mkdtemp(prefix="fairgen_first_step_")
  results: dict[str, list[Any]] = {s: [] for s in scenarios}
  for r in range(args.rounds):
    for scenario in scenarios:
      cold, warm = one_round(scenario, os.path.join(root, f"{scenario}_{r}"))
      results[scenario].append((cold, warm))
      print(f"[first step] {scenario} round {r + 1}: cold {cold['seconds']} s, warm "
            f"{warm['seconds']} s", file=sys.stderr, flush=True)
  summary = summarize(results)
  print(markdown(summary), file=sys.stderr, flush=True)
  machine = cli.import_beside(__file__, "compare_peers").machine()
  print(json.dumps({"date": datetime.date.today().isoformat(), "machine": machine,
                    "rounds": args.rounds, "scenarios": summary}))


if __name__ == "__main__":
  main()
