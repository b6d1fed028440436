"""``tools/smoke_digest.py``: the bit-for-bit digest that shows a refactor changed nothing."""

from __future__ import annotations

import os

from conftest import REPO
from fairgen import cli

digest_tool = cli.load_module(os.path.join(REPO, "tools", "smoke_digest.py"))


def test_cases_name_a_variant_and_overrides():
  command = digest_tool.command_of("dcgan_mnist:seeds+objective.n_disc=2", "/w")
  assert command[1:] == ["-m", "fairgen.main", "--config=experiments/dcgan_mnist.py:seeds",
                         "--workdir=/w", "--config.objective.n_disc=2"]
  assert digest_tool.command_of("vae_mnist", "/w")[3] == "--config=experiments/vae_mnist.py:smoke"
  assert digest_tool._strip_timings({"loss": 1.0, "steps_per_sec": 3.0,
                                     "input_wait_seconds": 0.1}) == {"loss": 1.0}


def test_two_smoke_runs_digest_alike_and_another_run_does_not(tmp_path):
  """A smoke run is a pure function of its config: its digest lines repeat exactly, and a
  changed hyperparameter changes the metrics' and every checkpoint's hash."""
  first = digest_tool.digest("vae_mnist", str(tmp_path / "a"))
  again = digest_tool.digest("vae_mnist", str(tmp_path / "b"))
  other = digest_tool.digest("vae_mnist:smoke+optim.lr=0.002", str(tmp_path / "c"))
  kinds = [line.split()[1] for line in first]
  assert kinds[0] == "metrics" and any(k.startswith("checkpoint/") for k in kinds), first
  assert first == again
  assert all(x.split()[2] != y.split()[2] for x, y in zip(first, other))
