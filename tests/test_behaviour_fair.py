"""Behaviour of the fairness mitigations: tests that fail when a mitigation stops working.

The other fairness tests (``test_fair.py``, ``test_debias.py``) check that every method
trains and yields finite numbers; these check that each method does what it claims:

- importance weights reach only the discriminator's real-data loss (the VAE's ELBO),
  self-normalised per batch, in the real jitted step;
- resampled batches reach ``fair.target`` through the real loader;
- the group-conditional generator uses its group label (and an out-of-range group label
  is an error, not a silently clamped or NaN embedding);
- the penalty changes the generator's update and nothing else;
- the penalty is the config's weight times its divergence from the config's target;
- short importance-weighted and resampled runs generate the minority group more often than
  the baseline; adversarial debiasing lowers |SPD| and |EOD| on Adult.

Every config is shrunk to one device (``mesh.data=1``): none of these is about sharding.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from fairgen import data
from fairgen import experiment
from fairgen import fairness as fair
from fairgen import parallel
from fairgen import sampling
from fairgen import train
from fairgen.classifiers import backbones
from fairgen.classifiers import fit
from fairgen.fairness import importance
from fairgen.metrics import fairness
from fairgen.objectives import vae as vae_objective

ONE_DEVICE = {"mesh.data": 1, "eval.every_steps": 0}


def mnist_config(arg, **overrides):
  """``experiments/fair_mnist.py:<arg>,attribute=color,smoke`` on one device."""
  return load_config("fair_mnist", f"{arg},attribute=color,smoke", **{**ONE_DEVICE,
                                                                        **overrides})


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
  """A tiny attribute classifier for the colour variant (as in test_fair.py)."""
  root = tmp_path_factory.mktemp("classifiers")
  options = {"attribute": "color", "subset": "balanced"}
  train_src = data.load({"name": "biased_mnist", "options": options}, "train")
  test_src = data.load({"name": "biased_mnist", "options": options}, "test")
  params, info = fit.train_classifier(
      train_src, test_src, label_key="attr", num_classes=2, steps=40, batch_size=32, width=8,
      feature_dim=16)
  path = backbones.save_classifier(str(root / "attr"), params, info)
  return {"attr": path, "attr_accuracy": info["test_accuracy"]}


def first_batch(exp, source, sampler=None):
  """The step-0 batch of the real loader (host NumPy arrays)."""
  loader = data.Loader(source, exp.global_batch, exp.config.seed,
                       parallel.data_sharding(exp.mesh), 0, 1, sampler=sampler)
  try:
    _, batch = next(iter(loader))
  finally:
    loader.close()
  return {k: np.asarray(v) for k, v in batch.items()}


def initial_state(exp):
  """The run's initial state (objective state plus the loop's guard), as host arrays.

  Host arrays: every step below starts from a fresh copy (the step donates its input) and
  sees the same argument types, so the step compiles once.
  """
  return jax.device_get(experiment.init_state(exp))


def run_step(step_fn, exp, state, batch):
  """One real (jitted, guarded) training step from a copy of ``state``; host outputs."""
  state = jax.tree.map(np.array, state)  # The step donates its input.
  new_state, metrics = step_fn(state, batch, exp.step_rng)
  return jax.device_get(new_state), {k: float(v) for k, v in jax.device_get(metrics).items()}


def non_uniform_weights(n, seed=0):
  """Log-uniform weights in [0.1, 10] in a seeded order."""
  return np.exp(np.random.default_rng(seed).uniform(np.log(0.1), np.log(10.0), n)
                ).astype(np.float32)


def assert_trees_close(a, b, **kwargs):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kwargs)


# --- 1. Importance weights: the discriminator's real loss (GAN), the ELBO (VAE). ---------


@pytest.fixture(scope="module")
def dcgan_state():
  """The initial state of the unconditional smoke DCGAN (importance, penalty: same model)."""
  return initial_state(experiment.setup(mnist_config("method=baseline")))


def check_state_fits(state, exp):
  """``state`` has the tree, shapes and dtypes of ``exp``'s state."""
  assert jax.tree.structure(state) == jax.tree.structure(exp.abstract_state)
  for x, a in zip(jax.tree.leaves(state), jax.tree.leaves(exp.abstract_state)):
    assert (x.shape, x.dtype) == (a.shape, a.dtype)


def test_importance_weights_reach_only_the_real_discriminator_loss(dcgan_state, tmp_path):
  """One real GAN step (n_disc=1) against a hand computation of its losses:
  d_loss = sum(w * softplus(-D(x))) / sum(w) + mean(softplus(D(G(z)))),
  g_loss = mean(softplus(-D'(G(z')))) at the updated D', whatever the weights."""
  c = mnist_config("method=importance")
  source = data.load(c.data, "train")
  exp = experiment.setup(c, source.spec)
  assert exp.objective.examples_per_step == 1  # n_disc=1: one real batch per step.
  check_state_fits(dcgan_state, exp)
  b = exp.global_batch
  # Known, very non-uniform weights where fair.prepare keeps the fitted ones (a resumed run
  # reads them back instead of fitting the density ratio again).
  weights = non_uniform_weights(len(source))
  (tmp_path / importance.RATIO_DIR).mkdir()
  np.save(tmp_path / importance.RATIO_DIR / "weights.npy", weights)
  weighted, sampler = fair.prepare(c, source, str(tmp_path), b)
  assert sampler is None
  batch = first_batch(exp, weighted)
  assert "weight" in batch, sorted(batch)
  rows = data.IndexSampler(len(weighted), b, c.seed).indices(0)
  np.testing.assert_array_equal(batch["weight"], weights[rows])  # The loader carries them.
  w = batch["weight"]
  assert w.max() > 5 * w.min()

  step = train.make_train_step(exp)
  state = dcgan_state
  runs = {name: run_step(step, exp, state, {**batch, "weight": weight}) for name, weight in
          (("w", w), ("4w", 4.0 * w), ("uniform", np.ones(b, np.float32)))}
  m, m_scaled, m_uniform = (runs[k][1] for k in ("w", "4w", "uniform"))
  assert m["finite"] == 1.0

  # The losses by hand, with the models' apply functions and gan.py's rng derivation.
  nets = experiment.build_model(c, exp.spec)
  G, D = nets.generator, nets.discriminator
  rng = jax.random.fold_in(exp.step_rng, 0)  # state['step'] == 0
  r_z, r_real, r_fake = jax.random.split(jax.random.fold_in(rng, 0), 3)  # D step i = 0
  r_z2, r_drop = jax.random.split(jax.random.fold_in(rng, 1))  # G step, after n_disc = 1
  y = batch["label"]  # Unconditional: the labels are passed and ignored.

  @jax.jit
  def reference(gen, d_params, new_d_params):
    g_vars = {"params": gen["params"], "batch_stats": gen["batch_stats"]}
    fake, _ = G.apply(g_vars, jax.random.normal(r_z, (b, nets.latent_dim)), y, train=True,
                      mutable=["batch_stats"])
    real_logits = D.apply({"params": d_params}, batch["image"], y, train=True,
                          rngs={"dropout": r_real})
    fake_logits = D.apply({"params": d_params}, fake, y, train=True, rngs={"dropout": r_fake})
    fake2, _ = G.apply(g_vars, jax.random.normal(r_z2, (b, nets.latent_dim)), y, train=True,
                       mutable=["batch_stats"])
    g_logits = D.apply({"params": new_d_params}, fake2, y, train=True, rngs={"dropout": r_drop})
    return (jax.nn.softplus(-real_logits), jnp.mean(jax.nn.softplus(fake_logits)),
            jnp.mean(jax.nn.softplus(-g_logits)))

  def expected(name, weight):
    real_loss, fake_term, g_loss = (np.asarray(v, np.float64) for v in reference(
        state["gen"], state["disc"]["params"], runs[name][0]["disc"]["params"]))
    return float(np.sum(weight * real_loss) / np.sum(weight) + fake_term), float(g_loss)

  d_loss, g_loss = expected("w", w)
  np.testing.assert_allclose(m["d_loss"], d_loss, rtol=1e-5)
  d_loss_uniform, g_loss_uniform = expected("uniform", np.ones(b))
  np.testing.assert_allclose(m_uniform["d_loss"], d_loss_uniform, rtol=1e-5)
  # The weights matter (far beyond the tolerance above)...
  assert abs(m["d_loss"] - m_uniform["d_loss"]) > 1e-3, (m["d_loss"], m_uniform["d_loss"])
  # ... only up to scale (self-normalised per batch) ...
  for key in ("d_loss", "g_loss", "d_grad_norm", "g_grad_norm", "d_real", "d_fake"):
    np.testing.assert_allclose(m_scaled[key], m[key], rtol=1e-6, err_msg=key)
  assert_trees_close(runs["4w"][0], runs["w"][0], rtol=1e-5, atol=1e-7)
  # ... and never in the generator's loss: at the D the step produced, it is the plain
  # mean of -log D(G(z)), whatever the weights.
  np.testing.assert_allclose(m["g_loss"], g_loss, rtol=1e-5)
  np.testing.assert_allclose(m_uniform["g_loss"], g_loss_uniform, rtol=1e-5)


def test_importance_weights_make_the_vae_loss_a_weighted_elbo():
  """One real VAE step: loss = sum(w * negative ELBO) / sum(w), per_example_loss's terms."""
  c = mnist_config("method=importance,model=vae")
  source = data.load(c.data, "train")
  exp = experiment.setup(c, source.spec)
  weighted = data.SubsetSource(source, columns={"weight": np.ones(len(source), np.float32)})
  batch = first_batch(exp, weighted)
  b = exp.global_batch
  w = non_uniform_weights(b, seed=1)
  state = initial_state(exp)
  step = train.make_train_step(exp)
  _, m = run_step(step, exp, state, {**batch, "weight": w})
  _, m_scaled = run_step(step, exp, state, {**batch, "weight": 4.0 * w})
  _, m_uniform = run_step(step, exp, state, {**batch, "weight": np.ones(b, np.float32)})

  model = experiment.build_model(c, exp.spec)
  terms = vae_objective.per_example_loss(model, state["params"], batch["image"],
                                         jax.random.fold_in(exp.step_rng, 0),
                                         float(c.objective.beta))
  per_example = np.asarray(terms["loss"], np.float64)
  np.testing.assert_allclose(m["loss"], np.sum(w * per_example) / np.sum(w), rtol=1e-5)
  np.testing.assert_allclose(m_uniform["loss"], np.mean(per_example), rtol=1e-5)
  # The weights matter (far beyond the tolerance above), but only up to scale.
  assert abs(m["loss"] - m_uniform["loss"]) > 1e-3 * abs(m_uniform["loss"])
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(m_scaled[key], m[key], rtol=1e-6, err_msg=key)
  # The logged recon/KL stay plain means (diagnostics of the unweighted batch).
  np.testing.assert_allclose(m["recon"], np.mean(np.asarray(terms["recon"])), rtol=1e-5)


# --- 2. Resampling: the real loader's batches follow fair.target. -----------------------


def loader_group_share(config, source, sampler, steps, group=1):
  """The share of ``group`` among the 'attr' of ``steps`` batches of the real loader."""
  exp = experiment.setup(config, source.spec)
  loader = data.Loader(source, exp.global_batch, config.seed, parallel.data_sharding(exp.mesh),
                       0, steps, sampler=sampler)
  try:
    attrs = np.concatenate([np.asarray(batch["attr"]) for _, batch in loader])
  finally:
    loader.close()
  assert len(attrs) == steps * exp.global_batch
  return float(np.mean(attrs == group))


@pytest.mark.parametrize("target", [None, (0.7, 0.3)])
def test_resampled_batches_reach_the_target_share(target, tmp_path):
  """fair.prepare's sampler through data.Loader: group 1 at fair.target[1], not at 18%."""
  c = mnist_config("method=resample", **{"train.batch_size": 64, "fair.target": target})
  source = data.load(c.data, "train")
  groups = data.read_column(source, "attr")
  biased_share = float(np.mean(groups == 1))
  assert 0.1 < biased_share < 0.25  # 90/10 biased set plus the balanced reference set.
  steps = 200  # 12,800 draws: the share's standard deviation is at most 0.0045.
  resampled, sampler = fair.prepare(c, source, str(tmp_path), 64)
  assert sampler is not None
  share = loader_group_share(c, resampled, sampler, steps)
  want = 0.5 if target is None else target[1]
  assert abs(share - want) < 0.02, (share, want)
  # The same loader without the mitigation keeps the biased share.
  baseline = mnist_config("method=baseline", **{"train.batch_size": 64})
  plain, no_sampler = fair.prepare(baseline, source, str(tmp_path), 64)
  assert no_sampler is None
  share = loader_group_share(baseline, plain, None, steps)
  assert abs(share - biased_share) < 0.02, (share, biased_share)


# --- 3. The group-conditional generator. ------------------------------------------------


@pytest.fixture(scope="module")
def conditional():
  """The group-conditional smoke experiment and its initial state."""
  exp = experiment.setup(mnist_config("method=conditional"))
  return exp, initial_state(exp)


def test_conditional_generator_uses_the_group_label(conditional):
  """The same latents decoded as group 0 and as group 1 give different images."""
  exp, state = conditional
  assert exp.objective.num_classes == 2
  latents = np.asarray(exp.objective.sample_latents(jax.random.key(1), 16))
  by_group = [sampling.decode_images(exp, state, latents, np.full(16, g, np.int32))
              for g in (0, 1)]
  assert all(np.all(np.isfinite(images)) for images in by_group)
  # Same latents, other group: every sample changes.
  per_sample = np.abs(by_group[0] - by_group[1]).mean(axis=(1, 2, 3))
  assert per_sample.min() > 1e-3, per_sample


# Conditioning on a group id the model has no embedding for is an error: nn.Embed looks ids
# up with jnp.take, which returns NaN rows for an out-of-range id (other index modes clamp
# it), so a label/attribute mix-up (the digit labels 0-9 where the 2 colour groups belong)
# would train on NaN or wrong embeddings instead of failing. experiment.check_data (called
# by train_and_evaluate before anything compiles) refuses such a source.
def test_conditional_setup_rejects_out_of_range_groups():
  c = mnist_config("method=conditional")
  source = data.load(c.data, "train")
  exp = experiment.setup(c, source.spec)
  assert exp.objective.num_classes == 2
  experiment.check_data(exp, source)  # The valid source is fine.
  mixed_up = data.SubsetSource(source, columns={"attr": data.read_column(source, "label")})
  with pytest.raises(ValueError, match="attr"):
    experiment.check_data(exp, mixed_up)


# Decoding a conditional model with a label outside [0, objective.num_classes) is a
# ValueError from sampling.decode_images (a host-side check before the jitted decode).
def test_conditional_decode_rejects_out_of_range_labels(conditional):
  exp, state = conditional
  latents = np.zeros((4, exp.objective.latent_dim), np.float32)
  for bad in (2, -1):
    with pytest.raises(ValueError, match="(?i)label"):
      sampling.decode_images(exp, state, latents, np.array([0, 1, bad, 1], np.int32))


# --- 4. The penalty: the generator's update, and only it. ------------------------------


def test_penalty_changes_only_the_generator_update(classifiers, dcgan_state):
  """One real step with fair.penalty.weight 1 vs 0 from the same state and batch."""
  results = {}
  for weight in (1.0, 0.0):
    c = mnist_config("method=penalty", **{"fair.classifier_dir": classifiers["attr"],
                                           "fair.penalty.weight": weight})
    source = data.load(c.data, "train")
    exp = experiment.setup(c, source.spec)
    check_state_fits(dcgan_state, exp)
    batch = first_batch(exp, source)
    results[weight] = run_step(train.make_train_step(exp), exp, dcgan_state, batch)
  (state_on, m_on), (state_off, m_off) = results[1.0], results[0.0]
  # The same discriminator update: the penalty is no part of D's loss...
  assert_trees_close(state_on["disc"], state_off["disc"], rtol=0, atol=0)
  for key in ("d_loss", "d_real", "d_fake", "d_grad_norm"):
    assert m_on[key] == m_off[key], key
  # ... the generator's loss includes the penalty's value...
  assert m_on["fair_penalty"] > 1e-4
  np.testing.assert_allclose(m_on["fair_penalty"], m_off["fair_penalty"], rtol=1e-6)
  np.testing.assert_allclose(m_on["g_adv_loss"], m_off["g_adv_loss"], rtol=1e-6)
  np.testing.assert_allclose(m_on["g_loss"] - m_off["g_loss"], m_on["fair_penalty"],
                             rtol=1e-4)
  # ... and its gradient: a different generator update (without the penalty's gradient
  # every parameter would be bit-identical).
  assert m_on["g_grad_norm"] != m_off["g_grad_norm"]
  changed = [np.mean(np.asarray(a) != np.asarray(b)) for a, b in zip(
      jax.tree.leaves(state_on["gen"]["params"]), jax.tree.leaves(state_off["gen"]["params"]))]
  assert max(changed) > 0.01, changed


@pytest.mark.parametrize("divergence", ["kl", "l2"])
def test_the_penalty_is_the_configs_weight_times_its_divergence_from_the_target(
    divergence, classifiers, dcgan_state):
  """``g_loss - g_adv_loss = weight * D(p || target)`` with the config's weight, target and
  divergence, ``p`` the generated batch's mean predicted groups (logged as gen_group_*)."""
  weight, target = 2.5, np.array([0.3, 0.7])
  c = mnist_config("method=penalty", **{
      "fair.classifier_dir": classifiers["attr"], "fair.penalty.weight": weight,
      "fair.penalty.divergence": divergence, "fair.target": tuple(target)})
  source = data.load(c.data, "train")
  exp = experiment.setup(c, source.spec)
  _, m = run_step(train.make_train_step(exp), exp, dcgan_state, first_batch(exp, source))
  p = np.array([m["gen_group_0"], m["gen_group_1"]])
  assert abs(p.sum() - 1) < 1e-5  # (The initial generator draws group 0 only.)
  want = (np.sum(p * np.log(p / target)) if divergence == "kl"
          else np.sqrt(np.sum((p - target) ** 2)))
  np.testing.assert_allclose(m["fair_penalty"], want, rtol=1e-4)
  np.testing.assert_allclose(m["g_loss"] - m["g_adv_loss"], weight * want, rtol=1e-4)


# --- 5. A short importance-weighted run generates the minority group more often. --------


def short_run(config, workdir, num_steps):
  """Trains ``config`` for ``num_steps`` through the real loop; returns the final state."""
  config.train.num_steps = num_steps
  config.train.checkpoint_every_steps = num_steps
  config.log.every_steps = num_steps
  config.log.sample_every_steps = num_steps
  summary = train.train_and_evaluate(config, workdir)
  assert summary["final_step"] == num_steps
  exp = experiment.setup(config)
  state, _ = experiment.restore_checkpoint(exp, workdir)
  return exp, state


def test_importance_weighting_and_resampling_lower_the_generated_minority_gap(classifiers,
                                                                               tmp_path):
  """Biased colour digits (group 1 is 18% of biased + reference): importance weighting and
  resampling each move the share of group 1 among generated samples toward 1/2.

  A VAE, not the GAN: over a few hundred steps the smoke DCGAN's colour share swings
  between 0 and 1 with the seed (baseline 0.0-0.1, importance 0.02-0.52 at 400 steps),
  while the VAE's follows its (weighted or resampled) data. Measured at 500 steps, seeds
  0-3: baseline share 0.26-0.37 (gap 0.13-0.24), importance 0.51-0.60 (gap 0.01-0.10), the
  gap lowered by 0.09-0.22 (similar at 300 and 1,000 steps); this test (seed 0, 1,000
  samples): 0.337 and 0.538 with JAX's partitionable threefry; the suite's
  non-partitionable bits (tests/conftest.py) give 0.399 and 0.578, an overshoot past 1/2
  (2026-12-07: baseline 0.403, importance 0.584, resampling 0.577). With the weights
  ignored (or the sampler unused) a run is the baseline run.
  """
  assert classifiers["attr_accuracy"] > 0.99
  shares = {}
  for method in ("baseline", "importance", "resample"):
    c = mnist_config(f"method={method},model=vae", **{
        "fair.classifier_dir": classifiers["attr"], "train.batch_size": 32,
        "model.hidden": (64, 32), "model.latent_dim": 8,
        # A density-ratio classifier that tells the colours apart (the smoke one is 4 steps).
        "fair.ratio.steps": 100, "fair.ratio.lr": 3e-3, "fair.ratio.width": 8,
        "fair.ratio.feature_dim": 16})
    exp, state = short_run(c, str(tmp_path / method), 500)
    images, _ = sampling.generate_images(exp, state, jax.random.key(7), 1000)
    groups = np.argmax(fair.attribute_classifier(c).probs(images), axis=-1)
    shares[method] = float(np.mean(groups == 1))
  gaps = {k: abs(v - 0.5) for k, v in shares.items()}
  for method in ("importance", "resample"):
    assert shares[method] > shares["baseline"] + 0.1, shares
    assert gaps[method] < gaps["baseline"], shares  # closer to 1/2, not only higher


# --- 6. Adversarial debiasing on Adult. -------------------------------------------------


def test_adversarial_debiasing_lowers_spd_and_eod(tmp_path):
  """AIF360's demo setting (experiments/adult_debias.py), sex protected.

  Measured, seeds 0-3: the plain model sits at SPD -0.21..-0.23, EOD -0.45..-0.49, accuracy
  0.80 from step 250 on. The debiased one oscillates for the first ~1,500 steps (constant
  predictors, or EOD overshooting to +0.45) and settles by 1,800: at 1,800-2,400 steps
  |SPD| <= 0.07, |EOD| <= 0.16, accuracy 0.775-0.788 (a constant predictor: 0.758).
  """
  results = {}
  for debias, num_steps in ((False, 300), (True, 2000)):
    c = load_config("adult_debias", None, **{**ONE_DEVICE, "objective.debias": debias})
    exp, state = short_run(c, str(tmp_path / f"debias={debias}"), num_steps)
    test_split = data.load(c.data, "test")
    rows = test_split.get(np.arange(len(test_split)))
    probs = jax.jit(exp.objective.predict)(state, {"features": rows["features"]})
    y_pred = (np.asarray(probs) > 0.5).astype(np.int32)
    y, a = rows["label"], rows["attr"]
    results[debias] = {
        "spd": fairness.statistical_parity_difference(y_pred, a),
        "eod": fairness.equal_opportunity_difference(y, y_pred, a),
        "accuracy": fairness.accuracy(y, y_pred),
        "selection_rate": float(np.mean(y_pred))}
  plain, debiased = results[False], results[True]
  assert abs(debiased["spd"]) < abs(plain["spd"]) - 0.08, results
  assert abs(debiased["eod"]) < abs(plain["eod"]) - 0.15, results
  # Not by giving up: no constant predictor (it has SPD = EOD = 0 and the majority rate's
  # accuracy, 0.758), a useful one.
  assert 0.05 < debiased["selection_rate"] < 0.95, results
  assert debiased["accuracy"] > max(np.mean(y), 1 - np.mean(y)), results
