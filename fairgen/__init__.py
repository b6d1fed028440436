"""fairgen: fair and scalable generative training in JAX.

The Python API (``fairgen.api``): ``fairgen.train(config, workdir)`` trains as the launcher
does; ``fairgen.load_config(spec)`` loads an experiment file as ``--config=`` does;
``fairgen.load(workdir)`` gives a trained ``Run`` to sample and evaluate. They load
on first use, so ``import fairgen`` (and the launcher's flag checks) start no JAX.
"""

import importlib

__version__ = "0.1.0"

_API = ("load", "load_config", "train", "Run")


def __getattr__(name: str):
  """``fairgen.load``, ``fairgen.load_config``, ``fairgen.train`` and ``fairgen.Run``, from
  ``fairgen.api``."""
  if name == "train":  # The fairgen.train module, callable as the API's train().
    return importlib.import_module("fairgen.train")
  if name in _API:
    return getattr(importlib.import_module("fairgen.api"), name)
  raise AttributeError(f"module 'fairgen' has no attribute {name!r}")


__all__ = ["Run", "load", "load_config", "train"]
