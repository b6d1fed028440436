"""The one generic training loop, for every objective.

``train_and_evaluate`` builds the experiment (``fairgen.experiment``), restores or
initialises the state, applies the data-side fairness mitigation, and runs the loop: one
jitted, sharded, guarded step per iteration, then logs, sample grids, periodic evaluation
and checkpoints. GAN, VAE, tabular and fairness variants differ only in the ``Objective``
they build (pure functions, see ``objectives/base.py``).
"""

from __future__ import annotations

import functools
import os
import sys
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fairgen import checkpoint
from fairgen import config as config_lib
from fairgen import data
from fairgen import experiment
from fairgen import fairness
from fairgen import logs
from fairgen import objectives
from fairgen import parallel
from fairgen import peers
from fairgen import robust
from fairgen import sampling
from fairgen import storage
from fairgen.evaluation import runner
from fairgen.privacy import ledger


def validate(config: ml_collections.ConfigDict) -> None:
  """Every check a training run makes before anything compiles (all sections, ``eval`` too)."""
  experiment.validate(config)
  runner.validate(config.eval)
  check_xla_options(config.train.get("xla_options", ""))
  for message in early_decay_warnings(config):
    logging.warning(message)


def early_decay_warnings(config: ml_collections.ConfigDict) -> list[str]:
  """A warning for each optimizer whose linear decay reaches 0 before ``train.num_steps``
  (e.g. after ``--config.train.num_steps`` was raised alone): its last updates are void."""
  steps = config.train.num_steps
  return [f"{path}.linear_decay_steps={sec['linear_decay_steps']} < train.num_steps={steps}: "
          f"its learning rate is 0 from update {sec['linear_decay_steps']} on."
          for path, sec in objectives.optimizer_sections(config.objective, config.optim)
          if sec.get("linear_decay_steps") and sec["linear_decay_steps"] < steps]


def check_xla_options(text: str) -> None:
  """Compiles a one-op program with ``train.xla_options``, so that an option this XLA does
  not know (or an impossible value) is one config error before the run, not at step 0.

  Raises:
    config.ConfigError: naming XLA's complaint.
  """
  options = config_lib.xla_options(text)
  if not options:
    return
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
  except Exception as e:  # XlaRuntimeError: INVALID_ARGUMENT with the option's name.
    raise config_lib.ConfigError(
        f"train.xla_options={text!r}: XLA refused them: {(str(e).splitlines() or [''])[0]}"
    ) from None


@jax.jit
def _add_metrics(total: dict[str, jax.Array], metrics: dict[str, jax.Array]
                 ) -> dict[str, jax.Array]:
  """One dispatch for the whole sum, where an eager add per metric made a dozen dispatches
  per step: a measurable overhead on a small step (the VAE's, README "Benchmarks"). The
  same float32 adds, so the same sums."""
  return jax.tree.map(jnp.add, total, metrics)


class TrainStep:
  """The objective's guarded step, jitted once with explicit shardings and state donation.

  Called as ``step(state, batch, rng)``; ``step.steps(state, stacked, rng, total)`` runs
  one step per batch of ``stacked`` (consecutive steps' batches on a leading axis, moved to
  the devices in one transfer by ``data.Loader``) in one program
  (``train.steps_per_dispatch``): a ``lax.scan`` of the same guarded step (unrolled with
  ``train.unroll_dispatch``), whose metrics it adds to ``total`` one step at a time, in the
  order and with the float32 adds of the loop's own accumulation. The
  objective's ``constants`` (frozen arrays, e.g. the penalty classifier's parameters) are
  placed on the mesh once and passed to the jitted functions as arguments on every call, so
  they are inputs of the compiled step, not constants folded into it.
  ``train.xla_options`` are its XLA compile options.
  """

  def __init__(self, exp: experiment.Experiment):
    objective = exp.objective
    repl = parallel.replicated(exp.mesh)
    data = parallel.data_sharding(exp.mesh)
    options = config_lib.xla_options(exp.config.train.get("xla_options", "")) or None
    unroll = bool(exp.config.train.get("unroll_dispatch", False))

    def step(state, batch, rng, constants):
      fn = objective.train_step
      if constants is not None:
        fn = functools.partial(fn, constants=constants)
      return robust.guard_step(fn)(state, batch, rng)

    def steps(state, stacked, rng, constants, total):
      def body(carry, batch):
        state, total = carry
        state, metrics = step(state, batch, rng, constants)
        return (state, _add_metrics(total, metrics)), None

      (state, total), _ = jax.lax.scan(body, (state, total), stacked, unroll=unroll)
      return state, total

    self._jitted = jax.jit(
        step, in_shardings=(exp.state_shardings, data, repl, repl),
        out_shardings=(exp.state_shardings, repl), donate_argnums=0, compiler_options=options)
    self._jitted_steps = jax.jit(
        steps, in_shardings=(exp.state_shardings, parallel.stacked_sharding(data), repl, repl,
                             repl),
        out_shardings=(exp.state_shardings, repl), donate_argnums=0, compiler_options=options)
    self.mesh, self._data = exp.mesh, data
    self._zero_total: dict[str, jax.Array] | None = None  # Made at the first ``steps``.
    # The arrays passed as the jitted function's last argument (None without constants).
    self.constants = (None if objective.constants is None else
                      parallel.replicate(objective.constants, exp.mesh))

  def __call__(self, state: Any, batch: Any, rng: jax.Array) -> tuple[Any, dict[str, Any]]:
    return self._jitted(state, batch, rng, self.constants)

  def steps(self, state: Any, stacked: Any, rng: jax.Array,
            total: dict[str, jax.Array] | None = None) -> tuple[Any, dict[str, jax.Array]]:
    """One step per batch of ``stacked`` (the batches of consecutive steps stacked on a
    leading axis, as ``data.Loader`` transfers a dispatch's), in one program; returns the
    state and ``total`` (zeros if None) plus each step's metrics."""
    if total is None:
      if self._zero_total is None:  # Not donated, so one set of zeros serves every call.
        one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype,
                                                          sharding=self._data), stacked)
        shapes = jax.eval_shape(self._jitted, state, one, rng, self.constants)[1]
        self._zero_total = parallel.replicate(
            jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), self.mesh)
      total = self._zero_total
    return self._jitted_steps(state, stacked, rng, self.constants, total)

  def lower(self, state: Any, batch: Any, rng: jax.Array) -> Any:
    """The lowered step (for cost and memory analysis)."""
    return self._jitted.lower(state, batch, rng, self.constants)


def dispatch_size(step: int, k: int, every: tuple[int, ...], stops: tuple[int, ...]) -> int:
  """How many steps the dispatch that starts at ``step`` runs: ``k``, or fewer so that it
  ends at the next multiple of each cadence in ``every`` (0: none) and at each step of
  ``stops`` after ``step``, where the loop must be between two steps."""
  end = step + k
  for e in every:
    if e:
      end = min(end, (step // e + 1) * e)
  for s in stops:
    if s > step:
      end = min(end, s)
  return end - step


def make_train_step(exp: experiment.Experiment) -> TrainStep:
  """The experiment's jitted train step (see ``TrainStep``)."""
  return TrainStep(exp)


class _Accumulator:
  """Sums step metrics on device; averages over the finite steps when read."""

  def __init__(self):
    self.total: dict[str, jax.Array] | None = None

  def add(self, metrics: dict[str, jax.Array]) -> None:
    self.total = metrics if self.total is None else _add_metrics(self.total, metrics)

  def read(self) -> tuple[dict[str, float], list[str]]:
    """(averages over finite steps, names of quantities that were ever non-finite)."""
    host = {k: float(v) for k, v in parallel.to_host(self.total).items()}
    finite = host.pop("finite")
    bad = sorted(k[len(robust.NONFINITE_PREFIX):] for k, v in host.items()
                 if k.startswith(robust.NONFINITE_PREFIX) and v > 0)
    averages = {k: v / max(finite, 1.0) for k, v in host.items()
                if not k.startswith(robust.NONFINITE_PREFIX)}
    self.total = None
    return averages, bad


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_new_experiment: bool = False,
                       source: data.Source | None = None) -> dict[str, Any]:
  """Trains ``config`` in ``workdir``, resuming if it holds a checkpoint.

  Args:
    config: the experiment config.
    workdir: the run directory (see README: the workdir contract).
    allow_new_experiment: resume even if the workdir's config.json has different
      data/model/objective sections (the old config is kept as config.<time>.json).
    source: the training examples (default: ``config.data``'s training split), e.g. the
      split with a privacy audit's canaries (``fairgen.audit``).

  Returns:
    A summary: start and final step, the last logged scalars, the last evaluation, how
    often the step was traced, and whether the run stopped for a preemption signal.
  """
  validate(config)
  workdir = storage.normalize(workdir)
  if source is None:
    source = data.load(config.data, config.data.split)
  exp = experiment.build(config, source.spec, num_examples=len(source))
  experiment.check_data(exp, source)
  checkpoint.ensure_writable(workdir)
  with robust.WorkdirLock(workdir) as lock:
    checkpoint.check_and_write_config(workdir, config, force=allow_new_experiment,
                                      defaults=experiment.section_defaults)
    ledger.open_run(workdir, exp.privacy)
    ckpt = checkpoint.Checkpointer(workdir, config.train.max_to_keep,
                                   config.train.checkpoint_every_steps)
    try:
      state, start_step = experiment.restore_or_init(exp, ckpt)
      if start_step >= config.train.num_steps:
        logging.info("The workdir is already at step %d >= train.num_steps=%d.", start_step,
                     config.train.num_steps)
        return {"start_step": start_step, "final_step": start_step, "scalars": {},
                "preempted": False}
      # Importance weights or a group-balancing sampler (fair.method); cached in the workdir.
      source, sampler = fairness.prepare(config, source, workdir, exp.global_batch)
      return loop(exp, source, state, start_step, ckpt, workdir, sampler, lock)
    finally:
      ckpt.close()


def batch_sampler(exp: experiment.Experiment, source: data.Source,
                  sampler: data.WeightedSampler | None = None
                  ) -> data.IndexSampler | data.WeightedSampler | data.PoissonSampler | None:
  """What draws the run's batches: Poisson sampling for a DP run (what its accountant
  assumes), else ``sampler`` (None: the loader's epochs of permutations)."""
  poisson = ledger.sampler(exp.privacy, len(source), exp.config.train.batch_size,
                           exp.config.seed, exp.objective.examples_per_step)
  return sampler if poisson is None else poisson


class _Run:
  """One call of ``loop``: what acts between steps, each on its own cadence.

  ``log`` writes a ``metrics.jsonl`` line (the guard, averages, input wait, epsilon),
  ``grid`` a sample grid, ``evaluate`` the periodic evaluation with the best checkpoint,
  ``save`` a checkpoint (after checking the workdir's lease).
  """

  def __init__(self, exp: experiment.Experiment, workdir: str, start_step: int,
               ckpt: checkpoint.Checkpointer, lock: robust.WorkdirLock | None):
    config = exp.config
    self.exp, self.config, self.workdir, self.ckpt, self.lock = exp, config, workdir, ckpt, lock
    self.summary: dict[str, Any] = {"start_step": start_step, "final_step": start_step,
                                    "scalars": {}, "preempted": False}
    self.evaluator = self.best = None
    if config.eval.every_steps:
      self.evaluator = runner.Evaluator(exp, out_dir=os.path.join(workdir, "eval"))
      self.evaluator.check()  # A missing backbone fails now, not after hours of training.
      self.best = checkpoint.BestCheckpoint(workdir, config.eval.best_metric,
                                            config.eval.best_mode,
                                            self.evaluator.provenance())
    self.grid_latents = np.asarray(exp.objective.sample_latents(exp.sample_rng,
                                                                config.log.num_samples))
    self.grid_labels = sampling.prior_labels(config.log.num_samples,
                                             exp.objective.num_classes,
                                             exp.objective.label_probs)
    self.logger = logs.MetricLogger(workdir, config.train.num_steps, start_step)
    self.acc, self.wait_mark = _Accumulator(), 0.0

  def cadences(self) -> tuple[int, ...]:
    """Where a dispatch of several steps must end: at every step the loop acts on."""
    config = self.config
    return (config.log.every_steps, config.train.checkpoint_every_steps,
            config.log.sample_every_steps if self.exp.makes_images else 0,
            config.eval.every_steps if self.evaluator is not None else 0)

  def log(self, done: int, state: Any, loader: data.Loader) -> None:
    """Reads the guard and the window's averages to the host and writes them."""
    config = self.config
    guard = parallel.to_host(state[robust.GUARD_KEY])
    scalars, bad = self.acc.read()
    robust.check_guard(guard, config.train.nan_policy, config.train.max_nan_skips, bad)
    wait, self.wait_mark = loader.wait_seconds - self.wait_mark, loader.wait_seconds
    scalars.update(self.logger.progress(done, scalars), input_wait_seconds=wait,
                   nan_skipped=float(guard["skipped"]))
    scalars.update(ledger.scalars(self.exp.privacy, done))
    self.logger.write(done, scalars)
    self.summary.update(final_step=done, scalars=scalars)

  def grid(self, done: int, state: Any) -> None:
    """The sample grid of ``state``: a PNG under ``WORKDIR/samples/`` and the event log."""
    exp = self.exp
    images = sampling.decode_images(exp, state, self.grid_latents, self.grid_labels)
    if jax.process_index() == 0:
      logs.save_image_grid(images, os.path.join(self.workdir, "samples",
                                                f"step_{done:06d}.png"),
                           scale=sampling.grid_scale(exp.spec))
    self.logger.image("samples", images, done)

  def evaluate(self, done: int, state: Any) -> None:
    """The periodic evaluation: its report, its scalars, and the best checkpoint."""
    eval_dir = os.path.join(self.workdir, "eval")
    results = self.evaluator(state, done)
    runner.write_report(os.path.join(eval_dir, f"step_{done:06d}.json"), done, "training",
                        results, self.evaluator.provenance())
    self.logger.write(done, {f"eval/{k}": v for k, v in results.items()})
    self.logger.image_file("eval/group_proportions",
                           os.path.join(eval_dir, f"groups_step_{done:06d}.png"), done)
    if self.best.update(done, results, state):
      logging.info("New best %s=%.5g at step %d.", self.best.metric,
                   self.best.record["value"], done)
    self.summary["eval"] = results

  def save(self, done: int, state: Any) -> None:
    """A checkpoint of ``done``, never into a workdir whose lease another run took over."""
    if self.lock is not None:
      self.lock.check()
    self.ckpt.save(done, state, force=True)

  def close(self) -> None:
    """Closes the logger and the best checkpoint."""
    self.logger.close()
    if self.best is not None:
      self.best.close()


def loop(exp: experiment.Experiment, source: data.Source, state: Any, start_step: int,
         ckpt: checkpoint.Checkpointer, workdir: str,
         sampler: data.WeightedSampler | None = None,
         lock: robust.WorkdirLock | None = None) -> dict[str, Any]:
  """Runs steps ``start_step .. train.num_steps`` of ``exp`` from ``state``.

  Every dispatch: the next batch, the jitted step, metric accumulation on device (or
  ``train.steps_per_dispatch`` batches and steps in one program, ``TrainStep.steps``). Every
  ``log.every_steps`` (and at checkpoints): the guard and averages read to the host and a
  ``metrics.jsonl`` line with ``steps_per_sec`` and ``input_wait_seconds`` of the window.
  Sample grids, periodic evaluation with the best checkpoint, checkpoints and the
  preemption stop follow their own cadences (``_Run``). ``tools/benchmark.py`` times this
  function.

  Returns:
    The summary of ``train_and_evaluate``.
  """
  config = exp.config
  num_steps = config.train.num_steps
  run = _Run(exp, workdir, start_step, ckpt, lock)
  train_step = make_train_step(exp)
  rng = parallel.replicate(exp.step_rng, exp.mesh)
  per_dispatch = config.train.get("steps_per_dispatch", 1)
  profile_steps = tuple(config.train.get("profile_steps") or ())
  # The loader keeps one whole dispatch of batches ready (at most a log window's).
  stops = (num_steps,) + profile_steps
  sizes = functools.partial(dispatch_size, k=per_dispatch, every=run.cadences(), stops=stops)
  # Each dispatch's batches arrive stacked, in one transfer; a few dispatches are kept ready.
  loader = data.Loader(source, exp.global_batch, config.seed,
                       parallel.data_sharding(exp.mesh), start_step, num_steps,
                       prefetch=config.data.prefetch, sampler=batch_sampler(exp, source, sampler),
                       dispatch=sizes if per_dispatch > 1 else None)
  profiler = logs.Profiler(workdir, profile_steps)
  batches = iter(loader)
  try:
    with robust.Preemption() as preemption:
      for step, batch in batches:
        t0 = time.perf_counter()
        profiler.before(step)
        size = sizes(step)
        if size == 1:
          state, metrics = train_step(state, batch, rng)
          run.acc.add(metrics)
        else:
          state, run.acc.total = train_step.steps(state, batch, rng, run.acc.total)
          metrics = run.acc.total
        done = step + size
        peers.note_step(done)
        profiler.after(done, metrics)
        if "compile_seconds" not in run.summary:
          jax.block_until_ready(metrics)
          run.summary["compile_seconds"] = time.perf_counter() - t0
          logging.info("First step (compilation included; %d step(s) in the dispatch) took "
                       "%.1f s.", size, time.perf_counter() - t0)
        if _between_steps(run, done, state, loader, preemption.should_stop(done, size)):
          break
  finally:
    profiler.close()
    loader.close()
    run.close()
  return run.summary


def _between_steps(run: _Run, done: int, state: Any, loader: data.Loader, stop: bool) -> bool:
  """What is due after step ``done``: a log line, a sample grid, an evaluation, a
  checkpoint; True when the run must stop (a preemption, whose checkpoint is committed).

  A preemption saves and exits at once: its grace period (seconds on spot VMs) is no time
  for the sample grid or an evaluation, which the resumed run will make.
  """
  config = run.config
  final = done == config.train.num_steps
  save_due = final or stop or done % config.train.checkpoint_every_steps == 0
  if save_due or done % config.log.every_steps == 0:
    run.log(done, state, loader)
  if run.exp.makes_images and (final or done % config.log.sample_every_steps == 0):
    run.grid(done, state)
  if run.evaluator is not None and (final or done % config.eval.every_steps == 0):
    run.evaluate(done, state)
  if save_due:
    run.save(done, state)
  if stop:
    run.ckpt.wait()
    run.summary["preempted"] = True
    logging.warning("Preempted: checkpoint of step %d committed; exiting.", done)
  return stop


def train(config: ml_collections.ConfigDict, workdir: str,
          allow_new_experiment: bool = False) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming it), as ``python -m fairgen.main`` does.

  Also reached as ``fairgen.train(config, workdir)`` (``_CallableModule``).

  Returns:
    The run's summary, a dict with its start and final step, the last logged scalars and
    evaluation, and whether a signal stopped it (``preempted``).

  Raises:
    config.ConfigError, data.DataError, checkpoint.WorkdirError: for bad input, with the
      message the launcher prints after ``fairgen: error:``.
  """
  config_lib.validate_mesh(config.mesh)
  return train_and_evaluate(config, storage.normalize(workdir), allow_new_experiment)


class _CallableModule(types.ModuleType):
  """This module, callable as ``train``: ``fairgen.train(config, workdir)``.

  Importing ``fairgen.train`` binds the package's ``train`` attribute to this module, so
  the Python API's ``fairgen.train`` is the module itself, answering calls.
  """

  def __call__(self, config: ml_collections.ConfigDict, workdir: str,
               allow_new_experiment: bool = False) -> dict[str, Any]:
    return train(config, workdir, allow_new_experiment)


sys.modules[__name__].__class__ = _CallableModule
