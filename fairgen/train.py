"""The one generic training loop: setup_mesh/state/data, then train_loop, for every objective.

GAN, VAE and fairness variants differ only in the ``Objective`` they build (pure functions,
see ``objectives/base.py``); everything here (sharding, RNG, checkpoints, logs, samples) is
shared.
"""

from __future__ import annotations

import dataclasses
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
from fairgen import logs
from fairgen import objectives
from fairgen import parallel


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


def make_train_step(exp: Experiment, trace_counter: list[int] | None = None):
  """The objective's step, jitted once with explicit shardings and state donation."""

  def step(state, batch, rng):
    if trace_counter is not None:
      trace_counter[0] += 1  # Runs only while tracing.
    return exp.objective.train_step(state, batch, rng)

  repl = parallel.replicated(exp.mesh)
  return jax.jit(step, in_shardings=(exp.state_shardings, parallel.data_sharding(exp.mesh), repl),
                 out_shardings=(exp.state_shardings, repl), donate_argnums=0)


def make_generate(exp: Experiment, **kwargs: Any):
  """Jitted ``generate(state, rng, labels) -> images`` (replicated output)."""
  import functools
  fn = functools.partial(exp.objective.generate, **kwargs) if kwargs else exp.objective.generate
  return jax.jit(fn, out_shardings=parallel.replicated(exp.mesh))


def sample_labels(exp: Experiment, num: int) -> jax.Array:
  """Labels for a sample grid: classes in order, repeated (zeros if unconditional)."""
  classes = max(exp.objective.num_classes, 1)
  return jnp.asarray(np.arange(num) % classes, jnp.int32)


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

  train_step = make_train_step(exp, traces)
  generate = make_generate(exp)
  grid_labels = sample_labels(exp, config.log.num_samples)
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
        images = parallel.to_host(generate(state, exp.sample_rng, grid_labels))
        if jax.process_index() == 0:
          logs.save_image_grid(images, os.path.join(workdir, "samples", f"step_{done:06d}.png"),
                               scale=max(1, 56 // exp.spec.image_shape[0]))
      if save_due:
        ckpt.save(done, state, force=True)
  finally:
    loader.close()
    ckpt.close()
    logger.close()
  summary["train_step_traces"] = traces[0]
  summary["compile_seconds"] = compile_seconds
  return summary
