"""VFAE: training on Adult, shapes, sharding, the MMD penalty's effect, the probe evaluator."""

import functools
import types

import jax
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
from fairgen.metrics import mmd
from fairgen.models import vfae as vfae_models
from fairgen import objectives
from fairgen.objectives import vfae

OPTIM = {"name": "adam", "lr": 3e-3}


def _objective(spec, mmd_weight=1.0, **model_kwargs):
  model = vfae_models.build_vfae(spec, **{"latent_dim": 8, "hidden": (32,), **model_kwargs})
  return model, objectives.build({"name": "vfae", "mmd_weight": mmd_weight}, OPTIM, model, spec)


def _train(objective, arrays, steps, batch_size, seed=0, step=None):
  state = jax.jit(objective.init)(jax.random.key(seed))
  step = step or jax.jit(objective.train_step)
  rng, n = np.random.default_rng(seed), len(arrays["label"])
  history = []
  for _ in range(steps):
    idx = rng.integers(0, n, batch_size)
    state, metrics = step(state, {k: v[idx] for k, v in arrays.items()}, jax.random.key(1))
    history.append({k: float(v) for k, v in metrics.items()})
  return state, history


@pytest.fixture(scope="module")
def adult_run():
  """A hierarchical VFAE trained 40 steps on Adult, and its jitted step."""
  source = uci.adult("train")
  model, objective = _objective(source.spec, hierarchical=True)
  step = jax.jit(objective.train_step)
  state, history = _train(objective, source.arrays, steps=40, batch_size=64, step=step)
  return types.SimpleNamespace(source=source, model=model, objective=objective, step=step,
                               state=state, history=history)


def test_adult_training_decreases_the_loss(adult_run):
  run = adult_run
  history = run.history
  assert all(np.isfinite(v) for m in history for v in m.values())
  assert {"loss", "recon", "kl", "label_nll", "mmd", "grad_norm"} <= set(history[0])
  first = np.mean([m["loss"] for m in history[:5]])
  last = np.mean([m["loss"] for m in history[-5:]])
  assert last < 0.8 * first
  assert int(run.state["step"]) == 40
  batch = run.source.get(np.arange(10))
  probs = run.objective.predict(run.state, batch)
  assert probs.shape == (10,) and np.all((probs >= 0) & (probs <= 1))
  z = vfae.encode_representation(run.state, batch["features"], batch["attr"],
                                 modules=run.model)
  assert z.shape == (10, 8)
  recon = vfae.reconstruction_error(run.state, batch["features"], batch["attr"],
                                    modules=run.model)
  assert recon.shape == (10,) and np.all(np.isfinite(recon))


def test_reconstruction_nll_matches_a_hand_computation():
  rng = np.random.default_rng(0)
  x = np.array([[0.0, 1.0, 0.0, 0.5], [1.0, 0.0, 0.0, -1.0]], np.float32)
  out = rng.normal(size=x.shape).astype(np.float32)
  got = np.asarray(vfae_models.reconstruction_nll(x, out, ((0, 3),), (3,)))
  logits = out[:, :3]
  log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  expected = (-(x[:, :3] * log_softmax).sum(1)
              + 0.5 * (x[:, 3] - out[:, 3])**2 + 0.5 * np.log(2 * np.pi))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_hierarchical_and_sharded_step_matches_one_device(adult_run):
  run = adult_run
  assert all(np.isfinite(v) for m in run.history for v in m.values())
  batch = run.source.get(np.arange(64))
  rng = jax.random.key(3)
  mesh = parallel.make_mesh(-1)
  assert mesh.shape[parallel.DATA_AXIS] == 8
  sharded = jax.jit(run.objective.train_step,
                    in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data")),
                                  NamedSharding(mesh, P())))
  _, m1 = run.step(run.state, batch, rng)
  _, m8 = sharded(run.state, batch, rng)
  for k in m1:
    np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-4, err_msg=k)


def _toy(n, seed):
  """s is strongly encoded in x (a continuous and a categorical column), and y leans on s."""
  rng = np.random.default_rng(seed)
  s = (rng.random(n) < 0.5).astype(np.int32)
  c0 = 2.0 * s - 1.0 + 0.3 * rng.normal(size=n)
  c1 = rng.normal(size=n)
  cat = np.where(rng.random(n) < 0.9, s, 1 - s)
  features = np.stack([c0, c1, cat == 0, cat == 1], 1).astype(np.float32)
  label = (c1 + (2 * s - 1) > 0).astype(np.int32)
  return {"features": features, "label": label, "attr": s}


TOY_SPEC = tabular.TabularSpec(
    name="toy", feature_dim=4, num_classes=2, num_groups=2, sensitive="s",
    privileged="s == 1", label_name="y == 1",
    columns=(tabular.Column("c0", tabular.CONTINUOUS, 0, 1),
             tabular.Column("c1", tabular.CONTINUOUS, 1, 1),
             tabular.Column("cat", tabular.CATEGORICAL, 2, 2, ("a", "b"))))


def test_mmd_penalty_removes_group_separation():
  train, test = _toy(2000, 0), _toy(1000, 1)
  separation = {}
  for weight in (0.0, 10.0):
    model, objective = _objective(TOY_SPEC, mmd_weight=weight, latent_dim=4)
    state, history = _train(objective, train, steps=120, batch_size=128)
    assert all(np.isfinite(v) for m in history for v in m.values())
    z = np.asarray(vfae.encode_representation(state, test["features"], test["attr"],
                                              modules=model))
    separation[weight] = float(mmd.masked_mmd2(z, test["attr"], mmd.median_bandwidth(z)))
  assert separation[10.0] < 0.5 * separation[0.0], separation


def test_unknown_objective_key_raises():
  with pytest.raises(config_lib.ConfigError, match="mmd_wieght"):
    objectives.validate({"name": "vfae", "mmd_wieght": 1.0}, OPTIM)


def test_vfae_probe_evaluator(adult_run):
  """The probes, and with audit groups (sex x race, evaluation only) the y-probe's decisions
  over them and a probe for the group id from z1."""
  config = config_lib.base_config()
  config.data.name = "adult"
  config.data.eval_options = {"audit_groups": ("sex", "race")}
  config.model = {"name": "vfae", "latent_dim": 8, "hidden": (32,), "hierarchical": True}
  config.eval.batch_size = 4096
  ctx = types.SimpleNamespace(
      config=config, cfg=config.eval, state=adult_run.state,
      real=evaluate.RealData(config), exp=types.SimpleNamespace(spec=adult_run.source.spec, objective=adult_run.objective))
  results = dict(tabular_eval.vfae_probe(ctx))
  assert {k for k in results if not k.startswith("probe_y_groups_")} == {
      "probe_y_accuracy", "probe_y_spd", "probe_s_accuracy", "s_majority_rate", "recon",
      "probe_groups_accuracy", "groups_majority_rate"}
  assert all(np.isfinite(v) for k, v in results.items() if "_groups_" not in k), results
  # The group metrics are those of the same probes, refitted here on the posterior means.
  test, train = (uci.adult(s, audit_groups=("sex", "race")) for s in ("test", "train"))
  encode = jax.jit(functools.partial(vfae.encode_representation, modules=adult_run.model))
  params = {"params": adult_run.state["params"]}
  z = {name: parallel.map_in_chunks(lambda x, s: encode(params, x, s),
                                    (split.arrays["features"], split.arrays["attr"]),
                                    config.eval.batch_size)
       for name, split in (("train", train), ("test", test))}
  te, tr, spec = test.arrays, train.arrays, test.spec
  y_pred = tabular_eval.fit_probe(z["train"], tr["label"], config.eval.seed).predict(z["test"])
  report = fairness.multigroup_report(te["label"], y_pred, te["groups"], 10,
                                      spec.audit_privileged)
  for key, value in report.items():
    assert results[f"probe_y_groups_{key}"] == pytest.approx(value, rel=1e-6, nan_ok=True), key
  g_pred = tabular_eval.fit_probe(z["train"], tr["groups"], config.eval.seed).predict(z["test"])
  assert len(np.unique(g_pred)) > 1
  assert results["probe_groups_accuracy"] == pytest.approx(np.mean(g_pred == te["groups"]))
  assert results["groups_majority_rate"] == pytest.approx(
      np.max(np.bincount(te["groups"])) / len(te["groups"]))
  test = uci.adult("test").arrays
  share = float(np.mean(test["attr"]))
  assert results["s_majority_rate"] == pytest.approx(max(share, 1.0 - share))
  # The representation keeps what predicts y: the probe beats the majority label (0.754).
  y_share = float(np.mean(test["label"]))
  assert results["probe_y_accuracy"] > max(y_share, 1.0 - y_share) + 0.02, results
