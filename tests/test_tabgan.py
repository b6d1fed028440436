"""Fair tabular WGAN-GP: steps, decoded rows, the fairness penalty, sharding, TSTR."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fairgen import config as config_lib
from fairgen.evaluation import runner as evaluate
from fairgen import parallel
from fairgen.evaluation import tabular as tabular_eval
from fairgen.data import tabular
from fairgen.data import uci
from fairgen.metrics import fairness
from fairgen.models import tabgan as tabgan_models
from fairgen import objectives
from fairgen.objectives import losses

OPTIM = {"gen": {"name": "adam", "lr": 1e-3, "b1": 0.5, "b2": 0.9},
         "disc": {"name": "adam", "lr": 1e-3, "b1": 0.5, "b2": 0.9}}
SMALL = {"latent_dim": 8, "hidden": (32, 32), "critic_hidden": (32, 32)}


def _objective(spec, n_critic=2, lambda_fair=0.0, **model_kwargs):
  nets = tabgan_models.build_tabgan(spec, **{**SMALL, **model_kwargs})
  objective = objectives.build({"name": "tabgan", "n_critic": n_critic,
                                "lambda_fair": lambda_fair}, OPTIM, nets, spec)
  return nets, objective


def _train(objective, arrays, steps, batch_size, step=None, seed=0):
  state = jax.jit(objective.init)(jax.random.key(seed))
  step = step or jax.jit(objective.train_step)
  rng, n = np.random.default_rng(seed), len(arrays["label"])
  history = []
  for _ in range(steps):
    idx = rng.integers(0, n, batch_size * objective.examples_per_step)
    state, metrics = step(state, {k: v[idx] for k, v in arrays.items()}, jax.random.key(1))
    history.append({k: float(v) for k, v in metrics.items()})
  return state, history


def _decode(objective, state, n, seed=5):
  latents = objective.sample_latents(jax.random.key(seed), n)
  return np.asarray(jax.jit(objective.decode)(state, latents, jnp.zeros(n, jnp.int32)))


@pytest.fixture(scope="module")
def adult_run():
  """A small tabular GAN trained 10 steps on Adult (n_critic=2, fairness on)."""
  source = uci.adult("train")
  nets, objective = _objective(source.spec, lambda_fair=1.0, hard=True)
  step = jax.jit(objective.train_step)
  state, history = _train(objective, source.arrays, steps=10, batch_size=32, step=step)
  return types.SimpleNamespace(source=source, nets=nets, objective=objective, step=step,
                               state=state, history=history)


def test_train_steps_are_finite(adult_run):
  run = adult_run
  assert run.objective.examples_per_step == 2
  assert int(run.state["step"]) == 10
  expected = {"critic_loss", "wasserstein", "gp", "critic_grad_norm", "g_loss", "g_adv_loss",
              "fair_penalty", "dp_gap", "dp_gap_hard", "g_grad_norm"}
  assert set(run.history[0]) == expected
  assert all(np.isfinite(v) for m in run.history for v in m.values())


def test_decoded_rows_are_valid(adult_run):
  run, spec = adult_run, adult_run.source.spec
  rows = _decode(run.objective, run.state, 300)
  assert rows.shape == (300, spec.feature_dim + 4) and np.all(np.isfinite(rows))
  categorical, continuous = tabgan_models.row_blocks(spec)
  assert sum(w for _, w in categorical) + len(continuous) == rows.shape[1]
  for start, width in categorical:
    block = rows[:, start:start + width]
    assert np.all((block == 0) | (block == 1)) and np.all(block.sum(1) == 1)
  features, label, attr = tabgan_models.split_generated(spec, rows)
  assert features.shape == (300, spec.feature_dim) and features.dtype == np.float32
  assert label.dtype == np.int32 and attr.dtype == np.int32
  np.testing.assert_array_equal(label, rows[:, spec.feature_dim + 1])
  np.testing.assert_array_equal(attr, rows[:, spec.feature_dim + 3])
  # The decoded table maps back to valid categories.
  table = tabular.decode_rows(spec, features)
  assert set(table["workclass"]) <= set(spec.column("workclass").categories)


def test_sharded_step_matches_one_device(adult_run):
  run = adult_run
  mesh = parallel.make_mesh(-1)
  batch = run.source.get(np.arange(64))  # n_critic * 32, split over 8 devices.
  sharded = jax.jit(run.objective.train_step,
                    in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data")),
                                  NamedSharding(mesh, P())))
  _, m1 = run.step(run.state, batch, jax.random.key(2))
  _, m8 = sharded(run.state, batch, jax.random.key(2))
  for k in m1:
    np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-4, atol=1e-6, err_msg=k)


def test_gumbel_from_normal_is_gumbel():
  eps = jax.random.normal(jax.random.key(0), (100_000,))
  g = np.asarray(tabgan_models.gumbel_from_normal(eps))
  assert g.mean() == pytest.approx(np.euler_gamma, abs=0.01)
  assert g.var() == pytest.approx(np.pi**2 / 6, rel=0.03)
  # argmax(logits + Gumbel) samples softmax(logits).
  logits = np.array([0.0, 1.0, -1.0], np.float32)
  eps = jax.random.normal(jax.random.key(1), (30_000, 3))
  draws = np.argmax(logits + np.asarray(tabgan_models.gumbel_from_normal(eps)), axis=1)
  freq = np.bincount(draws, minlength=3) / len(draws)
  np.testing.assert_allclose(freq, np.exp(logits) / np.exp(logits).sum(), atol=0.015)


def test_soft_dp_gap():
  y = jnp.array([1.0, 0.0, 1.0, 1.0])
  s = jnp.array([0.0, 0.0, 1.0, 1.0])
  assert float(losses.soft_dp_gap(y, s)) == pytest.approx(0.5 - 1.0, abs=1e-5)
  assert float(losses.soft_dp_gap(y, jnp.ones(4))) == pytest.approx(-0.75, abs=1e-5)
  grad = jax.grad(lambda p: losses.soft_dp_gap(p, s))(y)
  assert np.all(np.isfinite(np.asarray(grad)))


TOY_SPEC = tabular.TabularSpec(
    name="toy", feature_dim=3, num_classes=2, num_groups=2, sensitive="s",
    privileged="s == 1", label_name="y == 1",
    columns=(tabular.Column("c0", tabular.CONTINUOUS, 0, 1),
             tabular.Column("cat", tabular.CATEGORICAL, 1, 2, ("a", "b"))))


def _toy(n, seed):
  """Label = attr 90% of the time: a DP gap of -0.8 in the real rows."""
  rng = np.random.default_rng(seed)
  s = (rng.random(n) < 0.5).astype(np.int32)
  y = np.where(rng.random(n) < 0.9, s, 1 - s).astype(np.int32)
  cat = rng.random(n) < 0.5
  features = np.stack([y + 0.3 * rng.normal(size=n), cat, ~cat], 1).astype(np.float32)
  return {"features": features, "label": y, "attr": s}


def test_fairness_penalty_closes_the_generated_dp_gap():
  data = _toy(4096, 0)
  gaps = {}
  for lambda_fair in (0.0, 5.0):
    _, objective = _objective(TOY_SPEC, lambda_fair=lambda_fair)
    state, history = _train(objective, data, steps=200, batch_size=128)
    assert all(np.isfinite(v) for m in history for v in m.values())
    _, label, attr = tabgan_models.split_generated(TOY_SPEC, _decode(objective, state, 2000))
    assert 0.2 < attr.mean() < 0.8
    gaps[lambda_fair] = label[attr == 0].mean() - label[attr == 1].mean()
  assert gaps[0.0] < -0.4, gaps  # The plain WGAN-GP reproduces the real gap (-0.8)...
  assert abs(gaps[5.0]) < 0.15, gaps  # ...the penalised one closes it.


def test_config_errors():
  with pytest.raises(config_lib.ConfigError, match="n_critc"):
    objectives.validate({"name": "tabgan", "n_critc": 2}, OPTIM)
  with pytest.raises(config_lib.ConfigError, match="optim.disc"):
    objectives.validate({"name": "tabgan"}, {"gen": OPTIM["gen"]})
  with pytest.raises(config_lib.ConfigError, match="objective.gp_weight must be >= 0"):
    objectives.validate({"name": "tabgan", "gp_weight": -1.0}, OPTIM)


AUDIT = ("sex", "race")  # Adult's intersectional audit groups: 2 x 5 values.


def test_tstr_evaluator(adult_run):
  """Binary-attribute metrics, and with audit groups (evaluation only: data.eval_options)
  the same probes' test predictions, the real and the synthetic labels over sex x race
  (the synthetic rows' sex from their generated attr, their race decoded)."""
  config = config_lib.base_config()
  config.data.name = "adult"
  config.data.eval_options = {"audit_groups": AUDIT}
  config.eval.num_samples = 500
  config.eval.batch_size = 256
  ctx = types.SimpleNamespace(
      config=config, cfg=config.eval, state=adult_run.state,
      real=evaluate.RealData(config), exp=types.SimpleNamespace(spec=adult_run.source.spec, objective=adult_run.objective))
  results = dict(tabular_eval.tstr(ctx))
  assert {k for k in results if "_groups_" not in k} == {
      "tstr_accuracy", "tstr_spd", "trtr_accuracy", "trtr_spd", "synthetic_spd", "real_spd",
      "marginal_tv", "marginal_w1"}
  assert all(np.isfinite(v) for k, v in results.items() if "_groups_" not in k), results
  assert results["trtr_accuracy"] > 0.8  # Logistic regression on Adult: ~0.85.
  y, a = adult_run.source.arrays["label"], adult_run.source.arrays["attr"]
  assert results["real_spd"] == pytest.approx(y[a == 0].mean() - y[a == 1].mean())
  # The fidelity numbers are those of the evaluator's own rows: the same seed draws them again.
  rows = tabular_eval.generate_rows(ctx, 500)
  features, label, attr = tabgan_models.split_generated(adult_run.source.spec, rows)
  assert results["synthetic_spd"] == pytest.approx(
      label[attr == 0].mean() - label[attr == 1].mean())
  spec, real = adult_run.source.spec, adult_run.source.arrays["features"]
  expected = _hand_marginals(spec, features, real)
  assert results["marginal_tv"] == pytest.approx(expected[0], rel=1e-6)
  assert results["marginal_w1"] == pytest.approx(expected[1], rel=1e-6)
  # A table against itself is at distance 0.
  same = tabular_eval.marginal_distances(spec, real, real)
  assert same["marginal_tv"] == 0 and same["marginal_w1"] == 0
  _check_tstr_groups(results, features, label, attr, adult_run.source.spec, config.eval.seed)


def _check_tstr_groups(results, features, label, attr, spec, seed):
  test, train = uci.adult("test", audit_groups=AUDIT), uci.adult("train", audit_groups=AUDIT)
  groups, priv = test.spec.audit_groups, test.spec.audit_privileged
  assert len(groups) == 10 and groups[priv] == ("Male", "White")
  te, tr = test.arrays, train.arrays
  for prefix, (x, y) in (("tstr", (features, label)), ("trtr", (tr["features"], tr["label"]))):
    pred = tabular_eval.fit_probe(x, y, seed).predict(te["features"])
    expected = fairness.multigroup_report(te["label"], pred, te["groups"], len(groups), priv)
    for key, value in expected.items():
      assert results[f"{prefix}_groups_{key}"] == pytest.approx(value, nan_ok=True), key
  # The tables' own labels: selection rates only, and SPD against (Male, White).
  race = tabular.decode_rows(spec, features)["race"]
  sex = np.where(attr == 1, "Male", "Female")
  for prefix, rows in (("real", (tr["label"], tr["groups"])),
                       ("synthetic", (label, [groups.index((a, b)) if (a, b) in groups else -1
                                              for a, b in zip(sex, race)]))):
    y, g = np.asarray(rows[0]), np.asarray(rows[1])
    rate = {i: y[g == i].mean() if np.any(g == i) else np.nan for i in range(len(groups))}
    for i in range(len(groups)):
      assert results[f"{prefix}_groups_n_{i}"] == np.sum(g == i)
      assert results[f"{prefix}_groups_selection_rate_{i}"] == pytest.approx(rate[i], nan_ok=True)
      assert f"{prefix}_groups_tpr_{i}" not in results
      if i != priv:
        assert results[f"{prefix}_groups_statistical_parity_difference_{i}"] == pytest.approx(
            rate[i] - rate[priv], nan_ok=True)
  assert 0 < np.mean(attr) < 1  # Both sexes generated: the mapping from attr is exercised.


def _hand_marginals(spec, synthetic, real):
  """Mean TV over categorical and mean W1 over continuous columns, by sorting quantiles."""
  syn, ref = tabular.decode_rows(spec, synthetic), tabular.decode_rows(spec, real)
  tv, w1 = [], []
  for col in spec.columns:
    a, b = np.asarray(syn[col.name]), np.asarray(ref[col.name])
    if col.kind == tabular.CATEGORICAL:
      tv.append(sum(abs(np.mean(a == c) - np.mean(b == c)) for c in col.categories) / 2)
    else:  # W1 of two empirical distributions: the integral of |F_a - F_b|.
      grid = np.sort(np.concatenate([a, b]))
      fa = np.searchsorted(np.sort(a), grid[:-1], side="right") / len(a)
      fb = np.searchsorted(np.sort(b), grid[:-1], side="right") / len(b)
      w1.append(np.sum(np.abs(fa - fb) * np.diff(grid)))
  return np.mean(tv), np.mean(w1)
