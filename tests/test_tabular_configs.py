"""One smoke train per tabular config, through the loop, and --mode=evaluate on it; with
Adult's sex x race audit groups, so that each evaluator's k-way report runs end to end."""

import numpy as np
import pytest

from conftest import load_config
from fairgen import train
from fairgen.evaluation import modes

EXPECTED = {
    "vfae_adult": ("probe_y_accuracy", "probe_s_accuracy", "s_majority_rate", "recon",
                   "accuracy", "statistical_parity_difference", "probe_groups_accuracy",
                   "groups_majority_rate", "probe_y_groups_demographic_parity_difference",
                   "groups_equalized_odds_difference"),
    "fair_tabgan_adult": ("tstr_accuracy", "tstr_spd", "synthetic_spd", "real_spd",
                          "marginal_tv", "marginal_w1", "trtr_accuracy",
                          "tstr_groups_demographic_parity_difference",
                          "trtr_groups_worst_statistical_parity_difference",
                          "real_groups_demographic_parity_ratio",
                          "synthetic_groups_demographic_parity_difference"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tabular_smoke_config_trains_and_evaluates(name, workdir, max_traces):
  config = load_config(name, "smoke", **{"data.options.audit_groups": ("sex", "race")})
  max_traces(1)
  summary = train.train_and_evaluate(config, workdir)
  assert summary["final_step"] == config.train.num_steps
  for key in EXPECTED[name]:
    assert np.isfinite(summary["eval"][key]), key
  again = modes.evaluate(config, workdir)
  assert set(EXPECTED[name]) <= set(again["metrics"])
