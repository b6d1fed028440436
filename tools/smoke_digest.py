r"""Digests of every experiment's smoke run: its metrics and its checkpoints, bit for bit.

A refactor that must not change behaviour is checked by running this before and after it
and comparing the two outputs line by line::

    python tools/smoke_digest.py > /tmp/before.txt      # on the old commit
    python tools/smoke_digest.py > /tmp/after.txt       # on the new one
    diff /tmp/before.txt /tmp/after.txt && echo identical

Each line is ``<case> <what> <sha256>``: ``metrics`` hashes ``metrics.jsonl`` without
its wall-clock fields, ``checkpoint/<step>`` hashes every array of that checkpoint (its tree
path, dtype, shape and bytes), and ``eval/<file>`` each evaluation JSON without timings.
An experiment whose smoke run cannot start here (a TFDS dataset that is not on disk) prints
``<experiment> skipped <the error line>``. The fairgen that runs is the one in this checkout.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import orbax.checkpoint as ocp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Wall-clock fields: they differ run to run by design.
TIMING_KEYS = ("steps_per_sec", "input_wait_seconds", "seconds", "time", "eval_seconds")


def _strip_timings(record: dict) -> dict:
  """The record without wall-clock fields (keys naming seconds or rates)."""
  return {k: v for k, v in record.items()
          if not any(t in k for t in TIMING_KEYS)}


def _hash_json_lines(path: str) -> str:
  """sha256 of a JSON-lines file's records, timings removed."""
  digest = hashlib.sha256()
  with open(path) as f:
    for line in f:
      if line.strip():
        digest.update(json.dumps(_strip_timings(json.loads(line)), sort_keys=True).encode())
  return digest.hexdigest()


def _hash_checkpoint(step_dir: str) -> str:
  """sha256 over every array of an Orbax checkpoint: tree path, dtype, shape and bytes."""
  warnings.filterwarnings("ignore", message="Sharding info not provided")
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.restore(os.path.join(step_dir, "default"))
  digest = hashlib.sha256()
  for path, leaf in sorted(ocp.tree.to_flat_dict(tree).items(), key=lambda kv: str(kv[0])):
    array = np.asarray(leaf)
    digest.update(f"{path}|{array.dtype}|{array.shape}|".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


# Runs beyond each experiment's plain smoke variant: the fairness methods and the GAN
# regularisers, which the plain variants leave off.
EXTRA = (
    "fair_mnist:method=importance,smoke", "fair_mnist:method=resample,smoke",
    "fair_mnist:method=conditional,smoke", "fair_mnist:method=importance,model=vae,smoke",
    "dcgan_mnist:smoke+objective.gp_weight=1.0+objective.r1_gamma=0.5+objective.r1_every=2"
    "+objective.spectral_norm=gen,disc+objective.diffaugment=cutout+objective.n_disc=2"
    "+objective.ema_batch_stats=True",
)


def command_of(case: str, workdir: str) -> list[str]:
  """The launcher command of ``NAME[:ARG][+KEY=VALUE...]`` (ARG defaults to ``smoke``)."""
  head, *overrides = case.split("+")
  name, _, arg = head.partition(":")
  return ([sys.executable, "-m", "fairgen.main",
           f"--config=experiments/{name}.py:{arg or 'smoke'}", f"--workdir={workdir}"]
          + [f"--config.{o}" for o in overrides])


def digest(name: str, workdir: str) -> list[str]:
  """Runs the case ``name`` (``command_of``) into ``workdir``; its digest lines."""
  command = command_of(name, workdir)
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  if done.returncode != 0:
    last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    return [f"{name} skipped rc={done.returncode} {last}"]
  lines = [f"{name} metrics {_hash_json_lines(os.path.join(workdir, 'metrics.jsonl'))}"]
  steps = sorted(glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")),
                 key=lambda p: int(os.path.basename(p)))
  for step_dir in steps:
    lines.append(f"{name} checkpoint/{os.path.basename(step_dir)} {_hash_checkpoint(step_dir)}")
  for path in sorted(glob.glob(os.path.join(workdir, "eval", "*.json"))):
    with open(path) as f:
      record = _strip_timings(json.load(f))
    text = json.dumps(record, sort_keys=True).encode()
    lines.append(f"{name} eval/{os.path.basename(path)} {hashlib.sha256(text).hexdigest()}")
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("cases", nargs="*",
                      help="NAME[:ARG][+KEY=VALUE...] with NAME under experiments/ (default: "
                           "every experiment's smoke variant, then EXTRA)")
  args = parser.parse_args()
  names = args.cases or sorted(
      os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
  ) + list(EXTRA)
  with tempfile.TemporaryDirectory() as tmp:
    for i, name in enumerate(names):
      for line in digest(name, os.path.join(tmp, str(i))):
        print(line, flush=True)


if __name__ == "__main__":
  main()
