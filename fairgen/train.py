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
from fairgen import logs
from fairgen import objectives
from fairgen import parallel
from fairgen import sampling


class NonFiniteError(FloatingPointError):
  """A loss or gradient norm became NaN or infinite."""


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
  abstract_state = jax.eval_shape(objective.init, init_rng)
  exp = Experiment(
      config=config, mesh=mesh, spec=source.spec, objective=objective,
      abstract_state=abstract_state,
      state_shardings=parallel.state_shardings(mesh, abstract_state),
      init_rng=init_rng, step_rng=step_rng, sample_rng=sample_rng)
  parallel.check_batch(exp.global_batch, mesh)
  return exp


def init_state(exp: Experiment) -> Any:
  """The initial state, created directly in its shardings (no host copy, no aliasing)."""
  return jax.jit(exp.objective.init, out_shardings=exp.state_shardings)(exp.init_rng)


def restore_or_init(exp: Experiment, ckpt: checkpoint.Checkpointer) -> tuple[Any, int]:
  """Resumes from the newest checkpoint of the workdir, else starts from scratch."""
  step = ckpt.latest_step()
  if step is None:
    return init_state(exp), 0
  target = checkpoint.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
  state = ckpt.restore(step, target)
  logging.info("Resumed from %s/%d.", ckpt.directory, step)
  return state, int(step)


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
  """The objective's step, jitted once with explicit shardings and state donation."""

  def step(state, batch, rng):
    if trace_counter is not None:
      trace_counter[0] += 1  # Runs only while tracing.
    return exp.objective.train_step(state, batch, rng)

  repl = parallel.replicated(exp.mesh)
  return jax.jit(step, in_shardings=(exp.state_shardings, parallel.data_sharding(exp.mesh), repl),
                 out_shardings=(exp.state_shardings, repl), donate_argnums=0)


def _check_finite(step: int, scalars: dict[str, float]) -> None:
  bad = {k: v for k, v in scalars.items() if not np.isfinite(v)}
  if bad:
    raise NonFiniteError(
        f"Non-finite values by step {step}: {bad}. Training stopped; the last checkpoint "
        f"before it is intact. Lower the learning rate or check the data.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint).

  Returns:
    A summary: the final step, the last logged scalars, and how often the step was traced.
  """
  config_lib.validate(config)
  source = data.load(config.data, config.data.split)
  exp = setup(config, source)
  checkpoint.check_and_write_config(workdir, config)
  ckpt = checkpoint.Checkpointer(workdir, config.train.max_to_keep,
                                 config.train.checkpoint_every_steps)
  state, start_step = restore_or_init(exp, ckpt)
  num_steps = config.train.num_steps
  traces = [0]
  summary: dict[str, Any] = {"start_step": start_step, "final_step": start_step, "scalars": {}}
  if start_step >= num_steps:
    logging.info("The workdir is already at step %d >= train.num_steps=%d.", start_step,
                 num_steps)
    ckpt.close()
    return {**summary, "train_step_traces": 0}

  evaluator = best = None
  if config.eval.every_steps:
    evaluator = evaluate.Evaluator(exp)
    evaluator.check()  # A missing backbone fails now, not after hours of training.
    best = checkpoint.BestCheckpoint(workdir, config.eval.best_metric, config.eval.best_mode)
  train_step = make_train_step(exp, traces)
  grid_latents = np.asarray(exp.objective.sample_latents(exp.sample_rng, config.log.num_samples))
  grid_labels = sampling.prior_labels(config.log.num_samples, exp.objective.num_classes)
  rng = jax.device_put(exp.step_rng, parallel.replicated(exp.mesh))
  logger = logs.MetricLogger(workdir, num_steps, start_step)
  loader = data.Loader(source, exp.global_batch, config.seed,
                       parallel.data_sharding(exp.mesh), start_step, num_steps,
                       prefetch=config.data.prefetch)
  acc, n_acc, wait_mark, compile_seconds = None, 0, 0.0, None
  try:
    for step, batch in loader:
      t0 = time.perf_counter()
      state, metrics = train_step(state, batch, rng)
      if compile_seconds is None:
        jax.block_until_ready(metrics)
        compile_seconds = time.perf_counter() - t0
        logging.info("First step (compilation included) took %.1f s.", compile_seconds)
      acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
      n_acc += 1
      done = step + 1
      final = done == num_steps
      save_due = final or done % config.train.checkpoint_every_steps == 0
      if save_due or final or done % config.log.every_steps == 0:
        scalars = {k: float(v) / n_acc for k, v in parallel.to_host(acc).items()}
        _check_finite(done, scalars)
        wait = loader.wait_seconds - wait_mark
        wait_mark = loader.wait_seconds
        speed = logger.progress(done, scalars)
        scalars.update(speed, input_wait_seconds=wait)
        logger.write(done, scalars)
        summary.update(final_step=done, scalars=scalars)
        acc, n_acc = None, 0
      if final or done % config.log.sample_every_steps == 0:
        images = sampling.decode_images(exp, state, grid_latents, grid_labels)
        if jax.process_index() == 0:
          logs.save_image_grid(images, os.path.join(workdir, "samples", f"step_{done:06d}.png"),
                               scale=max(1, 56 // exp.spec.image_shape[0]))
      if evaluator is not None and (final or done % config.eval.every_steps == 0):
        results = evaluator(state, done)
        logger.write(done, {f"eval/{k}": v for k, v in results.items()})
        if best.update(done, results, state):
          logging.info("New best %s=%.5g at step %d.", best.metric, best.record["value"], done)
        summary["eval"] = results
      if save_due:
        ckpt.save(done, state, force=True)
  finally:
    loader.close()
    ckpt.close()
    logger.close()
    if best is not None:
      best.close()
  summary["train_step_traces"] = traces[0]
  summary["compile_seconds"] = compile_seconds
  return summary
