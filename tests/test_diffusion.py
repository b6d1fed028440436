"""DDPM: the forward process and its posterior against independent derivations, the samplers
on Gaussian data whose optimal denoiser is known in closed form, the variational bound
against its terms computed with scipy, classifier-free guidance, the U-Net's published size,
and the family in the loop (one step with the likelihood evaluator, exact resume, 1 vs 8
devices, the fairness methods)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from conftest import assert_resume_is_exact, load_config
from fairgen import experiment, train
from fairgen.objectives import denoising, diffusion
from fairgen.objectives import diffusion_process as dp


@pytest.mark.parametrize("name", dp.SCHEDULES)
def test_q_x_t_given_x_0_is_the_composed_markov_chain(name):
  """Composing q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t) step by step (mean and
  variance recursions, and a simulated chain) gives q_sample's closed form."""
  s = dp.make_schedule(name, 50)
  x0 = 0.7
  mean, var = x0, 0.0
  for t, beta in enumerate(s.betas.astype(np.float64)):
    mean, var = math.sqrt(1 - beta) * mean, (1 - beta) * var + beta
    np.testing.assert_allclose(math.sqrt(s.alpha_bar[t]) * x0, mean, rtol=1e-5)
    np.testing.assert_allclose(1 - s.alpha_bar[t], var, rtol=1e-4, atol=1e-6)
  rng = np.random.default_rng(0)
  chain = np.full(200_000, x0)
  for beta in s.betas[:30]:
    chain = np.sqrt(1 - beta) * chain + np.sqrt(beta) * rng.standard_normal(chain.shape)
  direct = np.asarray(dp.q_sample(s, jnp.full((200_000,), x0), jnp.full((200_000,), 29),
                                  jax.random.normal(jax.random.key(0), (200_000,))))
  for a in (chain, direct):
    np.testing.assert_allclose(a.mean(), math.sqrt(s.alpha_bar[29]) * x0, atol=5e-3)
    np.testing.assert_allclose(a.var(), 1 - s.alpha_bar[29], atol=5e-3)


def test_the_posterior_mean_is_the_product_of_the_two_gaussians():
  """q(x_{t-1} | x_t, x_0) by Bayes: precision-weighted N(sqrt(ab_{t-1}) x_0, 1 - ab_{t-1})
  times the likelihood N(x_t; sqrt(1 - beta_t) x_{t-1}, beta_t)."""
  s = dp.make_schedule("cosine", 40)
  t = np.arange(1, 40)
  x0, xt = np.linspace(-1, 1, 39), np.linspace(2, -2, 39)
  b, abp = s.betas[t].astype(np.float64), s.alpha_bar_prev[t].astype(np.float64)
  precision = 1 / (1 - abp) + (1 - b) / b
  mean = (np.sqrt(abp) * x0 / (1 - abp) + np.sqrt(1 - b) * xt / b) / precision
  np.testing.assert_allclose(dp.posterior_mean(s, jnp.asarray(x0), jnp.asarray(xt),
                                               jnp.asarray(t)), mean, rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(s.posterior_variance[t], 1 / precision, rtol=2e-4)


class GaussianDenoiser(nn.Module):
  """The exact eps-predictor for data N(mu, sd^2) per pixel: E[eps | x_t] in closed form."""

  alpha_bar: tuple
  mu: float
  sd: float
  num_classes: int = 0
  condition_key: str = "label"

  @nn.compact
  def __call__(self, x, t, labels=None, train=False):
    self.param("unused", nn.initializers.zeros, (1,))
    ab = jnp.asarray(self.alpha_bar)[t].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * self.mu) / (ab * self.sd**2 + 1 - ab)


def _sample(sampler, steps, eta=0.0, n=4000, timesteps=200, mu=0.3, sd=0.2):
  s = dp.make_schedule("linear", timesteps, 1e-4, 0.05)
  model = GaussianDenoiser(tuple(s.alpha_bar.tolist()), mu, sd)
  state = {"ema": model.init(jax.random.key(0), jnp.zeros((1, 1, 1, 1)),
                             jnp.zeros(1, jnp.int32))["params"]}
  latents = jax.random.normal(jax.random.key(1), (n, 1))
  return np.asarray(diffusion.sample(
      state, latents, jnp.zeros(n, jnp.int32), model=model, image_shape=(1, 1, 1), schedule=s,
      prediction="eps", steps=steps, eta=1.0 if sampler == "ancestral" else eta,
      guidance=0.0, clip_denoised=False)).ravel(), np.asarray(latents).ravel()


def test_ancestral_sampling_with_the_exact_denoiser_draws_the_data_distribution():
  """With the optimal denoiser of N(0.3, 0.2^2) data, DDPM's sampler on every timestep
  returns that distribution. (On a coarse subsequence it would not: its fixed variances
  omit Var[x_0 | x_t].)"""
  x, _ = _sample("ancestral", 200)
  assert abs(x.mean() - 0.3) < 0.01
  assert abs(x.std() - 0.2) < 0.01


def test_ddim_at_eta_0_is_deterministic_and_converges_to_the_transport_map():
  """DDIM with eta = 0 integrates the probability-flow ODE: no injected noise, a monotone
  map of the latents, and for Gaussian data the map x = 0.3 + 0.2 z, approached at first
  order in the step size. At eta = 1 the noise matters."""
  want = None
  errors = []
  for steps in (50, 100, 200):
    x, z = _sample("ddim", steps)
    want = 0.3 + 0.2 * z  # The Gaussian-to-Gaussian optimal transport map.
    assert np.all(np.diff(x[np.argsort(z)]) >= 0)
    errors.append(np.max(np.abs(x - want) / (1 + np.abs(z))))
  assert errors[2] < errors[1] < 0.6 * errors[0] and errors[2] < 0.006, errors
  noisy, _ = _sample("ddim", 200, eta=1.0)
  assert np.mean(np.abs(noisy - want)) > 0.05


def test_v_prediction_inverts_to_the_same_x0_and_eps():
  s = dp.make_schedule("cosine", 100)
  x0, eps = (jax.random.normal(k, (5, 4, 4, 1)) for k in jax.random.split(jax.random.key(0)))
  t = jnp.array([0, 10, 50, 90, 99])
  x_t = dp.q_sample(s, x0, t, eps)
  for prediction in dp.PREDICTIONS:
    out = dp.target(s, prediction, x0, t, eps)
    got_x0, got_eps = dp.predict_x0_eps(s, prediction, x_t, t, out)
    np.testing.assert_allclose(got_x0, x0, atol=1e-3)
    np.testing.assert_allclose(got_eps, eps, atol=1e-4)


def test_the_variational_bound_matches_its_terms_and_stratified_estimates_are_unbiased():
  """For a model whose x_0-prediction is the data itself, every L_t is the KL between the
  posterior and the model variance: a closed form. The prior and decoder terms against
  scipy; the stratified estimate with 3 of 9 timesteps averages to the exact sum."""
  T = 10
  s = dp.make_schedule("linear", T, 1e-3, 0.2)

  class Oracle(nn.Module):  # eps such that the predicted x_0 is x0 (closed over).
    x0: jax.Array
    num_classes: int = 0

    @nn.compact
    def __call__(self, x, t, labels=None, train=False):
      self.param("unused", nn.initializers.zeros, (1,))
      ab = jnp.asarray(s.alpha_bar)[t].reshape(-1, 1, 1, 1)
      return (x - jnp.sqrt(ab) * self.x0) / jnp.sqrt(1 - ab)

  x0 = (np.array([0, 1, 128, 254, 255], np.float32) / 127.5 - 1).reshape(1, 5, 1, 1)
  model = Oracle(jnp.asarray(x0))
  state = {"ema": model.init(jax.random.key(0), jnp.asarray(x0), jnp.zeros(1, jnp.int32)
                             )["params"]}
  keys = jax.random.split(jax.random.key(0), 1)
  exact = diffusion.nll(state, {"image": x0}, keys, 1000, model=model, schedule=s,
                        prediction="eps")
  logvar = dp.model_log_variance(s).astype(np.float64)
  post = s.posterior_variance.astype(np.float64)
  kl = [0.5 * (-1 + logvar[t] - math.log(post[t]) + post[t] / math.exp(logvar[t]))
        for t in range(1, T)]
  np.testing.assert_allclose(exact["diffusion"], 5 * sum(kl), rtol=1e-4)
  ab = float(s.alpha_bar[-1])
  prior = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * x0**2).sum()
  np.testing.assert_allclose(exact["prior"], prior, rtol=1e-4)
  sd = math.exp(0.5 * logvar[0])
  edges = [(-np.inf, 1 / 255), (-1 / 255, 1 / 255), (-1 / 255, 1 / 255), (-1 / 255, 1 / 255),
           (-1 / 255, np.inf)]
  decoder = -sum(math.log(stats.norm.cdf(hi / sd) - stats.norm.cdf(lo / sd)) for lo, hi in edges)
  np.testing.assert_allclose(exact["decoder"], decoder, rtol=2e-3)
  np.testing.assert_allclose(exact["nll"], prior + 5 * sum(kl) + exact["decoder"], rtol=1e-4)
  many = jax.random.split(jax.random.key(1), 4000)
  estimate = jax.jit(lambda k: diffusion.nll(
      state, {"image": np.repeat(x0, 4000, 0)}, k, 3, model=model, schedule=s,
      prediction="eps"))(many)
  assert np.std(estimate["diffusion"]) > 0  # Really sampled.
  np.testing.assert_allclose(np.mean(estimate["diffusion"]), exact["diffusion"], rtol=0.02)


def test_guidance_combines_the_conditional_and_unconditional_outputs():
  """(1 + w) f(x, y) - w f(x, no label); at w = 0 one conditional evaluation; the U-Net's
  output depends on the label, and label num_classes is its "no label" row."""
  config = load_config("ddpm_mnist", "smoke", **{"model.conditional": True})
  exp = experiment.setup(config)
  model = experiment.build_model(config, exp.spec)
  params = jax.jit(exp.objective.init)(jax.random.key(0))["params"]
  noise = np.random.default_rng(1)  # On the host: no program compiled per parameter shape.
  params = jax.tree.map(lambda p: np.asarray(p) + np.float32(0.05) * noise.standard_normal(
      p.shape, np.float32), params)  # Zero-initialised output layers would hide the label.
  x = jax.random.normal(jax.random.key(2), (3, 28, 28, 1))
  t, y = jnp.array([1, 5, 9]), jnp.array([0, 3, 7])
  f = jax.jit(lambda labels: model.apply({"params": params}, x, t, labels))
  cond, uncond = f(y), f(jnp.full(3, 10))
  assert not np.allclose(cond, uncond, atol=1e-4) and not np.allclose(cond, f(y + 1), atol=1e-4)
  for w in (0.0, 2.5):
    np.testing.assert_allclose(jax.jit(denoising.guided, static_argnums=(0, 5))(
        model, params, x, t, y, w),
                               (1 + w) * cond - w * uncond, rtol=1e-4, atol=1e-5)


def test_training_drops_labels_at_the_configured_rate(monkeypatch):
  """Classifier-free guidance's training: labels replaced by "no label" at label_dropout."""
  seen = []
  original = diffusion.per_example_loss

  def spy(model, params, x0, labels, rng, **kwargs):
    seen.append(labels)
    return original(model, params, x0, labels, rng, **kwargs)

  monkeypatch.setattr(diffusion, "per_example_loss", spy)
  config = load_config("ddpm_mnist", "smoke", **{"model.conditional": True,
                                                  "objective.label_dropout": 0.3})
  exp = experiment.setup(config)
  state = jax.jit(exp.objective.init)(jax.random.key(0))  # One program, not one per shape.
  batch = {"image": np.zeros((4000, 28, 28, 1), np.float32),
           "label": np.arange(4000, dtype=np.int32) % 10}
  jax.eval_shape(exp.objective.train_step, state, batch, jax.random.key(0))
  labels = jax.jit(lambda b, k: (exp.objective.train_step(state, b, k), seen[-1])[1])(
      batch, jax.random.key(3))
  dropped = np.asarray(labels) == 10
  assert abs(dropped.mean() - 0.3) < 0.03
  np.testing.assert_array_equal(np.asarray(labels)[~dropped], batch["label"][~dropped])


def test_the_cifar10_unet_has_the_published_35_7m_parameters():
  """Ho et al. 2020's CIFAR-10 model: 35.7M parameters (count of the official code's net)."""
  config = load_config("ddpm_cifar10", None)
  model = experiment.build_model(config, type("Spec", (), {
      "image_shape": (32, 32, 3), "num_classes": 10, "num_groups": 0, "name": "cifar10"})())
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                             jnp.zeros((1,), jnp.int32)))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 35_746_307


def test_ddpm_cifar10_trains_evaluates_its_bound_and_samples_a_trajectory(tmp_path):
  """The paper config's smoke variant on CIFAR-10-shaped TFDS mock records, through the
  loop, the likelihood evaluator (the bound in nats and bits/dim) and --mode=sample (grids
  and the denoising trajectory)."""
  import tensorflow_datasets as tfds
  from fairgen.evaluation import modes
  config = load_config("ddpm_cifar10", "smoke")
  workdir = str(tmp_path / "run")
  with tfds.testing.mock_data(num_examples=64):
    summary = train.train_and_evaluate(config, workdir)
    metrics = modes.evaluate(config, workdir)["metrics"]
    files = modes.sample(config, workdir)
  assert summary["final_step"] == config.train.num_steps
  for key in ("prior", "diffusion", "decoder"):
    assert metrics[key] > 0
  np.testing.assert_allclose(metrics["nll"], metrics["prior"] + metrics["diffusion"]
                             + metrics["decoder"], rtol=1e-5)
  np.testing.assert_allclose(metrics["bits_per_dim"],
                             metrics["nll"] / (32 * 32 * 3 * math.log(2)), rtol=1e-6)
  names = {f.rsplit("/", 1)[-1] for f in files}
  assert {"grid.png", "interpolation.png", "trajectory.png", "trajectory.npz"} <= names
  trajectory = np.load([f for f in files if f.endswith("trajectory.npz")][0])
  frames = trajectory["images"].reshape(8, -1, 32, 32, 3)  # Rows: noise, ..., the sample.
  grid = np.load([f for f in files if f.endswith("grid.npz")][0])
  np.testing.assert_allclose(frames[:, 0], np.clip(trajectory["latents"].reshape(8, 32, 32, 3),
                                                   -1, 1), atol=1e-6)
  np.testing.assert_allclose(frames[:, -1], grid["images"][:8], atol=1e-5)


# A conditional U-Net with dropout (the label-dropping and dropout keys).
CONDITIONAL_DROPOUT = {"model.conditional": True, "model.dropout": 0.1}


def test_ddpm_on_eight_devices_matches_one(tmp_path, partitionable_rng):
  """The step (its dropout and dropped labels too) and the sharded DDIM sampler (the sample
  grid) on 1 and 8 devices; the 1-device run, stopped at step 1 and resumed, ends
  bit-identical to it uninterrupted (params, Adam state and the EMA, with dropout and the
  label-dropping keys)."""
  results = {}
  for n in (1, 8):
    config = load_config("ddpm_mnist", "smoke", **{**CONDITIONAL_DROPOUT,
                                                    "mesh.data": n, "train.num_steps": 2,
                                                    "train.checkpoint_every_steps": 2,
                                                    "log.every_steps": 1,
                                                    "log.sample_every_steps": 2})
    workdir = str(tmp_path / f"d{n}")
    summary = train.train_and_evaluate(config, workdir)
    if n == 1:
      assert_resume_is_exact(config, tmp_path, 1, workdir)
    exp = experiment.setup(config)
    from conftest import final_state
    _, leaves = final_state(workdir, config)
    # Placed as in training, so that the sampler is the program the loop's grid compiled.
    state = jax.device_put(jax.tree.unflatten(jax.tree.structure(exp.abstract_state), leaves),
                           exp.state_shardings)
    from fairgen import sampling
    images, _ = sampling.generate_images(exp, state, jax.random.key(0), 16)
    results[n] = summary["scalars"], leaves, images
  (s1, p1, i1), (s8, p8, i8) = results[1], results[8]
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(s8[key], s1[key], rtol=1e-4, err_msg=key)
  for a, b in zip(p1, p8, strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(i8, i1, atol=1e-4)


@pytest.mark.parametrize("method", ["importance", "conditional"])
def test_fair_ddpm_trains_with_weights_and_samples_groups_from_the_target(method, tmp_path):
  """fair_mnist with model=ddpm: importance weights scale the per-example loss (a zero weight
  removes an example from the update), and the conditional method guides on the group with
  the target prior."""
  target = {"fair.target": (0.25, 0.75)} if method == "conditional" else {}
  config = load_config("fair_mnist", f"method={method},model=ddpm,smoke", **target)
  exp = experiment.setup(config)
  if method == "importance":
    state = jax.jit(exp.objective.init)(jax.random.key(0))
    x = np.asarray(jax.random.uniform(jax.random.key(1), (4, 28, 28, 1), minval=-1, maxval=1))
    batch = {"image": x, "attr": np.array([0, 1, 0, 1], np.int32),
             "weight": np.ones(4, np.float32)}
    step = jax.jit(exp.objective.train_step)
    w = np.array([1, 0, 0, 0], np.float32)
    a, _ = step(state, {**batch, "weight": w}, jax.random.key(2))
    only_first = x * w[:, None, None, None]  # The zero-weight images do not matter.
    b, _ = step(state, {**batch, "weight": w, "image": only_first}, jax.random.key(2))
    c, _ = step(state, batch, jax.random.key(2))
    for u, v, z in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]),
                       jax.tree.leaves(c["params"])):
      np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(u, z) for u, z in zip(jax.tree.leaves(a["params"]),
                                                    jax.tree.leaves(c["params"])))
    return
  assert exp.objective.num_classes == 2 and exp.objective.condition_key == "attr"
  assert exp.objective.label_probs == (0.25, 0.75)
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["final_step"] == config.train.num_steps
  from fairgen.evaluation import modes
  grid = np.load([f for f in modes.sample(config, str(tmp_path / "run"))
                  if f.endswith("/grid.npz")][0])
  assert np.mean(grid["labels"]) == 0.75  # 16 samples, the groups at the target's quotas.
