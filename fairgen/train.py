"""The one generic training loop: setup_mesh/state/data, then train_loop, for every objective.

GAN, VAE and fairness variants differ only in the ``Objective`` they build (pure functions,
see ``objectives/base.py``); everything here (sharding, RNG, checkpoints, logs, samples) is
shared.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fairgen import checkpoint
from fairgen import config as config_lib
from fairgen import data
from fairgen import evaluate
from fairgen import fair
from fairgen import logs
from fairgen import objectives
from fairgen import parallel
from fairgen import robust
from fairgen import sampling


NonFiniteError = robust.NonFiniteError


@dataclasses.dataclass
class Experiment:
  """Everything built from a config that training, evaluation and sampling share."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  spec: data.DataSpec
  objective: objectives.Objective
  abstract_state: Any
  state_shardings: Any
  init_rng: jax.Array
  step_rng: jax.Array
  sample_rng: jax.Array

  @functools.cached_property
  def sharded_decode(self):
    """``objective.decode`` jitted with latents and labels split over the data axis."""
    data = parallel.data_sharding(self.mesh)
    return jax.jit(self.objective.decode, in_shardings=(self.state_shardings, data, data),
                   out_shardings=data)

  @property
  def makes_images(self) -> bool:
    """Whether the objective generates images (sample grids apply)."""
    return self.objective.decode is not None and hasattr(self.spec, "image_shape")

  @property
  def global_batch(self) -> int:
    """Examples consumed per step (all processes together)."""
    return self.config.train.batch_size * self.objective.examples_per_step


def setup(config: ml_collections.ConfigDict, source: data.Source | None = None) -> Experiment:
  """Validates ``config`` and builds the mesh, objective and abstract sharded state."""
  config_lib.validate(config)
  mesh = parallel.make_mesh(config.mesh.data)
  if source is None:
    source = data.load(config.data, config.data.split)
  objective = objectives.build_objective(config, source.spec)
  root = jax.random.key(config.seed)
  init_rng, step_rng, sample_rng = jax.random.split(root, 3)
  abstract_state = jax.eval_shape(functools.partial(full_init, objective), init_rng)
  exp = Experiment(
      config=config, mesh=mesh, spec=source.spec, objective=objective,
      abstract_state=abstract_state,
      state_shardings=parallel.state_shardings(mesh, abstract_state),
      init_rng=init_rng, step_rng=step_rng, sample_rng=sample_rng)
  parallel.check_batch(exp.global_batch, mesh)
  return exp


def full_init(objective: objectives.Objective, rng: jax.Array) -> Any:
  """The objective's initial state plus the loop's non-finite guard counters."""
  return {**objective.init(rng), robust.GUARD_KEY: robust.init_guard()}


def init_state(exp: Experiment) -> Any:
  """The initial state, created directly in its shardings (no host copy, no aliasing)."""
  return jax.jit(functools.partial(full_init, exp.objective),
                 out_shardings=exp.state_shardings)(exp.init_rng)


def restore_or_init(exp: Experiment, ckpt: checkpoint.Checkpointer) -> tuple[Any, int]:
  """Resumes from the newest readable checkpoint of the workdir, else starts from scratch.

  A checkpoint that fails to restore (corrupted or truncated files) is reported, moved to
  ``WORKDIR/checkpoints_damaged/`` for inspection, and the previous one is tried.
  """
  target = checkpoint.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
  errors = []
  for step in reversed(ckpt.all_steps()):
    try:
      state = ckpt.restore(step, target)
    except checkpoint.WorkdirError:
      raise  # The model code changed: every checkpoint would fail the same way.
    except Exception as e:  # Orbax/TensorStore raise many types for damaged files.
      moved = ckpt.quarantine(step)
      logging.error("Checkpoint %s/%d cannot be read (%s: %s); moved it to %s and trying the "
                    "previous one.", ckpt.directory, step, type(e).__name__,
                    (str(e).splitlines() or [""])[0][:200], moved)
      errors.append(step)
      continue
    logging.info("Resumed from %s/%d.", ckpt.directory, step)
    return state, int(step)
  if errors:
    raise checkpoint.WorkdirError(
        f"No checkpoint in {ckpt.directory} can be read: steps {errors} are damaged and were "
        f"moved to {ckpt.directory}_damaged/. The next launch starts from scratch.")
  return init_state(exp), 0


def restore_checkpoint(exp: Experiment, workdir: str, which: str = "latest") -> tuple[Any, int]:
  """Loads a checkpoint read-only: 'latest', 'best' (by eval.best_metric) or a step number.

  Raises:
    checkpoint.WorkdirError: if the workdir has no such checkpoint.
  """
  which = str(which)
  subdir = "best" if which == "best" else "checkpoints"
  ckpt = checkpoint.Checkpointer(workdir, read_only=True, subdir=subdir)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise checkpoint.WorkdirError(f"{ckpt.directory} holds no checkpoint: train first.")
    if which in ("latest", "best"):
      step = ckpt.latest_step()
    else:
      step = int(which)
      if step not in steps:
        raise checkpoint.WorkdirError(f"No checkpoint for step {step}; available: {steps}.")
    target = checkpoint.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
    return ckpt.restore(step, target), int(step)
  finally:
    ckpt.close()


def make_train_step(exp: Experiment, trace_counter: list[int] | None = None):
  """The objective's guarded step, jitted once with explicit shardings and state donation."""
  guarded = robust.guard_step(exp.objective.train_step)

  def step(state, batch, rng):
    if trace_counter is not None:
      trace_counter[0] += 1  # Runs only while tracing.
    return guarded(state, batch, rng)

  repl = parallel.replicated(exp.mesh)
  return jax.jit(step, in_shardings=(exp.state_shardings, parallel.data_sharding(exp.mesh), repl),
                 out_shardings=(exp.state_shardings, repl), donate_argnums=0)


class _Accumulator:
  """Sums step metrics on device; averages over the finite steps when read."""

  def __init__(self):
    self.total, self.steps = None, 0

  def add(self, metrics: dict[str, jax.Array]) -> None:
    self.total = metrics if self.total is None else jax.tree.map(jnp.add, self.total, metrics)
    self.steps += 1

  def read(self) -> tuple[dict[str, float], list[str]]:
    """(averages over finite steps, names of quantities that were ever non-finite)."""
    host = {k: float(v) for k, v in parallel.to_host(self.total).items()}
    finite = host.pop("finite")
    bad = sorted(k[len(robust.NONFINITE_PREFIX):] for k, v in host.items()
                 if k.startswith(robust.NONFINITE_PREFIX) and v > 0)
    averages = {k: v / max(finite, 1.0) for k, v in host.items()
                if not k.startswith(robust.NONFINITE_PREFIX)}
    self.total, self.steps = None, 0
    return averages, bad


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_new_experiment: bool = False) -> dict[str, Any]:
  """Trains ``config`` in ``workdir``, resuming if it holds a checkpoint.

  Args:
    config: the experiment config.
    workdir: the run directory (see README: the workdir contract).
    allow_new_experiment: resume even if the workdir's config.json has different
      data/model/objective sections (the old config is kept as config.<time>.json).

  Returns:
    A summary: start and final step, the last logged scalars, the last evaluation, how
    often the step was traced, and whether the run stopped for a preemption signal.
  """
  config_lib.validate(config)
  source = data.load(config.data, config.data.split)
  exp = setup(config, source)
  with robust.WorkdirLock(workdir):
    checkpoint.check_and_write_config(workdir, config, force=allow_new_experiment)
    ckpt = checkpoint.Checkpointer(workdir, config.train.max_to_keep,
                                   config.train.checkpoint_every_steps)
    try:
      state, start_step = restore_or_init(exp, ckpt)
      if start_step >= config.train.num_steps:
        logging.info("The workdir is already at step %d >= train.num_steps=%d.", start_step,
                     config.train.num_steps)
        return {"start_step": start_step, "final_step": start_step, "scalars": {},
                "train_step_traces": 0, "preempted": False}
      # Importance weights or a group-balancing sampler (fair.method); cached in the workdir.
      source, sampler = fair.prepare(config, source, workdir, exp.global_batch)
      return _train_loop(exp, source, state, start_step, ckpt, workdir, sampler)
    finally:
      ckpt.close()


def _train_loop(exp: Experiment, source: data.Source, state: Any, start_step: int,
                ckpt: checkpoint.Checkpointer, workdir: str,
                sampler: data.WeightedSampler | None = None) -> dict[str, Any]:
  config = exp.config
  num_steps = config.train.num_steps
  summary: dict[str, Any] = {"start_step": start_step, "final_step": start_step,
                             "scalars": {}, "preempted": False}
  evaluator = best = None
  if config.eval.every_steps:
    evaluator = evaluate.Evaluator(exp, out_dir=os.path.join(workdir, "eval"))
    evaluator.check()  # A missing backbone fails now, not after hours of training.
    best = checkpoint.BestCheckpoint(workdir, config.eval.best_metric, config.eval.best_mode)
  traces = [0]
  train_step = make_train_step(exp, traces)
  grid_latents = np.asarray(exp.objective.sample_latents(exp.sample_rng, config.log.num_samples))
  grid_labels = sampling.prior_labels(config.log.num_samples, exp.objective.num_classes,
                                      exp.objective.label_probs)
  rng = jax.device_put(exp.step_rng, parallel.replicated(exp.mesh))
  logger = logs.MetricLogger(workdir, num_steps, start_step)
  loader = data.Loader(source, exp.global_batch, config.seed,
                       parallel.data_sharding(exp.mesh), start_step, num_steps,
                       prefetch=config.data.prefetch, sampler=sampler)
  acc, wait_mark = _Accumulator(), 0.0
  try:
    with robust.Preemption() as preemption:
      for step, batch in loader:
        t0 = time.perf_counter()
        state, metrics = train_step(state, batch, rng)
        if "compile_seconds" not in summary:
          jax.block_until_ready(metrics)
          summary["compile_seconds"] = time.perf_counter() - t0
          logging.info("First step (compilation included) took %.1f s.", time.perf_counter() - t0)
        acc.add(metrics)
        done = step + 1
        stop = preemption.should_stop(done)
        final = done == num_steps or stop
        save_due = final or done % config.train.checkpoint_every_steps == 0
        if save_due or done % config.log.every_steps == 0:
          guard = parallel.to_host(state[robust.GUARD_KEY])
          scalars, bad = acc.read()
          robust.check_guard(guard, config.train.nan_policy, config.train.max_nan_skips, bad)
          wait, wait_mark = loader.wait_seconds - wait_mark, loader.wait_seconds
          scalars.update(logger.progress(done, scalars), input_wait_seconds=wait,
                         nan_skipped=float(guard["skipped"]))
          logger.write(done, scalars)
          summary.update(final_step=done, scalars=scalars)
        if exp.makes_images and (final or done % config.log.sample_every_steps == 0):
          images = sampling.decode_images(exp, state, grid_latents, grid_labels)
          if jax.process_index() == 0:
            logs.save_image_grid(images, os.path.join(workdir, "samples", f"step_{done:06d}.png"),
                                 scale=sampling.grid_scale(exp.spec))
        if evaluator is not None and (final or done % config.eval.every_steps == 0):
          results = evaluator(state, done)
          logger.write(done, {f"eval/{k}": v for k, v in results.items()})
          if best.update(done, results, state):
            logging.info("New best %s=%.5g at step %d.", best.metric, best.record["value"], done)
          summary["eval"] = results
        if save_due:
          ckpt.save(done, state, force=True)
        if stop:
          ckpt.wait()
          summary["preempted"] = True
          logging.warning("Preempted: checkpoint of step %d committed; exiting.", done)
          break
  finally:
    loader.close()
    logger.close()
    if best is not None:
      best.close()
  summary["train_step_traces"] = traces[0]
  return summary
