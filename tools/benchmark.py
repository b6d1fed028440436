"""Benchmarks one experiment's train step: compile time, speed, FLOP/s, input wait, overhead.

Usage (from the repository root):
  python tools/benchmark.py --config=experiments/dcgan_mnist.py:full
  python tools/benchmark.py --config=experiments/vae_mnist.py --repeats 7 --steps 50
  python tools/benchmark.py --config=experiments/vae_mnist.py:smoke --devices 2
  python tools/benchmark.py --config=experiments/vae_mnist.py --scaling 1,2,4,8
  python tools/benchmark.py --config=experiments/dcgan_mnist.py --set model.width=0.5 \
      --set train.batch_size=64 --set model.dtype=bfloat16

Options: --config (unless --compare), --repeats R (default 5), --steps S per repeat (default 10),
--batch_size B (train.batch_size), --set KEY=VALUE (any config key, repeatable),
--devices N (N fake CPU devices, mesh.data=N), --scaling 1,2,4,8 (see below),
--set model.dtype=bfloat16 (mixed precision: the models compute in bf16 with float32
parameters; XLA:CPU 0.10 converts bf16 convolutions and matmuls to f32, so this is slower
on CPU), --set mesh.fsdp=True (parameters and optimizer state sharded), --xla_flags
"..." (appended to XLA_FLAGS, e.g. --xla_cpu_experimental_ynn_fusion_type=individual_dot,
which sends convolutions to Eigen instead of YNNPACK: ~20% faster DCGAN steps here; or, for
the step alone and recorded with the run, --set train.xla_options=--xla_NAME=VALUE).

The step is the one ``fairgen.train`` trains with: ``experiment.setup`` -> ``init_state`` ->
``make_train_step`` on the config's own dataset. The bare step is timed first, then the
training loop itself (``fairgen.train.loop``) for as many windows of as many steps. On a
shared machine, compare variants from interleaved runs and look at min/max, not the median
alone.

Output: one JSON object on stdout (progress goes to stderr). Its fields:
  config, overrides: the config file[:variant] and the ``--set`` overrides applied.
  devices: devices on the mesh's data axis (``--devices N`` fakes N CPU devices).
  global_batch: examples per step (train.batch_size x the objective's examples_per_step).
  steps, repeats: each repeat times ``steps`` consecutive steps; statistics are over repeats.
  model_dtype: the models' computation dtype, ``model.dtype`` (parameters stay float32).
  backend, jax_version, xla_flags, cpu_count, loadavg_start, loadavg_end: the conditions
    (a 1-minute load average above ``cpu_count`` means other processes competed for the CPU).
  others_cpu_share: {median, min, max} over the bare repeats of the share of all cores that
    other processes used meanwhile (from /proc/stat less this process's CPU time): 0 on a
    quiet machine; compare runs only at similar values.
  compile: seconds to build the train step.
    lower_s: ``jax.jit(step).lower(...)`` (tracing and lowering to StableHLO);
    compile_s: ``.compile()`` of that (XLA optimisation and code generation);
    first_call_s: the first call of a fresh ``make_train_step`` jit (trace + compile + run);
    first_call_minus_step_s: ``first_call_s`` less the median steady-state step time.
  cost: XLA's cost analysis of the compiled step (``compiled.cost_analysis()``).
    gflop_per_step: 'flops' / 1e9 (multiply-adds count as 2; all the step's HLO ops);
    gbytes_accessed_per_step: 'bytes accessed' / 1e9.
  memory: per-device memory of the compiled step, in MiB (2^20 bytes).
    state_per_device: the train state (parameters, optimizer state, EMA, counters) that one
      device holds under the state's shardings (``mesh.fsdp=True`` shards it, ~1/N);
    state_total: the whole state, once;
    xla_argument, xla_output, xla_temp, xla_alias: XLA's memory analysis of the compiled
      per-device program (``compiled.memory_analysis()``): its arguments (the state, the
      batch shard, the key and the objective's constants), outputs, scratch buffers, and
      the outputs that reuse donated arguments. Null where the backend gives none.
  step: the bare compiled step on one fixed device-resident batch (no input, no metrics
    fetch), per repeat ``steps`` calls then ``block_until_ready``; with
    ``train.steps_per_dispatch=k``, the loop's k-step program on the first k batches,
    stacked as the loader sends them, ``steps // k`` calls (timed as ``steps`` steps).
    steps_per_s, examples_per_s, achieved_gflop_per_s: {median, min, max} over repeats;
    steps_per_s_quiet: the same over the quiet repeats only (others used < 5% of the CPU),
      with their count; null if there were none;
    ms_per_step: median milliseconds per step.
  peak: this machine's fp32 matmul peak right now (best of several 2048x2048 products).
    jax_matmul_gflop_per_s: jitted ``a @ b`` in JAX; numpy_matmul_gflop_per_s: NumPy's;
    achieved_over_peak: median achieved GFLOP/s of the step / the larger of the two;
    achieved_over_jax_peak: the same over the JAX peak.
  loop: ``fairgen.train.loop``, the training loop itself (``fairgen.data.Loader`` with its
    prefetch thread, the jitted guarded step, metric accumulation, a metrics.jsonl line per
    window), run in a scratch workdir for one warm-up window and ``repeats`` timed windows
    of ``steps`` steps, each timed by the loop's own ``steps_per_sec``. Checkpoints, sample
    grids and evaluation happen only after the last window.
    steps_per_s: {median, min, max}; seconds_per_repeat / bare_seconds_per_repeat: the
    medians of the loop's and of the bare step's window times; overhead_pct: 100 x (loop /
    bare - 1), from the medians; input_wait_share: {median, min, max} of the fraction of a
    window the loop spent blocked on the Loader (its ``input_wait_seconds``).
  first_step_metrics: the metrics of step 0 from the initial state (these must not depend
    on the device count).

``--scaling 1,2,4,8`` runs this script in one subprocess per device count (fake CPU
devices, same global batch, same other flags), prints a table to stderr and one JSON object
{"scaling": [per-run summaries], "first_step_metrics_agree": bool, "max_rel_diff": float,
"runs": [full per-run results]} to stdout. On one CPU the devices share the same cores, so
the table checks correctness and overhead, not speed-up.

``--compare dcgan,vae`` (no --config) times fairgen's loop against PyTorch and TensorFlow
versions of the same models (``bench_torch.py``, ``bench_tf.py``), each side in a fresh
process, interleaved over ``--rounds`` rounds on a quiet machine, and prints the ratios
(``compare_peers.py`` says how). TensorFlow lives in its own environment:
  python tools/benchmark.py --compare dcgan,vae --rounds 3 --tf_python /tmp/tfvenv/bin/python
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import compare_peers  # tools/, beside this script
from cpu_load import cpu_snapshot, others_share, quiet_stats, sig, stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# First-step metrics of different device counts agree to this relative tolerance.
SCALING_RTOL = 1e-4
SCALING_ATOL = 1e-6


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parses the command line (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="", help="experiments/FILE.py[:variant]")
  p.add_argument("--devices", type=int, default=0,
                 help="N > 0: N fake CPU devices and mesh.data=N (default: the config's mesh)")
  p.add_argument("--repeats", type=int, default=5, help="timed repeats (>= 5 for reports)")
  p.add_argument("--steps", type=int, default=0,
                 help="steps per timed repeat (default 10; --compare: 10 DCGAN, 200 VAE)")
  p.add_argument("--batch_size", type=int, default=0, help="override train.batch_size")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. --set model.width=0.5 (repeatable)")
  p.add_argument("--xla_flags", default="", help="extra XLA_FLAGS for this run")
  p.add_argument("--scaling", default="", help="comma-separated device counts, e.g. 1,2,4,8")
  compare_peers.add_args(p)
  args = p.parse_args(argv)
  args.steps_given, args.steps = args.steps, args.steps or 10
  if args.repeats < 1 or args.steps < 1:
    p.error("--repeats and --steps must be >= 1")
  if bool(args.config) == bool(args.compare):
    p.error("give --config (one experiment) or --compare (fairgen against the peers)")
  return args


def _parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # A bare string, e.g. --set data.name=digits.


def load_config(spec: str, overrides: Sequence[str], batch_size: int = 0,
                devices: int = 0) -> Any:
  """Loads an experiment config and applies the command line's changes.

  Args:
    spec: ``experiments/FILE.py[:variant]``.
    overrides: ``KEY=VALUE`` items; values are Python literals, else strings.
    batch_size: if > 0, ``train.batch_size``.
    devices: if > 0, ``mesh.data``.

  Returns:
    The ``ml_collections.ConfigDict``.
  """
  from fairgen import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_spec(spec)
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise config_lib.ConfigError(f"--set wants KEY=VALUE, got {item!r}.")
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = _parse_value(value)
  if batch_size:
    config.train.batch_size = batch_size
  if devices:
    config.mesh.data = devices
  return config


def _loadavg() -> float:
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return -1.0


def matmul_peaks(n: int = 2048, repeats: int = 5) -> dict[str, float]:
  """Best-of-``repeats`` fp32 GFLOP/s of an n x n matmul in JAX (jitted) and NumPy."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), dtype=np.float32)
  b = rng.standard_normal((n, n), dtype=np.float32)
  flop = 2.0 * n**3
  mm = jax.jit(lambda x, y: x @ y)
  ja, jb = jax.device_put(a, jax.devices()[0]), jax.device_put(b, jax.devices()[0])
  out = {}
  for name, fn in (("jax", lambda: mm(ja, jb).block_until_ready()), ("numpy", lambda: a @ b)):
    fn()
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      best = min(best, time.perf_counter() - start)
    out[f"{name}_matmul_gflop_per_s"] = round(flop / best / 1e9, 1)
  return out


def memory_report(exp: Any, compiled: Any) -> dict[str, float | None]:
  """The ``memory`` section (see the module doc): the state's and XLA's bytes, in MiB."""
  from fairgen import parallel  # pylint: disable=g-import-not-at-top
  mib = lambda b: None if b is None else sig(b / 2**20)
  replicated = parallel.state_shardings(exp.mesh, exp.abstract_state, fsdp=False)
  out = {"state_per_device": mib(parallel.bytes_per_device(exp.abstract_state,
                                                           exp.state_shardings)),
         "state_total": mib(parallel.bytes_per_device(exp.abstract_state, replicated))}
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    stats = None
  for name in ("argument", "output", "temp", "alias"):
    out[f"xla_{name}"] = mib(getattr(stats, f"{name}_size_in_bytes", None))
  return out


def _time_bare(run: Callable[[Any], Any], state: Any, steps: int) -> tuple[Any, float]:
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  metrics = None
  for _ in range(steps):
    state, metrics = run(state)
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - start


def _time_real_loop(exp: Any, source: Any, reps: int, steps: int) -> tuple[list[float], list[float]]:
  """Times ``fairgen.train.loop`` itself: ``reps`` windows of ``steps`` steps after one warm-up.

  The loop runs in a scratch workdir with a log line every ``steps`` steps and no
  checkpoint, sample grid or evaluation before its last step; each ``metrics.jsonl`` line
  is one window, timed by the loop (``steps_per_sec``, ``input_wait_seconds``). The first
  window (compilation included) is the warm-up.

  Returns:
    Seconds per window and the share of each window spent waiting on input.
  """
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from fairgen import checkpoint  # pylint: disable=g-import-not-at-top
  from fairgen import experiment  # pylint: disable=g-import-not-at-top
  from fairgen import train  # pylint: disable=g-import-not-at-top
  config = exp.config.copy_and_resolve_references()
  total = (reps + 1) * steps
  config.train.num_steps = total
  config.train.checkpoint_every_steps = total
  config.log.every_steps = steps
  config.log.sample_every_steps = total
  config.eval.every_steps = 0
  exp = dataclasses.replace(exp, config=config)
  workdir = tempfile.mkdtemp(prefix="fairgen_benchmark_")
  ckpt = checkpoint.Checkpointer(workdir, 1, total)
  try:
    train.loop(exp, source, experiment.init_state(exp), 0, ckpt, workdir)
    ckpt.close()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      windows = [json.loads(line) for line in f][1:reps + 1]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  seconds = [steps / w["steps_per_sec"] for w in windows]
  return seconds, [w["input_wait_seconds"] / t for w, t in zip(windows, seconds)]


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
  """Runs every measurement of the module docstring for one configuration."""
  from fairgen import data  # pylint: disable=g-import-not-at-top
  from fairgen import experiment  # pylint: disable=g-import-not-at-top

  load_start = _loadavg()
  config = load_config(args.config, args.set, args.batch_size, args.devices)
  source = data.load(config.data, config.data.split)
  exp = experiment.setup(config, source.spec, num_examples=len(source))
  step = _measure_step(args, config, exp, source)
  loop_t, waits = _time_real_loop(exp, source, args.repeats, args.steps)
  print(f"[benchmark] the training loop: {[round(args.steps / t, 3) for t in loop_t]} steps/s",
        file=sys.stderr, flush=True)
  peaks = matmul_peaks()
  return {**_conditions(args, config, exp, load_start, step["others"]),
          **_step_sections(exp, step, peaks, args.steps),
          "loop": _loop_section(loop_t, waits, step["bare_t"], args.steps),
          "first_step_metrics": step["first_metrics"]}


def _measure_step(args: argparse.Namespace, config: Any, exp: Any, source: Any
                  ) -> dict[str, Any]:
  """Compiles the train step, runs step 0 and times the bare step on a fixed batch.

  Returns:
    The raw measurements: ``lower_s``, ``compile_s``, ``flops``, ``bytes_accessed``,
    ``memory`` (from ``_compile_step``), ``first_call_s``, ``first_metrics`` (step 0's
    metrics, float64), and ``bare_t``, ``others`` (per repeat: seconds for ``steps`` steps
    and the CPU share other processes used).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fairgen import data  # pylint: disable=g-import-not-at-top
  from fairgen import experiment  # pylint: disable=g-import-not-at-top
  from fairgen import parallel  # pylint: disable=g-import-not-at-top
  from fairgen import train  # pylint: disable=g-import-not-at-top

  state = experiment.init_state(exp)
  data_sharding = parallel.data_sharding(exp.mesh)
  rng = parallel.replicate(exp.step_rng, exp.mesh)
  # One Loader serves the warm-up and every timed loop repeat, as in a long training run.
  loader = data.Loader(source, exp.global_batch, config.seed, data_sharding, 0, 1,
                       prefetch=config.data.prefetch, sampler=train.batch_sampler(exp, source))
  try:
    it = iter(loader)
    _, batch = next(it)  # Step 0's batch: the first-step metrics come from it.
    print(f"[benchmark] {args.config} devices={exp.mesh.size} batch={exp.global_batch}: "
          "compiling", file=sys.stderr, flush=True)
    lowering_step, compiled, out = _compile_step(exp, state, batch, rng)

    # A fresh jit of the same step: its first call traces, compiles and runs step 0.
    train_step = train.make_train_step(exp)
    start = time.perf_counter()
    state, metrics = train_step(state, batch, rng)
    first_metrics = {k: float(v) for k, v in parallel.to_host(metrics).items()}
    out["first_call_s"] = time.perf_counter() - start
    out["first_metrics"] = {k: float(np.float64(v)) for k, v in first_metrics.items()}

    fixed = jax.device_put(loader.host_batch(0), data_sharding)
    per_dispatch = config.train.get("steps_per_dispatch", 1)
    if per_dispatch > 1:  # The loop's program: that many steps per call.
      group = loader.device_batch(0, per_dispatch)  # Stacked, as the loop's loader sends it.
      bare = lambda s: lowering_step.steps(s, group, rng)
    else:
      bare = lambda s: compiled(s, fixed, rng, lowering_step.constants)
    out["bare_t"], out["others"] = _time_bare_repeats(bare, state, per_dispatch,
                                                      args.repeats, args.steps)
  finally:
    loader.close()
  return out


def _compile_step(exp: Any, state: Any, batch: Any, rng: Any
                  ) -> tuple[Any, Any, dict[str, Any]]:
  """Lowers and compiles the train step, timing each, and reads XLA's cost and memory.

  Returns:
    The lowering jit (``train.make_train_step``), its compiled executable, and a dict of
    ``lower_s``, ``compile_s``, ``flops``, ``bytes_accessed`` and ``memory``.
  """
  from fairgen import train  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  lowering_step = train.make_train_step(exp)
  lowered = lowering_step.lower(state, batch, rng)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return lowering_step, compiled, {
      "lower_s": lower_s, "compile_s": compile_s, "flops": float(cost.get("flops", 0.0)),
      "bytes_accessed": float(cost.get("bytes accessed", 0)),
      "memory": memory_report(exp, compiled)}


def _time_bare_repeats(bare: Callable[[Any], Any], state: Any, per_dispatch: int, reps: int,
                       steps: int) -> tuple[list[float], list[float]]:
  """Times ``reps`` repeats of ``steps`` bare steps after one warm-up call.

  Args:
    bare: one call of the compiled program (``per_dispatch`` steps); donates its state.
    state: the train state to start from.
    per_dispatch: steps per call of ``bare``.
    reps, steps: repeats, and steps per repeat.

  Returns:
    Seconds per ``steps`` steps, and the share of the CPU other processes used, per repeat.
  """
  state, _ = _time_bare(bare, state, 1)  # Warm-up of the compiled executable.
  calls = max(1, steps // per_dispatch)
  bare_t, others = [], []
  for r in range(reps):
    snap = cpu_snapshot()
    state, t = _time_bare(bare, state, calls)
    t *= steps / (calls * per_dispatch)  # Per `steps` steps.
    others.append(others_share(snap, cpu_snapshot()))
    bare_t.append(t)
    print(f"[benchmark] repeat {r + 1}/{reps}: bare {steps / t:.3f} steps/s",
          file=sys.stderr, flush=True)
  return bare_t, others


def _conditions(args: argparse.Namespace, config: Any, exp: Any, load_start: float,
                others: list[float]) -> dict[str, Any]:
  """The run's settings and the machine's conditions: the report's fields from ``config``
  to ``others_cpu_share`` (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  return {
      "config": args.config,
      "overrides": list(args.set) + ([f"train.batch_size={args.batch_size}"]
                                     if args.batch_size else []),
      "devices": int(exp.mesh.size),
      "global_batch": int(exp.global_batch),
      "steps": args.steps,
      "repeats": args.repeats,
      "model_dtype": config.model.get("dtype", "float32"),
      "backend": jax.default_backend(),
      "jax_version": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "cpu_count": os.cpu_count(),
      "loadavg_start": load_start,
      "loadavg_end": _loadavg(),
      "others_cpu_share": stats(others),
  }


def _step_sections(exp: Any, step: dict[str, Any], peaks: dict[str, float], steps: int
                   ) -> dict[str, Any]:
  """The ``compile``, ``cost``, ``memory``, ``step`` and ``peak`` sections, from
  ``_measure_step``'s measurements and ``matmul_peaks``."""
  step_s = [t / steps for t in step["bare_t"]]
  achieved = [step["flops"] / s / 1e9 for s in step_s]
  peak = max(peaks.values())
  return {
      "compile": {
          "lower_s": sig(step["lower_s"]),
          "compile_s": sig(step["compile_s"]),
          "first_call_s": sig(step["first_call_s"]),
          "first_call_minus_step_s": sig(step["first_call_s"] - statistics.median(step_s)),
      },
      "cost": {"gflop_per_step": sig(step["flops"] / 1e9),
               "gbytes_accessed_per_step": sig(step["bytes_accessed"] / 1e9)},
      "memory": step["memory"],
      "step": {
          "steps_per_s": stats([1 / s for s in step_s]),
          "steps_per_s_quiet": quiet_stats([1 / s for s in step_s], step["others"]),
          "examples_per_s": stats([exp.global_batch / s for s in step_s]),
          "achieved_gflop_per_s": stats(achieved),
          "ms_per_step": sig(1e3 * statistics.median(step_s)),
      },
      "peak": {**peaks,
               "achieved_over_peak": sig(statistics.median(achieved) / peak),
               "achieved_over_jax_peak": sig(
                   statistics.median(achieved) / peaks["jax_matmul_gflop_per_s"])},
  }


def _loop_section(loop_t: list[float], waits: list[float], bare_t: list[float], steps: int
                  ) -> dict[str, Any]:
  """The ``loop`` section: the training loop's windows against the bare step's."""
  med_bare, med_loop = statistics.median(bare_t), statistics.median(loop_t)
  return {
      "steps_per_s": stats([steps / t for t in loop_t]),
      "seconds_per_repeat": sig(med_loop),
      "bare_seconds_per_repeat": sig(med_bare),
      "overhead_pct": sig(100 * (med_loop / med_bare - 1)),
      "input_wait_share": stats(waits),
  }


def _child_argv(args: argparse.Namespace, devices: int, batch_size: int) -> list[str]:
  argv = [sys.executable, os.path.abspath(__file__), f"--config={args.config}",
          f"--devices={devices}", f"--repeats={args.repeats}", f"--steps={args.steps}",
          f"--batch_size={batch_size}"]
  if args.xla_flags:
    argv.append(f"--xla_flags={args.xla_flags}")
  for item in args.set:
    argv += ["--set", item]
  return argv


def compare_metrics(runs: Sequence[dict[str, Any]]) -> tuple[bool, float]:
  """Whether every run's first-step metrics match the first run's; the largest rel. diff."""
  ref = runs[0]["first_step_metrics"]
  agree, worst = True, 0.0
  for run in runs[1:]:
    other = run["first_step_metrics"]
    if set(other) != set(ref):
      return False, float("inf")
    for key, a in ref.items():
      b = other[key]
      diff = abs(a - b)
      worst = max(worst, diff / max(abs(a), 1e-12))
      agree &= diff <= SCALING_ATOL + SCALING_RTOL * abs(a)
  return bool(agree), worst


def run_scaling(args: argparse.Namespace) -> dict[str, Any]:
  """Runs one subprocess per device count with a fixed global batch (see docstring)."""
  counts = [int(c) for c in args.scaling.split(",") if c.strip()]
  batch = args.batch_size or load_config(args.config, args.set).train.batch_size
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  runs = []
  for n in counts:
    proc = subprocess.run(_child_argv(args, n, batch), cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
      sys.stderr.write(proc.stderr)
      raise SystemExit(f"benchmark with --devices={n} failed (exit {proc.returncode}).")
    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  agree, worst = compare_metrics(runs)
  keys = sorted(runs[0]["first_step_metrics"])
  loss_keys = [k for k in keys if "loss" in k and "/" not in k] or keys
  rows = [{"devices": r["devices"], "compile_s": r["compile"]["compile_s"],
           "steps_per_s": r["step"]["steps_per_s"]["median"],
           "examples_per_s": r["step"]["examples_per_s"]["median"],
           "loop_overhead_pct": r["loop"]["overhead_pct"],
           "state_mib_per_device": r["memory"]["state_per_device"],
           "xla_argument_mib": r["memory"]["xla_argument"],
           "first_step_losses": {k: r["first_step_metrics"][k] for k in loss_keys}}
          for r in runs]
  header = (f"{'devices':>7} {'compile s':>9} {'steps/s':>9} {'examples/s':>11} "
            f"{'overhead %':>10} {'state MiB':>9} {'XLA args MiB':>12}  " +
            "  ".join(f"{k:>14}" for k in loss_keys))
  lines = [header, "-" * len(header)]
  for row in rows:
    lines.append(f"{row['devices']:>7} {row['compile_s']:>9.2f} {row['steps_per_s']:>9.3f} "
                 f"{row['examples_per_s']:>11.1f} {row['loop_overhead_pct']:>10.1f} "
                 f"{row['state_mib_per_device']:>9.3f} {row['xla_argument_mib'] or 0:>12.3f}  " +
                 "  ".join(f"{row['first_step_losses'][k]:>14.7g}" for k in loss_keys))
  lines.append(f"global batch {batch}; first-step metrics agree: {agree} "
               f"(max relative difference {worst:.2e}, rtol {SCALING_RTOL})")
  print("\n".join(lines), file=sys.stderr, flush=True)
  return {"config": args.config, "global_batch": batch, "scaling": rows,
          "first_step_metrics_agree": agree, "max_rel_diff": worst, "runs": runs}


def main(argv: Sequence[str] | None = None) -> None:
  """Entry point: one benchmark, or a scaling sweep in subprocesses."""
  args = parse_args(argv)
  if args.compare:
    print(json.dumps(compare_peers.run_compare(args)), flush=True)
    return
  if args.scaling:
    print(json.dumps(run_scaling(args)), flush=True)
    return
  # XLA reads its flags when JAX initialises its backend: set them before importing jax.
  flags = os.environ.get("XLA_FLAGS", "").split()
  if args.devices:
    flags = [f for f in flags if "xla_force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={args.devices}")
  flags += args.xla_flags.split()
  if flags:
    os.environ["XLA_FLAGS"] = " ".join(flags)
  print(json.dumps(run_benchmark(args)), flush=True)


if __name__ == "__main__":
  main()
