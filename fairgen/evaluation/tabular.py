"""Evaluators for tabular fairness models: fair classifiers, representations and row generators.

Each is a function ``(ctx) -> iterable of (name, value)`` reading ``ctx.config`` (its
``data`` section names the splits), ``ctx.cfg`` (the ``eval`` section: ``num_samples``,
``batch_size``, ``seed``), ``ctx.exp.spec``, ``ctx.exp.objective`` and ``ctx.state``.

- ``classification_fairness``: accuracy and group fairness (SPD, EOD, AOD, ...) of a
  fair classifier's decisions on the held-out split;
- ``vfae_probe``: how much of y and of s a linear probe recovers from a VFAE's
  representation (posterior mean of z1), and its reconstruction error.
- ``tstr``: train-on-synthetic, test-on-real (Esteban et al. 2017) for row generators,
  with fairness and marginal fidelity of the synthetic table, and the train-on-real
  reference.

Each also reports k-way or intersectional fairness where the eval split has a ``groups``
array (e.g. Adult's ``data.options.audit_groups=('sex', 'race')``): ``..._groups_<metric>``,
``fairgen.metrics.fairness.multigroup_report`` over those groups, against
``spec.audit_privileged``, beside the binary attribute's metrics.

The probes are scikit-learn ``LogisticRegression`` (lbfgs, ``max_iter=1000``). When the
training labels of a probe have a single class, it predicts that class.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from fairgen import data
from fairgen import experiment
from fairgen import parallel
from fairgen.evaluation.context import EvalContext, EvalError, Scalars
from fairgen.evaluation.registry import EVALUATORS, Entry
from fairgen.data import tabular
from fairgen.metrics import fairness
from fairgen.models import tabgan as tabgan_models
from fairgen.models.vfae import VFAE
from fairgen.objectives import vfae as vfae_objective


def fit_probe(x: np.ndarray, y: np.ndarray, seed: int = 0) -> Any:
  """A logistic-regression probe (a constant one when ``y`` has a single class)."""
  # Imported here: scikit-learn takes ~0.6 s to import, in every process that trains.
  from sklearn import dummy, linear_model  # pylint: disable=g-import-not-at-top
  if len(np.unique(y)) < 2:
    return dummy.DummyClassifier(strategy="most_frequent").fit(x, y)
  return linear_model.LogisticRegression(max_iter=1000, random_state=seed).fit(x, y)


def _splits(ctx: EvalContext) -> tuple[tabular.TabularSource, tabular.TabularSource]:
  # The train split as the held-out one is loaded (with data.eval_options, e.g. audit groups).
  train = data.load(ctx.config.data, ctx.config.data.split, ctx.config.data.get("eval_options"))
  test = ctx.real.source  # The held-out split, loaded once per run.
  if not isinstance(train, tabular.TabularSource):
    raise EvalError(f"Tabular evaluators need a tabular dataset, got "
                      f"data.name={ctx.config.data.name!r}.")
  return train, test


# multigroup_report's metrics that need no true labels: selection rates and their ratios.
_SELECTION_METRICS = ("n_", "selection_rate_", "demographic_parity_",
                      "statistical_parity_difference", "disparate_impact",
                      "worst_statistical_parity_difference", "worst_disparate_impact")


def group_report(prefix: str, y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray,
                 spec: tabular.TabularSpec, selection_only: bool = False) -> Scalars:
  """``multigroup_report`` over the spec's audit groups as ``{prefix}groups_<metric>``.

  Args:
    prefix: the name prefix, e.g. ``'tstr_'``.
    y_true: true labels ``[n]``.
    y_pred: decisions ``[n]`` (0/1).
    groups: audit-group ids ``[n]``; rows with id -1 (a combination that no real row has)
      are left out.
    spec: the spec whose ``audit_groups`` and ``audit_privileged`` name the groups.
    selection_only: only the selection-rate metrics (group sizes, selection rates,
      demographic parity, SPD and disparate impact against the privileged group): for a
      table's own labels (``y_pred = y_true``), whose error rates say nothing.
  """
  keep = np.asarray(groups) >= 0
  report = fairness.multigroup_report(
      np.asarray(y_true)[keep], np.asarray(y_pred)[keep], np.asarray(groups)[keep],
      len(spec.audit_groups),
      privileged=spec.audit_privileged if spec.audit_privileged >= 0 else None)
  for key, value in report.items():
    if not selection_only or key.startswith(_SELECTION_METRICS):
      yield f"{prefix}groups_{key}", value


def generated_groups(spec: tabular.TabularSpec, features: np.ndarray,
                     attr: np.ndarray) -> np.ndarray | None:
  """Audit-group ids of generated rows (-1: a combination no real row has), or None.

  Each audit column is read from the decoded features, or, for the binary sensitive
  attribute (which the features leave out), from the generated ``attr`` (1: the privileged
  group's value). None when the rows do not determine the groups (no audit groups, or an
  audit column that is neither, e.g. 5-valued race with ``sensitive='race'``).
  """
  if not spec.audit_groups:
    return None
  table = tabular.decode_rows(spec, features)
  columns = []
  for i, name in enumerate(spec.audit_columns):
    if name in table:
      columns.append(np.asarray(table[name]).astype(str))
      continue
    values = sorted({g[i] for g in spec.audit_groups})
    if name != spec.sensitive or len(values) != 2 or spec.audit_privileged < 0:
      return None
    privileged = spec.audit_groups[spec.audit_privileged][i]
    other = values[1 - values.index(privileged)]
    columns.append(np.where(np.asarray(attr) == 1, privileged, other))
  index = {g: i for i, g in enumerate(spec.audit_groups)}
  return np.array([index.get(tuple(row), -1) for row in zip(*columns)], np.int32)


def vfae_probe(ctx: EvalContext) -> Scalars:
  """Linear probes on the VFAE representation of train rows, scored on test rows.

  Yields:
    ``probe_y_accuracy`` (test accuracy of the y-probe: high is good),
    ``probe_y_spd`` (statistical parity difference of its test predictions),
    ``probe_s_accuracy`` (of the s-probe: near ``s_majority_rate`` is good, i.e. z1
    carries no usable information about s), ``s_majority_rate`` (the test split's
    majority-group share) and ``recon`` (mean reconstruction NLL of test rows from the
    posterior mean, nats per row). With audit groups, also ``probe_y_groups_<metric>``
    (the y-probe's test predictions over them, see :func:`group_report`),
    ``probe_groups_accuracy`` (a multinomial probe for the group id from z1) and
    ``groups_majority_rate`` (the largest group's test share: what z1 should not beat).
  """
  modules = experiment.build_model(ctx.config, ctx.exp.spec)
  if not isinstance(modules, VFAE):
    raise EvalError("The 'vfae_probe' evaluator needs a VFAE (model.name='vfae').")
  state = {"params": ctx.state["params"]}
  train, test = _splits(ctx)
  bs = ctx.cfg.batch_size
  encode = jax.jit(functools.partial(vfae_objective.encode_representation, modules=modules))
  recon = jax.jit(functools.partial(vfae_objective.reconstruction_error, modules=modules))
  z = {}
  for name, split in (("train", train), ("test", test)):
    a = split.arrays
    z[name] = parallel.map_in_chunks(lambda x, s: encode(state, x, s),
                                     (a["features"], a["attr"]), bs)
  tr, te = train.arrays, test.arrays
  y_probe = fit_probe(z["train"], tr["label"], ctx.cfg.seed)
  s_probe = fit_probe(z["train"], tr["attr"], ctx.cfg.seed)
  y_pred = y_probe.predict(z["test"])
  yield "probe_y_accuracy", fairness.accuracy(te["label"], y_pred)
  yield "probe_y_spd", fairness.statistical_parity_difference(y_pred, te["attr"])
  yield "probe_s_accuracy", fairness.accuracy(te["attr"], s_probe.predict(z["test"]))
  share = float(np.mean(te["attr"]))
  yield "s_majority_rate", max(share, 1.0 - share)
  if "groups" in te:
    yield from group_report("probe_y_", te["label"], y_pred, te["groups"], test.spec)
    g_probe = fit_probe(z["train"], tr["groups"], ctx.cfg.seed)
    yield "probe_groups_accuracy", float(np.mean(g_probe.predict(z["test"]) == te["groups"]))
    yield "groups_majority_rate", float(np.bincount(te["groups"]).max() / len(te["groups"]))
  nll = parallel.map_in_chunks(lambda x, s: recon(state, x, s), (te["features"], te["attr"]), bs)
  yield "recon", float(np.mean(nll))


def generate_rows(ctx: EvalContext, num: int) -> np.ndarray:
  """``num`` rows from the objective's prior latents (seed ``ctx.cfg.seed``)."""
  objective = ctx.exp.objective
  if objective.decode is None:
    raise EvalError("The 'tstr' evaluator needs a row generator (e.g. objective 'tabgan').")
  latents = np.asarray(objective.sample_latents(jax.random.key(ctx.cfg.seed), num))
  labels = np.zeros(num, np.int32)
  decode = jax.jit(objective.decode)
  return parallel.map_in_chunks(lambda z, y: decode(ctx.state, z, y), (latents, labels),
                                ctx.cfg.batch_size)


def marginal_distances(spec: tabular.TabularSpec, synthetic: np.ndarray,
                       real: np.ndarray) -> dict[str, float]:
  """Mean per-column marginal distances between two encoded tables.

  Returns:
    ``marginal_tv``: the mean over categorical columns of the total variation distance
    between category frequencies; ``marginal_w1``: the mean over continuous columns of the
    Wasserstein-1 distance in original units (so columns with large ranges dominate).
    NaN where the spec has no column of the kind.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top  (~0.6 s; see fit_probe)
  syn, ref = tabular.decode_rows(spec, synthetic), tabular.decode_rows(spec, real)
  tv, w1 = [], []
  for col in spec.columns:
    if col.kind == tabular.CATEGORICAL:
      p = np.array([np.mean(syn[col.name] == c) for c in col.categories])
      q = np.array([np.mean(ref[col.name] == c) for c in col.categories])
      tv.append(0.5 * np.abs(p - q).sum())
    else:
      w1.append(stats.wasserstein_distance(syn[col.name], ref[col.name]))
  return {"marginal_tv": float(np.mean(tv)) if tv else float("nan"),
          "marginal_w1": float(np.mean(w1)) if w1 else float("nan")}


def tstr(ctx: EvalContext) -> Scalars:
  """Train on synthetic rows, test on real ones; fairness and fidelity of the synthetic data.

  Draws ``ctx.cfg.num_samples`` rows, fits a logistic-regression probe (features -> label)
  on them and scores it on the real ``data.eval_split``; the same probe fitted on the real
  ``data.split`` is the train-on-real reference.

  Yields:
    ``tstr_accuracy``, ``tstr_spd`` (SPD of its predictions on the real test rows, grouped
    by their real attribute), ``trtr_accuracy``, ``trtr_spd``, ``synthetic_spd`` (the
    synthetic label's SPD w.r.t. the synthetic attribute; NaN if a group was never
    generated), ``real_spd`` (the same on the real train split), ``marginal_tv`` and
    ``marginal_w1`` (see :func:`marginal_distances`; against the real train split).
    With audit groups (see :func:`group_report`): ``tstr_groups_<metric>`` and
    ``trtr_groups_<metric>`` (the probes' test predictions over them),
    ``real_groups_<metric>`` (the real train labels' selection rates over them) and,
    where the generated rows determine their groups (:func:`generated_groups`),
    ``synthetic_groups_<metric>`` (the synthetic labels').
  """
  spec = ctx.exp.spec
  train, test = _splits(ctx)
  rows = generate_rows(ctx, int(ctx.cfg.num_samples))
  features, label, attr = tabgan_models.split_generated(spec, rows)
  tr, te = train.arrays, test.arrays
  for prefix, (x, y) in (("tstr", (features, label)), ("trtr", (tr["features"], tr["label"]))):
    pred = fit_probe(x, y, ctx.cfg.seed).predict(te["features"])
    yield f"{prefix}_accuracy", fairness.accuracy(te["label"], pred)
    yield f"{prefix}_spd", fairness.statistical_parity_difference(pred, te["attr"])
    if "groups" in te:
      yield from group_report(f"{prefix}_", te["label"], pred, te["groups"], test.spec)
  yield "synthetic_spd", fairness.statistical_parity_difference(label, attr)
  yield "real_spd", fairness.statistical_parity_difference(tr["label"], tr["attr"])
  if "groups" in te:
    yield from group_report("real_", tr["label"], tr["label"], tr["groups"], test.spec,
                            selection_only=True)
    groups = generated_groups(test.spec, features, attr)
    if groups is not None:
      yield from group_report("synthetic_", label, label, groups, test.spec,
                              selection_only=True)
  yield from marginal_distances(spec, features, tr["features"]).items()


def classification_fairness(ctx: EvalContext) -> Scalars:
  """Accuracy and group-fairness of a classifier's decisions (P(y=1) > 0.5) on the eval split.

  AIF360 sign conventions (unprivileged minus privileged; attr 1 is privileged), see
  ``fairgen/metrics/fairness.py``. Where the split has k-way or intersectional ``groups``
  (e.g. Adult's ``audit_groups=('sex', 'race')``), also ``groups_<metric>``: the
  ``multigroup_report`` over them, against ``spec.audit_privileged``.
  """
  predict = ctx.exp.objective.predict
  if predict is None:
    raise EvalError(f"The 'classification_fairness' evaluator needs an objective that "
                    f"trains a classifier; {ctx.config.objective.name!r} does not.")
  source = ctx.real.source
  fn = jax.jit(predict)
  probs, columns = [], {"label": [], "attr": [], "groups": []}
  for start in range(0, len(source), ctx.cfg.batch_size):
    batch = source.get(np.arange(start, min(start + ctx.cfg.batch_size, len(source))))
    probs.append(np.asarray(fn(ctx.state, {k: batch[k] for k in ("features", "attr")})))
    for key, values in columns.items():
      if key in batch:
        values.append(batch[key])
  y_pred = (np.concatenate(probs) > 0.5).astype(np.int32)
  y_true = np.concatenate(columns["label"])
  yield from fairness.classification_report(y_true, y_pred,
                                            np.concatenate(columns["attr"])).items()
  if columns["groups"]:
    yield from group_report("", y_true, y_pred, np.concatenate(columns["groups"]), source.spec)


EVALUATORS.register("classification_fairness")(Entry(classification_fairness))
EVALUATORS.register("vfae_probe")(Entry(vfae_probe))
EVALUATORS.register("tstr")(Entry(tstr))
