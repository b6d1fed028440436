"""What a DP run records and reports: the hook the training loop and the releases call.

Every function takes the run's ``DpSettings`` or None (a run without a privacy section) and
does nothing for None, so its callers never branch on privacy:
- ``open_run``: at the start of training, refuses a workdir trained with another mechanism
  and records this one in ``WORKDIR/privacy.json``;
- ``sampler``: the Poisson sampler the accountant assumes (None: the caller's own);
- ``scalars``: the epsilon spent by a step, beside the training metrics;
- ``write_release``: ``privacy.json`` beside released samples (step, epsilon, delta and the
  mechanism).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from fairgen import checkpoint
from fairgen import data
from fairgen import storage
from fairgen.privacy.settings import DpSettings, check_record

RECORD = "privacy.json"  # The mechanism of a workdir, and what released samples spent.


def open_run(workdir: str, settings: DpSettings | None) -> None:
  """Refuses to resume a DP run with another mechanism; records the mechanism.

  Raises:
    checkpoint.WorkdirError: if ``WORKDIR/privacy.json`` holds another mechanism.
  """
  if settings is None:
    return
  path = os.path.join(workdir, RECORD)
  record = json.loads(storage.read_text(path)) if storage.exists(path) else None
  changed = check_record(record, settings)
  if changed:
    raise checkpoint.WorkdirError(
        f"{workdir} was trained with another DP mechanism ({'; '.join(changed)}); steps of "
        f"two mechanisms cannot be accounted as one run. Use a new workdir.")
  if record is None and jax.process_index() == 0:
    storage.write_atomic(path, json.dumps(settings.mechanism(), indent=2))


def sampler(settings: DpSettings | None, num_examples: int, batch_size: int, seed: int,
            draws: int) -> data.PoissonSampler | None:
  """Poisson sampling of ``draws`` batches per step (what the accountant assumes), or None."""
  if settings is None:
    return None
  return data.PoissonSampler(num_examples, batch_size, settings.sampling_rate, seed, draws)


def scalars(settings: DpSettings | None, step: int) -> dict[str, float]:
  """``{'epsilon': ...}`` spent by ``step`` train steps (empty without privacy)."""
  return {} if settings is None else {"epsilon": settings.epsilon(step)}


def write_release(directory: str, settings: DpSettings | None, step: int
                  ) -> dict[str, Any] | None:
  """Writes ``privacy.json`` (step, epsilon, delta, mechanism) into ``directory``, where
  samples of the weights of ``step`` are released; returns the record and its path (None
  without privacy)."""
  if settings is None:
    return None
  record = {"step": int(step), **settings.spent(step), "mechanism": settings.mechanism()}
  path = os.path.join(directory, RECORD)
  if jax.process_index() == 0:
    storage.write_atomic(path, json.dumps(record, indent=2))
  return {"record": record, "path": path}
