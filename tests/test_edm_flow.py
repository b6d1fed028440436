"""EDM and flow matching: the preconditioning, loss weights, noise-level and time
distributions and the flow-matching target through the objectives that configs build (oracle
networks that know the data, with Karras et al.'s Table 1 written out again here); the
samplers and the ODE likelihood on Gaussian data whose denoiser, velocity and density are
known in closed form; classifier-free guidance; and both families in the loop.

For data ``x0 ~ N(mu, s^2)`` per pixel:
- EDM's ideal denoiser is ``D(x; sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)``, and the
  probability-flow ODE carries ``x`` at ``sigma_max`` to ``mu + (x - mu) sqrt((s^2 +
  sigma^2) / (s^2 + sigma_max^2))``;
- the linear interpolant ``x_t = (1 - t) x0 + t e`` has the velocity ``E[e - x0 | x_t] = -mu
  + (t - (1 - t) s^2) / V_t (x_t - (1 - t) mu)``, ``V_t = (1 - t)^2 s^2 + t^2``, and its ODE
  carries ``z`` at t = 1 to ``mu + s z``.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from conftest import assert_resume_is_exact, load_config
from fairgen import experiment, models, train
from fairgen.models import unet
from fairgen.objectives import edm, flow, ode

LEVELS = np.linspace(-0.9, 0.9, 10).astype(np.float32)  # x0 of label k: LEVELS[k] everywhere.
COSTS = np.linspace(0.05, 0.5, 10).astype(np.float32)  # Example loss of label k.
MU, SD = 0.3, 0.2


def table1(name, sigma, sd=0.5):
  """Karras et al. 2022, Table 1: (c_skip, c_out, c_in, c_noise, lambda) at sigma (numpy)."""
  sigma = np.asarray(sigma, np.float64)
  if name == "vp":
    t = (np.sqrt(0.1**2 + 2 * 19.9 * np.log(sigma**2 + 1)) - 0.1) / 19.9
    return 1.0, -sigma, 1 / np.sqrt(sigma**2 + 1), 999 * t, 1 / sigma**2
  if name == "ve":
    return 1.0, sigma, 1.0, np.log(sigma / 2), 1 / sigma**2
  return (sd**2 / (sigma**2 + sd**2), sigma * sd / np.sqrt(sigma**2 + sd**2),
          1 / np.sqrt(sigma**2 + sd**2), np.log(sigma) / 4, (sigma**2 + sd**2) / (sigma * sd)**2)


def sigma_of_c_noise(name, c):
  """Table 1's c_noise inverted (the oracles recover sigma from the network's input)."""
  if name == "vp":
    t = c / 999
    return jnp.sqrt(jnp.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1)
  return 2 * jnp.exp(c) if name == "ve" else jnp.exp(4 * c)


@pytest.mark.parametrize("name", edm.PARAMETERIZATIONS)
def test_the_preconditioning_and_weights_are_table_1(name):
  sigma = np.geomspace(0.002, 80, 13)
  got = edm.Precond(name).coefficients(jnp.asarray(sigma, jnp.float32))
  for g, w in zip(got, table1(name, sigma)[:4]):
    np.testing.assert_allclose(np.broadcast_to(g, sigma.shape), np.broadcast_to(w, sigma.shape),
                               rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(edm.Precond(name).weight(jnp.asarray(sigma, jnp.float32)),
                             table1(name, sigma)[4], rtol=2e-5)
  # The paper's point: every column weighs the network's own error by lambda c_out^2 = 1.
  _, c_out, _, _, lam = table1(name, sigma)
  np.testing.assert_allclose(lam * np.asarray(c_out)**2, 1.0, rtol=1e-12)


def test_the_sampler_noise_levels_are_eq_5_and_the_churn_algorithm_2():
  s = edm.sigma_steps(18, 0.002, 80.0, 7.0)
  i = np.arange(18)
  want = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
  np.testing.assert_allclose(s, np.append(want, 0.0), rtol=1e-12)
  gammas = edm.churn(s, 40.0, 0.05, 50.0)
  np.testing.assert_allclose(gammas, np.where((s[:-1] >= 0.05) & (s[:-1] <= 50),
                                              min(40 / 18, math.sqrt(2) - 1), 0.0))
  np.testing.assert_allclose(edm.churn(s, 1.0, 0.0, 1e9), 1 / 18)


class OracleEDM(unet.UNet):
  """F such that D(x; sigma) = x0 + c_out * offset for data x0 = LEVELS[label]: offset is
  sqrt(COSTS[label]) ('cost') or |ln sigma - centre| ('sigma')."""

  parameterization: str = "edm"
  offset: str = "cost"
  centre: float = 0.0

  @nn.compact
  def __call__(self, x_in, c_noise, labels=None, train=False):
    unused = self.param("unused", nn.initializers.zeros, ())
    sigma = sigma_of_c_noise(self.parameterization, c_noise)[:, None, None, None]
    sd = 0.5
    if self.parameterization == "edm":
      c_skip, c_out, c_in = (sd**2 / (sigma**2 + sd**2), sigma * sd / jnp.sqrt(sigma**2 + sd**2),
                             1 / jnp.sqrt(sigma**2 + sd**2))
    elif self.parameterization == "vp":
      c_skip, c_out, c_in = 1.0, -sigma, 1 / jnp.sqrt(sigma**2 + 1)
    else:
      c_skip, c_out, c_in = 1.0, sigma, 1.0
    x = x_in / c_in
    x0 = jnp.asarray(LEVELS)[labels][:, None, None, None]
    off = (jnp.sqrt(jnp.asarray(COSTS))[labels][:, None, None, None] if self.offset == "cost"
           else jnp.abs(jnp.log(sigma) - self.centre))
    return (x0 - c_skip * x) / c_out + off + unused


class OracleFlow(unet.UNet):
  """v = e - x0 for data x0 = LEVELS[label], recovered from x_t and t, plus sqrt(COSTS) or
  |t - 0.5|."""

  offset: str = "cost"

  @nn.compact
  def __call__(self, x, time, labels=None, train=False):
    unused = self.param("unused", nn.initializers.zeros, ())
    t = (time / 1000.0)[:, None, None, None]
    x0 = jnp.asarray(LEVELS)[labels][:, None, None, None]
    eps = (x - (1 - t) * x0) / t
    off = (jnp.sqrt(jnp.asarray(COSTS))[labels][:, None, None, None] if self.offset == "cost"
           else jnp.abs(t - 0.5))
    return eps - x0 + off + unused


@models.MODELS.register("oracle_edm")
def build_oracle_edm(spec, parameterization: str = "edm", offset: str = "cost",
                     centre: float = 0.0):
  return OracleEDM(out_channels=1, num_classes=spec.num_classes,
                   parameterization=parameterization, offset=offset, centre=centre)


@models.MODELS.register("oracle_flow")
def build_oracle_flow(spec, offset: str = "cost"):
  return OracleFlow(out_channels=1, num_classes=spec.num_classes, offset=offset)


def oracle_step_loss(config_name, model, batch, **overrides):
  config = load_config(config_name, "smoke", **{"objective.label_dropout": 0.0, **overrides})
  config.model = model
  exp = experiment.setup(config)
  state = jax.jit(exp.objective.init)(exp.init_rng)
  _, metrics = jax.jit(exp.objective.train_step)(state, batch, jax.random.key(3))
  return float(metrics["loss"])


def constant_batch(n, weighted=True):
  labels = np.arange(n) % 10
  weight = (np.random.default_rng(0).uniform(0.1, 3.0, n) if weighted else np.ones(n)
            ).astype(np.float32)
  return {"image": np.broadcast_to(LEVELS[labels][:, None, None, None], (n, 28, 28, 1)).copy(),
          "label": labels.astype(np.int32), "weight": weight}, labels, weight


def log_sigma_second_moment(name, centre, n=400_000):
  """E[(ln sigma - centre)^2] under the parameterization's training noise (numpy)."""
  u = np.random.default_rng(1).uniform(size=n)
  if name == "vp":
    t = 1 + u * (1e-5 - 1)
    log_sigma = 0.5 * np.log(np.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1)
  elif name == "ve":
    log_sigma = np.log(0.02) + u * np.log(100 / 0.02)
  else:
    return 1.2**2 + (-1.2 - centre) ** 2
  return float(np.mean((log_sigma - centre) ** 2))


@pytest.mark.parametrize("name", edm.PARAMETERIZATIONS)
def test_edm_weighs_the_denoiser_error_by_lambda_at_the_configured_noise_levels(name):
  """With an oracle whose D is off by c_out * sqrt(COSTS[y]), the weighted loss lambda
  |D - y|^2 is exactly the (importance-)weighted mean of COSTS: the preconditioning, the
  weight and the pixel mean as Table 1. With D off by c_out |ln sigma - c|, it is E[(ln
  sigma - c)^2] under the parameterization's training noise levels."""
  batch, labels, weight = constant_batch(16)
  model = {"name": "oracle_edm", "parameterization": name}
  loss = oracle_step_loss("edm_mnist", model, batch, **{"objective.parameterization": name})
  np.testing.assert_allclose(loss, np.sum(weight * COSTS[labels]) / np.sum(weight), rtol=2e-4)
  big, _, _ = constant_batch(4096, weighted=False)
  centre = {"edm": 0.0, "vp": 1.0, "ve": 0.0}[name]
  loss = oracle_step_loss("edm_mnist", {**model, "offset": "sigma", "centre": centre}, big,
                          **{"objective.parameterization": name})
  want = log_sigma_second_moment(name, centre)
  assert abs(loss - want) < 0.06 * want, (loss, want)


@pytest.mark.parametrize("time_sampling", flow.TIME_SAMPLINGS)
def test_flow_matching_regresses_the_straight_line_velocity(time_sampling):
  """The target is e - x0 on x_t = (1 - t) x0 + t e: an oracle velocity off by
  sqrt(COSTS[y]) costs exactly their weighted mean; off by |t - 0.5|, E[(t - 0.5)^2] under
  the configured time distribution (uniform: 1/12)."""
  x0, e, t = np.float32(0.4), np.float32(-1.3), jnp.array([0.3])
  x_t, v = flow.interpolate(jnp.full((1, 1), x0), jnp.full((1, 1), e), t)
  np.testing.assert_allclose(x_t, [[(1 - 0.3) * x0 + 0.3 * e]], rtol=1e-6)
  h = 1e-3  # The target is the line's derivative in t.
  ahead, _ = flow.interpolate(jnp.full((1, 1), x0), jnp.full((1, 1), e), t + h)
  np.testing.assert_allclose((ahead - x_t) / h, v, rtol=1e-3)
  batch, labels, weight = constant_batch(16)
  overrides = {"objective.time_sampling": time_sampling}
  loss = oracle_step_loss("flow_mnist", {"name": "oracle_flow"}, batch, **overrides)
  np.testing.assert_allclose(loss, np.sum(weight * COSTS[labels]) / np.sum(weight), rtol=2e-4)
  big, _, _ = constant_batch(4096, weighted=False)
  loss = oracle_step_loss("flow_mnist", {"name": "oracle_flow", "offset": "time"}, big,
                          **overrides)
  u = np.random.default_rng(0).standard_normal(400_000)
  want = 1 / 12 if time_sampling == "uniform" else np.mean((1 / (1 + np.exp(-u)) - 0.5)**2)
  assert abs(loss - want) < 0.06 * want, (loss, want)


class GaussianEDM(unet.UNet):
  """The EDM network F whose D is the ideal denoiser of N(MU, SD^2) data (edm column)."""

  out_channels: int = 1

  @nn.compact
  def __call__(self, x_in, c_noise, labels=None, train=False):
    self.param("unused", nn.initializers.zeros, (1,))
    sigma = jnp.exp(4 * c_noise)[:, None, None, None]
    sd = 0.5
    c_skip, c_out, c_in = (sd**2 / (sigma**2 + sd**2), sigma * sd / jnp.sqrt(sigma**2 + sd**2),
                           1 / jnp.sqrt(sigma**2 + sd**2))
    x = x_in / c_in
    d = (SD**2 * x + sigma**2 * MU) / (SD**2 + sigma**2)
    return (d - c_skip * x) / c_out


class GaussianFlow(unet.UNet):
  """The exact velocity of the linear interpolant of N(MU, SD^2) data."""

  out_channels: int = 1

  @nn.compact
  def __call__(self, x, time, labels=None, train=False):
    self.param("unused", nn.initializers.zeros, (1,))
    t = (time / 1000.0)[:, None, None, None]
    var = (1 - t) ** 2 * SD**2 + t**2
    return -MU + (t - (1 - t) * SD**2) / var * (x - (1 - t) * MU)


models.MODELS.register("gaussian_edm")(lambda spec: GaussianEDM())
models.MODELS.register("gaussian_flow")(lambda spec: GaussianFlow())


def config_samples(config_name, network, **overrides):
  """Samples (8 images of 784 independent pixels) and their latents, from the objective
  that ``config_name``'s smoke config builds around the closed-form ``network``."""
  config = load_config(config_name, "smoke", **overrides)
  config.model = {"name": network}
  exp = experiment.setup(config)
  state = jax.jit(exp.objective.init)(exp.init_rng)
  z = jax.random.normal(jax.random.key(1), (8, exp.objective.latent_dim))
  x = jax.jit(exp.objective.decode)(state, z, jnp.zeros(8, jnp.int32))
  return np.asarray(x).ravel(), np.asarray(z).ravel()


def edm_samples(steps, heun=True, churn=0.0):
  return config_samples("edm_mnist", "gaussian_edm", **{
      "objective.sample_steps": steps, "objective.sampler": "heun" if heun else "euler",
      "objective.s_churn": churn})


def flow_samples(sampler, steps):
  return config_samples("flow_mnist", "gaussian_flow", **{
      "objective.sample_steps": steps, "objective.sampler": sampler,
      "objective.sample_tol": 1e-5})


def unclipped_error(x, want):
  """The largest error among the samples that the samplers' final clip to [-1, 1] spares."""
  inside = np.abs(want) < 0.98
  return np.max(np.abs(x - want)[inside])


def test_edm_samplers_draw_the_gaussian_and_heun_converges_at_second_order():
  """Heun's deterministic sampler follows the ODE's closed-form map, its error falling about
  4x per doubling of the steps (measured 5.4x, 4.4x; Euler's: 2x, measured 1.9x, 2.0x);
  the stochastic sampler (S_churn = 40, 72 steps) draws N(MU, SD^2): mean and std within
  0.01 (measured 0.003)."""
  def error(steps, heun):
    x, z = edm_samples(steps, heun)
    want = MU + (80 * z - MU) * SD / math.sqrt(SD**2 + 80**2)
    return unclipped_error(x, want)
  heun = [error(n, True) for n in (9, 18, 36)]
  euler = [error(n, False) for n in (18, 36)]
  assert heun[1] < 0.06 and heun[0] / heun[1] > 3 and heun[1] / heun[2] > 3, heun
  assert 1.6 < euler[0] / euler[1] < 2.6 and euler[1] > 3 * heun[2], euler
  x, _ = edm_samples(72, churn=40.0)
  assert abs(x.mean() - MU) < 0.01 and abs(x.std() - SD) < 0.01, (x.mean(), x.std())
  deterministic, _ = edm_samples(72)
  assert np.mean(np.abs(x - deterministic)) > 0.02  # The churn's noise was really added.


def test_flow_samplers_follow_the_transport_map():
  """From z, the ODE's end is MU + SD z: Heun (2N - 1 evaluations) converges at second
  order (measured 4.0x per doubling), Euler at first (1.9x) and, at the same 35-36
  evaluations, less accurately; the adaptive Tsit5 to the tolerance."""
  def error(sampler, steps):
    x, z = flow_samples(sampler, steps)
    return unclipped_error(x, MU + SD * z)
  heun = [error("heun", n) for n in (9, 18)]
  euler = [error("euler", n) for n in (18, 36)]
  assert heun[1] < 0.03 and heun[0] / heun[1] > 3, heun
  assert 1.6 < euler[0] / euler[1] < 2.6 and euler[1] > 1.5 * heun[1], euler
  assert error("adaptive", 1) < 1e-3


def test_the_ode_likelihood_is_the_exact_gaussian_density():
  """Flow: log p of x under the ODE of the exact velocity is log N(x; MU, SD^2) per pixel
  (Rademacher probes are exact for this diagonal Jacobian). EDM: the objective's ``nll``
  (dequantized 8-bit images, the ODE in ln sigma) is -log N(x_deq; MU, SD^2 + sigma_min^2)
  + D ln 127.5."""
  x = MU + SD * jax.random.normal(jax.random.key(2), (6, 2, 2, 1))
  model = GaussianFlow()
  params = model.init(jax.random.key(0), x, jnp.zeros(6))["params"]
  drift = lambda y, t: model.apply({"params": params}, y, jnp.full((6,), 1000.0 * t))
  logp, nfe = ode.log_likelihood(drift, x, 0.0, 1.0, lambda z: ode.gaussian_logp(z, 1.0),
                                 jax.random.key(3))
  want = stats.norm(MU, SD).logpdf(np.asarray(x)).reshape(6, -1).sum(1)
  np.testing.assert_allclose(logp, want, rtol=1e-4)
  assert 10 < int(nfe) < 2000
  gauss = GaussianEDM()
  state = {"ema": gauss.init(jax.random.key(0), x, jnp.zeros(6))["params"]}
  images = jnp.round((x + 1) * 127.5) / 127.5 - 1
  keys = jax.random.split(jax.random.key(4), 6)
  terms = edm.nll(state, {"image": images}, keys, 1, model=gauss, precond=edm.Precond("edm"),
                  sigma_min=0.002, sigma_max=80.0, probes=1, tol=1e-5)
  deq = ode.dequantized(images, jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys))
  want = -stats.norm(MU, math.sqrt(SD**2 + 0.002**2)).logpdf(np.asarray(deq)).reshape(
      6, -1).sum(1) + 4 * math.log(127.5)
  np.testing.assert_allclose(terms["nll"], want, rtol=1e-3)


@pytest.mark.parametrize("config_name", ["edm_mnist", "flow_mnist"])
def test_guidance_extrapolates_from_the_unconditional_output(config_name):
  """One Euler step from the prior makes the sample affine in the network's output, so the
  guided sample is (1 + w) x(y) - w x(no label), x(.) the unguided samples."""
  base = {"objective.sampler": "euler", "objective.sample_steps": 1}
  def decode(w, labels):
    config = load_config(config_name, "smoke", **{"model.conditional": True,
                                                  "objective.guidance": w, **base})
    exp = experiment.setup(config)
    state = jax.jit(exp.objective.init)(exp.init_rng)
    noise = jax.tree.map(lambda p: 0.05 * jax.random.normal(jax.random.key(5), p.shape),
                         state["ema"])
    state = {**state, "ema": jax.tree.map(jnp.add, state["ema"], noise)}
    z = 0.01 * jax.random.normal(jax.random.key(6), (4, exp.objective.latent_dim))
    return np.asarray(jax.jit(exp.objective.decode)(state, z, labels))
  y = jnp.array([1, 3, 5, 7])
  cond, uncond = decode(0.0, y), decode(0.0, jnp.full(4, 10))
  assert np.max(np.abs(cond - uncond)) > 1e-3
  assert np.max(np.abs(cond)) < 0.9  # Nothing clipped: the identity is exact.
  np.testing.assert_allclose(decode(2.0, y), 3 * cond - 2 * uncond, atol=2e-5)


@pytest.mark.parametrize("arg", ["objective=edm,smoke", "objective=flow,smoke"])
def test_the_family_trains_resumes_exactly_and_evaluates_its_likelihood(arg, tmp_path):
  """Through the loop (on the DiT, which compiles in seconds; the U-Net's loop is
  test_diffusion.py's): conditional, stopped at step 1 and resumed, ends bit-identical to
  the uninterrupted run (EDM; flow matching's step is the same ``denoising.train_step``
  around another loss, and the suite's time is short); sampling writes a trajectory, and
  evaluation gives finite bits/dim from the ODE likelihood."""
  config = load_config("dit_mnist", arg, **{"model.conditional": True,
                                            "train.num_steps": 2, "log.every_steps": 1,
                                            "train.checkpoint_every_steps": 2,
                                            "eval.metrics": ("likelihood",)})
  straight = str(tmp_path / "straight")
  summary = train.train_and_evaluate(config, straight)
  assert summary["final_step"] == 2
  if "edm" in arg:
    assert_resume_is_exact(config, tmp_path, 1, straight)
  from fairgen.evaluation import modes
  files = modes.sample(config, straight)
  assert any(f.endswith("trajectory.png") for f in files)
  bits = modes.evaluate(config, straight)["metrics"]["bits_per_dim"]
  assert np.isfinite(bits) and bits > 0


@pytest.mark.parametrize("model", ["edm", "flow"])
def test_fair_mnist_wires_the_group_conditional_method_into_the_new_families(model):
  """fair_mnist's conditional method on EDM and flow matching: a network conditioned on the
  group (``attr``), labels drawn from the target at sampling; one step takes the groups."""
  config = load_config("fair_mnist", f"method=conditional,model={model},smoke",
                       **{"fair.target": (0.25, 0.75)})
  exp = experiment.setup(config)
  assert exp.objective.num_classes == 2 and exp.objective.condition_key == "attr"
  assert exp.objective.label_probs == (0.25, 0.75)
  state = jax.jit(exp.objective.init)(jax.random.key(0))
  batch = {"image": np.zeros((4, 28, 28, 1), np.float32), "attr": np.array([0, 1, 0, 1]),
           "label": np.zeros(4, np.int32)}
  _, metrics = jax.jit(exp.objective.train_step)(state, batch, jax.random.key(1))
  assert np.isfinite(float(metrics["loss"]))


def test_dp_diffusion_averages_each_examples_loss_over_its_noise_draws(monkeypatch):
  """DPDM's noise multiplicity: inside the private step each example's loss is computed on
  ``noise_multiplicity`` copies of it (each with its own noise level and noise, drawn from
  one key) and averaged before its gradient is clipped."""
  seen = []
  original = edm.per_example_loss

  def spy(model, params, x0, labels, rng, **kwargs):
    out = original(model, params, x0, labels, rng, **kwargs)
    seen.append((x0.shape, out.shape))
    return out

  monkeypatch.setattr(edm, "per_example_loss", spy)
  config = load_config("dp_diffusion_mnist", "smoke", **{"objective.noise_multiplicity": 3})
  config.model = {"name": "dit", "patch": 7, "hidden": 32, "depth": 1, "heads": 2,
                  "conditional": True}
  exp = experiment.setup(config)
  state = jax.eval_shape(exp.objective.init, jax.random.key(0))
  n = config.train.batch_size
  batch = {"image": np.zeros((n, 28, 28, 1), np.float32), "label": np.zeros(n, np.int32),
           "mask": np.ones(n, np.float32)}
  jax.eval_shape(exp.objective.train_step, state, batch, jax.random.key(1))
  assert seen and all(x == (3, 28, 28, 1) and out == (3,) for x, out in seen), seen
  sigmas = edm.Precond().training_sigma(jax.random.key(2), 3)
  assert len(np.unique(np.asarray(sigmas))) == 3  # One key, three noise levels.


def test_dit_edm_on_eight_fsdp_devices_matches_one_and_trains_in_bf16(tmp_path,
                                                                    partitionable_rng):
  """The conditional DiT under EDM on 1 device and on 8 with FSDP-sharded parameters: the
  same losses, parameters, EMA and Heun samples (to float32 reduction order); and in
  bfloat16 (parameters and optimizer state float32) the first losses within 5% of float32's."""
  from conftest import final_state
  from fairgen import sampling
  assert jax.device_count() == 8
  results = {}
  for n, fsdp, dtype in ((1, False, "float32"), (8, True, "float32"), (1, False, "bfloat16")):
    config = load_config("dit_mnist", "smoke,conditional", **{
        "mesh.data": n, "mesh.fsdp": fsdp, "model.dtype": dtype, "train.num_steps": 2,
        "train.checkpoint_every_steps": 2, "log.every_steps": 1})
    workdir = str(tmp_path / f"d{n}{fsdp}{dtype}")
    summary = train.train_and_evaluate(config, workdir)
    exp = experiment.setup(config)
    _, leaves = final_state(workdir, config)
    state = jax.device_put(jax.tree.unflatten(jax.tree.structure(exp.abstract_state), leaves),
                           exp.state_shardings)
    if fsdp:
      assert any(not s.is_fully_replicated for s in jax.tree.leaves(exp.state_shardings))
    images, _ = sampling.generate_images(exp, state, jax.random.key(0), 16)
    results[n, dtype] = summary["scalars"], leaves, np.asarray(images)
  (s1, p1, i1), (s8, p8, i8) = results[1, "float32"], results[8, "float32"]
  np.testing.assert_allclose(s8["loss"], s1["loss"], rtol=1e-4)
  for a, b in zip(p1, p8, strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(i8, i1, atol=1e-4)
  s16, p16, _ = results[1, "bfloat16"]
  assert all(x.dtype != jnp.bfloat16 for x in p16 if x.dtype.kind == "f")
  assert abs(s16["loss"] - s1["loss"]) < 0.05 * s1["loss"]


def test_the_nfe_sweep_spends_each_budget_and_refuses_bad_input(capsys):
  """tools/nfe_sweep.py: Heun's 2N - 1 evaluations (a budget of 10 is 9), Euler's N; the
  table marks a budget it could not spend exactly; bad flags are one line, exit status 2."""
  import os
  from conftest import REPO
  from fairgen import cli
  sweep = cli.load_module(os.path.join(REPO, "tools", "nfe_sweep.py"))
  assert [sweep.steps_for("heun", b) for b in (1, 5, 10, 35)] == [1, 3, 5, 18]
  assert [sweep.EVALUATIONS["heun"](sweep.steps_for("heun", b)) for b in (5, 10, 35)] == [
      5, 9, 35]
  assert sweep.steps_for("euler", 10) == 10
  text = sweep.table({"heun": [(5, 80.04), (9, 50.0)]}, [5, 10])
  assert "| heun | 80.0 | 50.0 (9) |" in text
  for argv in (["--config=x.py", "--workdir=w", "--nfe=5,x"],
               ["--config=x.py", "--workdir=w", "--nfe=0"]):
    with pytest.raises(SystemExit) as e:
      sweep.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fairgen: error: --nfe"), err


def test_the_edm_cifar10_network_has_the_papers_55_73m_parameters_and_trains(tmp_path):
  """edm_cifar10.py's DDPM++ at 32x32x3: 55,732,739 parameters, Karras et al.'s 55.73M
  (Table 7); its smoke variant trains on CIFAR-10-shaped TFDS mock records (the ODE
  likelihood through it: the DiT families' test, which compiles in a fraction of the time)."""
  import tensorflow_datasets as tfds
  config = load_config("edm_cifar10", None)
  model = experiment.build_model(config, type("Spec", (), {
      "image_shape": (32, 32, 3), "num_classes": 10, "num_groups": 0, "name": "cifar10"})())
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                             jnp.zeros((1,))))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 55_732_739
  config = load_config("edm_cifar10", "smoke")
  workdir = str(tmp_path / "run")
  with tfds.testing.mock_data(num_examples=64):
    summary = train.train_and_evaluate(config, workdir)
  assert summary["final_step"] == config.train.num_steps and np.isfinite(
      summary["scalars"]["loss"])


@pytest.mark.parametrize("name,key,value,fragment", [
    ("unet", "ch_mult", (1, 0), "model.ch_mult must be positive integers, got (1, 0)."),
    ("unet", "attn_resolutions", (7, "a"), "model.attn_resolutions must be positive integers"),
    ("unet", "attn_resolutions", (5,), "model.attn_resolutions [5] are not sides the U-Net"),
    ("ddpmpp", "ch_mult", (), "model.ch_mult must be positive integers, got ()."),
    ("ddpmpp", "attn_resolutions", (15,),
     "model.attn_resolutions [15] are not sides DDPM++ runs at (28, 14)."),
])
def test_impossible_unet_and_ddpmpp_shapes_are_refused_in_one_line(name, key, value, fragment):
  """The two convolutional denoisers share their checks of ``ch_mult`` and
  ``attn_resolutions``; an attention side the network never reaches is refused, not
  silently left without attention."""
  from fairgen import data
  from fairgen.config import ConfigError
  import ml_collections
  spec = data.load(load_config("edm_mnist", "smoke").data, "test").spec
  model = dict(name=name, ch=8, ch_mult=(1, 2), attn_resolutions=(14,))
  model[key] = value
  with pytest.raises(ConfigError) as info:
    models.build(ml_collections.ConfigDict(model), spec)
  assert fragment in str(info.value) and "\n" not in str(info.value)
