"""``benchmark.py --compare``: fairgen's real loop against PyTorch and TensorFlow, interleaved.

For each model (``dcgan``: the seeds' DCGAN at width 1.0, batch 128, with the seeds' D
dropout 0.3, as the peers build it; ``vae``: the MLP VAE 784-512-256-32, batch 128), every
round runs each side once, in a fresh process, one after the other:
  fairgen          ``benchmark.py`` on the model's config as it is: its loop's steps/s (one
                   step is one D and one G update for the GAN), and the bare step's;
  fairgen_xla_defaults   the same with ``train.xla_options`` empty: XLA's default
                   convolutions (YNNPACK) instead of the config's Eigen option (DCGAN only);
  torch_eager, torch_compile   ``bench_torch.py`` in that mode;
  tf_graph, tf_xla, tf_eager   ``bench_tf.py`` in that mode.
``edm_unet``, ``dit_s``: EDM's training step at batch 64 on 32x32x3 (edm_mnist.py's U-Net
  and DiT-S/2), fairgen's loop on a folder of random images written for the run against
  ``bench_torch.py`` (``tools/torch_diffusion.py``'s same networks), eager and compiled.
``inception`` (FID feature extraction; images/s): ``bench_inception.py`` on each side,
  fairgen's ``inception_v3`` backbone (``fairgen``: Eigen convolutions, as it loads on a CPU;
  ``fairgen_xla_defaults``: YNNPACK) against ``pytorch_fid`` (in ``--torch_python``).
Before each side starts, the machine must be quiet (other processes under 5% of all cores
over one second, waiting up to ``--quiet_timeout`` seconds); each side reports the foreign
CPU load it ran under. Ratios are fairgen's iterations/s over a peer's within each round,
then their median over rounds: load that drifts between rounds hits both sides alike.

A peer that cannot start (its framework is not installed in ``--torch_python`` or
``--tf_python``) is reported as unavailable with its error, and the rest still runs.

Output: a Markdown table on stderr (paste it into docs/benchmarks.md with its date, machine and command), and
one JSON object on stdout: {"date", "machine": {"cpu", "cores", "flags"}, "rounds", "models":
{model: {"config", "sides": {side: {"median", and per round: "it_per_s", "others_cpu_share",
"others_before_start" (the load the wait for quiet ended at), and for fairgen's sides
"bare_steps_per_s", "loop_overhead_pct", "achieved_over_peak"}}, "ratios":
{"<fairgen side>/<other side>": {"per_round", "median", "min", "max"}}, "unavailable":
{side: reason}}}}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Sequence

import numpy as np
from cpu_load import sig, wait_quiet  # tools/, beside this script

from fairgen import cli

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
# 32x32x3 images for the diffusion models' fairgen side ({folder}: written by run_compare).
_FOLDER = ["data.name=image_folder",
           "data.options={'directory': '{folder}', 'image_size': 32, 'channels': 3}"]
# fairgen's side of each model: the config and the overrides that match the peers' model.
# ``inception``: no config: bench_inception.py times the backbone on random weights.
MODELS = {
    "dcgan": ("experiments/dcgan_mnist.py:full", ["model.dropout=0.3"]),
    "vae": ("experiments/vae_mnist.py", []),
    "inception": ("tools/bench_inception.py", []),
    # EDM's training step (edm_mnist.py's objective) at batch 64 on 32x32x3 images (a folder
    # of random ones, written for the run): edm_mnist.py's U-Net (attention at 8x8, where
    # 28x28 digits have it at 7x7), and DiT-S/2.
    "edm_unet": ("experiments/edm_mnist.py", ["train.batch_size=64", "model.attn_resolutions=(8,)",
                                              *_FOLDER]),
    "dit_s": ("experiments/dit_mnist.py", ["model.size='S'", "model.patch=2",
                                           "train.batch_size=64", *_FOLDER]),
}
SIDES = ("fairgen", "fairgen_xla_defaults", "torch_eager", "torch_compile", "tf_graph", "tf_xla",
         "tf_eager", "pytorch_fid")
# The sides each model has (the others are skipped for it).
MODEL_SIDES = {"dcgan": SIDES[:-1], "vae": SIDES[:1] + SIDES[2:-1],
               "edm_unet": ("fairgen", "torch_eager", "torch_compile"),
               "dit_s": ("fairgen", "torch_eager", "torch_compile"),
               "inception": ("fairgen", "fairgen_xla_defaults", "pytorch_fid")}
DEFAULT_SIDES = "fairgen,fairgen_xla_defaults,torch_eager,tf_graph,tf_xla,pytorch_fid"
# Iterations per round and side when --steps is 0 (a few seconds of work each; Inception:
# batches of 50 images).
DEFAULT_STEPS = {"dcgan": 10, "vae": 200, "inception": 4, "edm_unet": 6, "dit_s": 2}
# The peers' batch where it is not bench_torch.py's default 128.
PEER_BATCH = {"edm_unet": 64, "dit_s": 64}


def add_args(p: argparse.ArgumentParser) -> None:
  """The ``--compare`` mode's options, on ``benchmark.py``'s parser."""
  p.add_argument("--compare", default="",
                 help="models to compare with the peers: dcgan, vae, inception (comma-separated)")
  p.add_argument("--sides", default=DEFAULT_SIDES, help=f"--compare: any of {', '.join(SIDES)}")
  p.add_argument("--rounds", type=int, default=3, help="--compare: interleaved rounds")
  p.add_argument("--torch_python", default=sys.executable,
                 help="--compare: the Python with torch installed")
  p.add_argument("--tf_python", default=sys.executable,
                 help="--compare: the Python with tensorflow installed (see bench_tf.py)")
  p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                 help="--compare: another fairgen side, fairgen_NAME, with these config "
                      "changes (repeatable), e.g. flat:optim.gen.flatten=True,"
                      "optim.disc.flatten=True")
  p.add_argument("--quiet_timeout", type=float, default=60.0,
                 help="--compare: seconds to wait for a quiet machine before each side")


def _side_argv(side: str, model: str, steps: int, repeats: int,
               args: argparse.Namespace) -> list[str]:
  """The command line that runs one side once."""
  if model == "inception":
    python = args.torch_python if side == "pytorch_fid" else sys.executable
    name = "fairgen_ynnpack" if side == "fairgen_xla_defaults" else side
    return [python, os.path.join(TOOLS, "bench_inception.py"), f"--side={name}",
            f"--batches={steps}", "--repeats=1"]
  if side.startswith("fairgen"):
    config, overrides = MODELS[model]
    argv = [sys.executable, os.path.join(TOOLS, "benchmark.py"), f"--config={config}",
            f"--repeats={repeats}", f"--steps={steps}"]
    changes = variants(args).get(side, ["train.xla_options="]
                                 if side == "fairgen_xla_defaults" else [])
    for item in overrides + list(args.set) + changes:
      argv += ["--set", item.replace("{folder}", getattr(args, "folder", ""))]
    return argv
  framework, mode = side.split("_")
  python, script = ((args.torch_python, "bench_torch.py") if framework == "torch"
                    else (args.tf_python, "bench_tf.py"))
  batch = [f"--batch={PEER_BATCH[model]}"] if model in PEER_BATCH else []
  return [python, os.path.join(TOOLS, script), f"--model={model}", "--rounds=1",
          f"--iters={steps}", f"--modes={mode}", *batch]


def variants(args: argparse.Namespace) -> dict[str, list[str]]:
  """``--variant NAME:KEY=VALUE,...`` as {"fairgen_NAME": ["KEY=VALUE", ...]}."""
  out = {}
  for text in args.variant:
    name, sep, changes = text.partition(":")
    items = [c.strip() for c in changes.split(",") if c.strip()]
    if not sep or not name.isidentifier() or not items or any("=" not in c for c in items):
      cli.fail(f"--variant wants NAME:KEY=VALUE[,KEY=VALUE], got {text!r}.")
    out[f"fairgen_{name}"] = items
  return out


def _parse(side: str, out: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
  """(iterations/s, others' CPU share, extras) from one side's JSON."""
  if "median" in out.get("it_per_s", {}):  # bench_inception.py: images/s.
    return out["it_per_s"]["median"], out["others_cpu_share"], {}
  if side.startswith("fairgen"):
    extras = {"bare_steps_per_s": out["step"]["steps_per_s"]["median"],
              "loop_overhead_pct": out["loop"]["overhead_pct"],
              "achieved_over_peak": out["peak"]["achieved_over_peak"]}
    return (out["loop"]["steps_per_s"]["median"], out["others_cpu_share"]["median"], extras)
  mode = side.split("_")[1]
  return out["it_per_s"][mode]["median"], out["others_cpu_share"][mode], {}


def run_side(side: str, model: str, steps: int, repeats: int, args: argparse.Namespace
             ) -> tuple[dict[str, Any] | None, str]:
  """Runs one side in a fresh process: ({it_per_s, others_cpu_share, ...}, '') or (None, why)."""
  waited = wait_quiet(timeout_s=args.quiet_timeout)
  env = dict(os.environ)  # The caller's XLA_FLAGS stay, but every side sees one CPU device.
  flags = [f for f in env.pop("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  try:
    proc = subprocess.run(_side_argv(side, model, steps, repeats, args), cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
  except OSError as e:  # e.g. --tf_python does not exist.
    return None, str(e)
  if proc.returncode:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return None, f"exit {proc.returncode}: {lines[-1] if lines else ''}"
  it_s, share, extras = _parse(side, json.loads(proc.stdout.strip().splitlines()[-1]))
  return {"it_per_s": it_s, "others_cpu_share": share, "others_before_start": sig(waited, 3),
          **extras}, ""


def summarize(model: str, rounds: Sequence[dict[str, dict[str, Any]]],
              unavailable: dict[str, str]) -> dict[str, Any]:
  """Per-side series and fairgen/peer ratios from per-round results {side: result}."""
  sides = list(dict.fromkeys(s for r in rounds for s in r))
  out: dict[str, Any] = {"config": MODELS[model][0], "sides": {}, "ratios": {},
                         "unavailable": unavailable}
  for side in sides:
    results = [r[side] for r in rounds if side in r]
    series = [res["it_per_s"] for res in results]
    out["sides"][side] = {"median": sig(statistics.median(series)),
                          **{key: [res[key] for res in results] for key in results[0]}}
  for ours in (s for s in sides if s.startswith("fairgen")):
    for peer in (s for s in sides if s != ours):
      per_round = [sig(r[ours]["it_per_s"] / r[peer]["it_per_s"], 3)
                   for r in rounds if ours in r and peer in r]
      if per_round:
        out["ratios"][f"{ours}/{peer}"] = {
            "per_round": per_round, "median": sig(statistics.median(per_round), 3),
            "min": min(per_round), "max": max(per_round)}
  return out


def machine() -> dict[str, Any]:
  """The CPU model, core count and the vector/matrix flags that matter for speed."""
  cpu, flags = "unknown", []
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and cpu == "unknown":
          cpu = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = [fl for fl in value.split() if fl.startswith(("avx512f", "avx512_bf16",
                                                                "amx", "avx2", "fma"))]
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "flags": sorted(flags)}


def markdown(result: dict[str, Any]) -> str:
  """docs/benchmarks.md's comparison table: per model, a row per side with its it/s over the rounds
  and fairgen's per-round ratio to it."""
  lines = []
  for model, res in result["models"].items():
    lines += [f"| {model}: `{res['config']}` | it/s, median (min–max) | others' CPU share "
              "| fairgen / this side, median (min–max) |", "|---|---|---|---|"]
    for side, v in res["sides"].items():
      ratio = res["ratios"].get(f"fairgen/{side}")
      lines.append(
          f"| {side} | {v['median']:.3g} ({min(v['it_per_s']):.3g}–{max(v['it_per_s']):.3g}) "
          f"| ≤ {max(v['others_cpu_share']):.3f} | " +
          (f"{ratio['median']:.2f}× ({ratio['min']:.2f}–{ratio['max']:.2f})" if ratio else "–")
          + " |")
    for side, why in res["unavailable"].items():
      lines.append(f"| {side} | unavailable: {why} | | |")
    lines.append("")
  return "\n".join(lines)


def random_image_folder(root: str, num: int, size: int) -> str:
  """``num`` random ``size`` x ``size`` RGB PNGs in ``root/images/a/``; returns
  ``root/images`` (an ``image_folder`` dataset of one class)."""
  from PIL import Image
  rng = np.random.default_rng(0)
  folder = os.path.join(root, "images", "a")
  os.makedirs(folder, exist_ok=True)
  for i in range(num):
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.png"))
  return os.path.dirname(folder)


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
  """Runs the interleaved comparison (see the module docstring)."""
  models = [m.strip() for m in args.compare.split(",") if m.strip()]
  sides = [s.strip() for s in args.sides.split(",") if s.strip()]
  bad = [m for m in models if m not in MODELS] + [s for s in sides if s not in SIDES]
  if bad:
    cli.fail(f"--compare: unknown {bad}; models: {sorted(MODELS)}, sides: {', '.join(SIDES)}")
  if args.rounds < 1:
    cli.fail(f"--rounds must be >= 1, got {args.rounds}.")
  result: dict[str, Any] = {"date": datetime.date.today().isoformat(), "machine": machine(),
                            "rounds": args.rounds, "models": {}}
  if any(any("{folder}" in o for o in MODELS[m][1]) for m in models):
    args.folder = random_image_folder(tempfile.mkdtemp(prefix="fairgen_compare_"), 256, 32)
  for model in models:
    steps = args.steps_given or DEFAULT_STEPS[model]
    extra = [s for s in variants(args) if model != "inception"]
    active = [s for s in sides if s in MODEL_SIDES[model]] + extra
    rounds: list[dict[str, dict[str, Any]]] = []
    unavailable: dict[str, str] = {}
    for r in range(args.rounds):
      row = {}
      for side in active:
        if side in unavailable:
          continue
        res, why = run_side(side, model, steps, args.repeats, args)
        if res is None:
          unavailable[side] = why
          print(f"[compare] {model} {side}: unavailable ({why})", file=sys.stderr, flush=True)
          continue
        row[side] = res
        print(f"[compare] {model} round {r + 1}/{args.rounds} {side}: "
              f"{res['it_per_s']:.3f} it/s (others' CPU share {res['others_cpu_share']:.3f})",
              file=sys.stderr, flush=True)
      rounds.append(row)
    result["models"][model] = summarize(model, rounds, unavailable)
  print(markdown(result), file=sys.stderr, flush=True)
  return result
