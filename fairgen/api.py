"""fairgen from Python: train a config, load a trained workdir, sample and evaluate it.

    import fairgen
    config = fairgen.load_config("experiments/vae_mnist.py")  # what --config= loads
    fairgen.train(config, "/tmp/fg/vae")          # what `python -m fairgen.main` does
    run = fairgen.load("/tmp/fg/vae")             # local disk or gs://
    run.steps                                     # the committed checkpoints, e.g. [150, 300]
    images = run.sample(16, seed=0)               # NumPy, in the dataset's range ([-1, 1])
    metrics = run.evaluate()                      # what --mode=evaluate writes

``Run`` reads the workdir's ``config.json`` and never writes to the workdir except where
``--mode=evaluate`` writes (``WORKDIR/eval/``). ``Run.sample`` draws exactly the images of
``--mode=sample``'s ``grid.npz`` for the same checkpoint, number and seed.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from fairgen import checkpoint
from fairgen import config as config_lib
from fairgen import data
from fairgen import experiment
from fairgen import sampling
from fairgen import storage
from fairgen import train as train_lib
from fairgen.evaluation import modes


train = train_lib.train  # Also fairgen.train(config, workdir): the module answers calls.


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config of an experiment file, as ``--config=SPEC`` gives it to the launcher.

  Args:
    spec: ``PATH`` or ``PATH:ARGS``, e.g. ``"experiments/vae_mnist.py:smoke"`` or
      ``"experiments/fair_mnist.py:method=importance,smoke"``.

  Returns:
    The experiment's ``ConfigDict``. Change its keys as ``--config.a.b=value`` would
    (``config.train.num_steps = 100``), then ``train(config, workdir)``.

  Raises:
    config.ConfigError: for a missing file, an unknown variant or a file that does not
      return a config.
  """
  return config_lib.load_spec(spec)


def load(workdir: str) -> Run:
  """The trained run in ``workdir`` (its ``config.json`` and checkpoints), read-only.

  Raises:
    checkpoint.WorkdirError: if ``workdir`` holds no ``config.json`` (it was not trained
      by fairgen) or no committed checkpoint.
  """
  workdir = storage.normalize(workdir)
  run = Run(workdir, checkpoint.read_config(workdir))
  if not run.steps:
    raise checkpoint.WorkdirError(
        f"{workdir} holds no committed checkpoint yet: train it first (its config.json is "
        f"there, so a run started and stopped before its first checkpoint).")
  return run


class Run:
  """A trained workdir: its config, its checkpoints, samples and evaluation."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.workdir = workdir
    self.config = config

  def __repr__(self) -> str:
    return f"Run({self.workdir!r}, steps={self.steps})"

  @property
  def steps(self) -> list[int]:
    """The committed checkpoints' steps, oldest first."""
    return checkpoint.committed_steps(os.path.join(self.workdir, "checkpoints"))

  @functools.cached_property
  def experiment(self) -> experiment.Experiment:
    """The config built for generation (the held-out split's spec, no training extras)."""
    return experiment.setup(self.config, data.load_eval(self.config.data).spec,
                            for_training=False)

  def state(self, step: int | None = None) -> tuple[Any, int]:
    """``(train state, step)`` of checkpoint ``step`` (default: the latest)."""
    which = "latest" if step is None else str(int(step))
    return experiment.restore_checkpoint(self.experiment, self.workdir, which)

  def sample(self, n: int, *, labels: Sequence[int] | None = None,
             groups: Sequence[int] | None = None, seed: int = 0, step: int | None = None,
             truncation: float = 0.0) -> np.ndarray:
    """``n`` generated images ``[n, H, W, C]`` float32 in the data's range ([-1, 1]).

    Args:
      n: how many.
      labels: the class of each sample, for a model conditioned on classes.
      groups: the sensitive-attribute group of each sample, for a model conditioned on
        groups (``fair.method='conditional'``). Without either, a conditional model's
        conditions follow its prior (``fair.target`` for groups), as in ``--mode=sample``.
      seed: the latents' seed: ``--mode=sample --config.sample.seed`` draws the same images.
      step: the checkpoint (default: the latest).
      truncation: > 0 draws latents from a normal truncated at this many deviations.

    Raises:
      ValueError: for conditions the model does not take, or of the wrong length or range.
    """
    exp = self.experiment
    if not exp.makes_images:
      raise ValueError(f"The {self.config.objective.name!r} objective does not generate "
                       f"images; Run.sample needs one that does.")
    conditions = _conditions(exp, n, labels, groups)
    state, _ = self.state(step)
    key = jax.random.split(jax.random.key(seed), 3)[0]  # --mode=sample's grid key.
    images, _ = sampling.generate_images(exp, state, key, n, conditions, truncation)
    return images

  def evaluate(self, step: int | None = None, **eval_overrides: Any) -> dict[str, float]:
    """The metrics ``--mode=evaluate`` computes and writes under ``WORKDIR/eval/``.

    Args:
      step: the checkpoint (default: ``eval.checkpoint``, normally the latest).
      **eval_overrides: keys of the ``eval`` section, e.g. ``metrics=('fid',)``,
        ``num_samples=500``.
    """
    config = self.config.copy_and_resolve_references()
    config.eval.update(eval_overrides)
    if step is not None:
      config.eval.checkpoint = str(int(step))
    return modes.evaluate(config, self.workdir)["metrics"]


def _conditions(exp: experiment.Experiment, n: int, labels: Sequence[int] | None,
                groups: Sequence[int] | None) -> np.ndarray | None:
  """The conditions of ``n`` samples: ``labels`` or ``groups``, whichever the model takes."""
  key = exp.objective.condition_key if exp.objective.num_classes else None
  for name, given, wanted in (("labels", labels, "label"), ("groups", groups, "attr")):
    if given is None:
      continue
    if key != wanted:
      takes = {"label": "labels", "attr": "groups"}.get(key, "no conditions")
      raise ValueError(f"This model takes {takes}, not {name}.")
    values = np.asarray(given, np.int32)
    if values.shape != (n,):
      raise ValueError(f"{name} must have one entry per sample ({n}), got {values.shape}.")
    return values
  return None
