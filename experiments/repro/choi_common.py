"""What the Choi et al. 2020 reproductions share: resumable runs, table cells, result files.

``choi2020_mnist.py``, ``choi2020_celeba.py`` and the other scripts beside it load it with
``fairgen.cli.import_beside``.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from fairgen import train
from fairgen.evaluation import modes


def run_or_load(workdir: str, config: Any, metrics: Sequence[str],
                extra: Callable[[Any, str], dict[str, float]] | None = None,
                label: str = "") -> dict[str, float]:
  """Trains and evaluates one run into ``workdir``, or reads the result of a finished one.

  The result (``metrics`` from the final evaluation, the run's seconds, and what ``extra
  (config, workdir)`` adds) is saved as ``workdir/repro_result.json`` last, so a run whose
  workdir holds it is not repeated, and an interrupted one resumes from its checkpoint
  (one trained to the end but stopped before its result was saved is evaluated again).
  A finished run lacking some of ``metrics`` (added to the script since) has its final
  checkpoint evaluated again for them, without retraining.
  A preempted run (SIGTERM/SIGINT) exits the script with the command to resume.
  """
  result_path = os.path.join(workdir, "repro_result.json")
  if os.path.exists(result_path):
    with open(result_path) as f:
      result = json.load(f)
    missing = [k for k in metrics if k not in result]
    if missing:  # A metric added since the run finished: evaluate its final checkpoint.
      fresh = modes.evaluate(config, workdir)["metrics"]
      result.update({k: float(fresh.get(k, float("nan"))) for k in missing})
      with open(result_path, "w") as f:
        json.dump(result, f, indent=2)
    return result
  start = time.perf_counter()
  summary = train.train_and_evaluate(config, workdir)
  if summary["preempted"]:  # The run saved its state; stop here.
    sys.exit(f"Interrupted during {workdir}; run the same command again to resume.")
  # No evaluation in the summary: the workdir was already trained to the end (a run stopped
  # during its final evaluation), so evaluate its final checkpoint now.
  evaluation = summary.get("eval") or modes.evaluate(config, workdir)["metrics"]
  result = {k: float(evaluation.get(k, float("nan"))) for k in metrics}
  result["seconds"] = time.perf_counter() - start
  if extra is not None:
    result.update(extra(config, workdir))
  with open(result_path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"{label}: " + " ".join(f"{k}={v:.4g}" for k, v in result.items()), flush=True)
  return result


def cell(values: Sequence[float], digits: int = 3) -> str:
  """Mean ± std of the finite values (one value as it is; none as '–')."""
  values = [v for v in values if np.isfinite(v)]
  if not values:
    return "–"
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def run_time_line(results: dict, seeds: int, total: float) -> str:
  """One line on the runs' recorded times (across invocations) and this invocation's."""
  seconds = [r["seconds"] for r in results.values()]
  return (f"{len(results)} runs, {seeds} seeds. Run times (train + evaluation, as recorded "
          f"by each run, across invocations): median {np.median(seconds):.0f} s, "
          f"min {np.min(seconds):.0f} s, max {np.max(seconds):.0f} s, "
          f"sum {np.sum(seconds):.0f} s; this invocation took {total:.0f} s.")


def write_outputs(out: str, text: str, key_names: Sequence[str], results: dict,
                  columns: Sequence[str]) -> None:
  """Prints ``text`` and writes it to ``OUT/results.md``; one CSV row per run to
  ``OUT/results.csv`` (the result key's parts, then ``columns``)."""
  print(text)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow([*key_names, *columns])
    for key, r in sorted(results.items()):
      writer.writerow([*key, *(r.get(k, "") for k in columns)])
