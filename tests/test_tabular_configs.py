"""One smoke train per tabular config, through the loop, and --mode=evaluate on it."""

import numpy as np
import pytest

from conftest import load_config
from fairgen import train
from fairgen.evaluation import modes

EXPECTED = {
    "vfae_adult": ("probe_y_accuracy", "probe_s_accuracy", "s_majority_rate", "recon",
                   "accuracy", "statistical_parity_difference"),
    "fair_tabgan_adult": ("tstr_accuracy", "tstr_spd", "synthetic_spd", "real_spd",
                          "marginal_tv", "marginal_w1", "trtr_accuracy"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tabular_smoke_config_trains_and_evaluates(name, workdir, max_traces):
  config = load_config(name, "smoke")
  max_traces(1)
  summary = train.train_and_evaluate(config, workdir)
  assert summary["final_step"] == config.train.num_steps
  for key in EXPECTED[name]:
    assert np.isfinite(summary["eval"][key]), key
  again = modes.evaluate(config, workdir)
  assert set(EXPECTED[name]) <= set(again["metrics"])
