"""The GAN step's features, as the config names them, through the step it builds.

A toy pair of networks is registered as a model (``models.MODELS``), so that every quantity
the step computes has a closed form: the generator's fakes are a learnable constant image
``c * 1`` (``c = 0`` at init: all zeros), and the critic is ``D(x) = w / 2 * |x|^2 + b``
(``w = 1``, ``b = 0`` at init), whose input gradient ``w x`` has norm ``|w| |x|``: it differs
between the reals (norm R), the fakes (0) and every interpolate ``u x`` (``u R``). The config
is the smoke DCGAN's with ``model.name`` set to the toy; everything else (losses,
regularisers, augmentation, EMA, optimizers) is what ``experiment.setup`` builds from it.

The gradient a step applied is read back from the Adam state (``mu = (1 - b1) g`` after one
update from zeros); the losses and penalties from the step's metrics.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from conftest import load_config
from fairgen import experiment
from fairgen import models

P_FALSE = 1e-7
SIDE = 28
PIXELS = SIDE * SIDE


class ConstantGenerator(nn.Module):
  """Fakes ``c * ones`` (a learnable scalar ``c``, 0 at init), whatever the latents."""

  image_shape: tuple

  @nn.compact
  def __call__(self, z, y, train=False):
    del y, train
    c = self.param("c", nn.initializers.zeros, ())
    return c * jnp.ones((z.shape[0],) + tuple(self.image_shape))


class QuadraticCritic(nn.Module):
  """``D(x) = w / 2 * |x|^2 + b`` per example (``w = 1``, ``b = 0`` at init)."""

  @nn.compact
  def __call__(self, x, y, train=False):
    del y, train
    w = self.param("w", nn.initializers.ones, ())
    b = self.param("b", nn.initializers.zeros, ())
    return 0.5 * w * jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=-1) + b


class LinearCritic(nn.Module):
  """``D(x) = <k, x> + b`` with a Dense kernel of 0.1 everywhere: ``|k|^2 = 0.01 P``."""

  @nn.compact
  def __call__(self, x, y, train=False):
    del y, train
    dense = nn.Dense(1, kernel_init=nn.initializers.constant(0.1))
    return dense(x.reshape(x.shape[0], -1))[:, 0]


@models.MODELS.register("toy_linear_gan")
def build_linear_toy(spec, latent_dim: int = 4) -> models.GanModules:
  """The constant generator and a linear critic (a kernel for spectral norm to divide)."""
  return models.GanModules(ConstantGenerator(tuple(spec.image_shape)), LinearCritic(),
                           latent_dim, 0)


@models.MODELS.register("toy_quadratic_gan")
def build_toy(spec, latent_dim: int = 4) -> models.GanModules:
  """The toy pair for data of ``spec``."""
  return models.GanModules(ConstantGenerator(tuple(spec.image_shape)), QuadraticCritic(),
                           latent_dim, 0)


def toy_config(batch_size=16, model="toy_quadratic_gan", **objective):
  """The smoke DCGAN config with the toy nets and these objective keys."""
  config = load_config("dcgan_mnist", "smoke", **{"train.batch_size": batch_size})
  config.model = {"name": model, "latent_dim": 4}
  config.objective.update({"label_smoothing": 0.0, "standing_stats": 0, **objective})
  for net in ("gen", "disc"):  # Constant learning rates: some tests start at step 10^6.
    config.optim[net].linear_decay_steps = 0
  return config


def constant_reals(values):
  """Real images, each constant: ``values[i]`` at every pixel (norm ``28 |values[i]|``)."""
  values = np.asarray(values, np.float32)
  return {"image": np.broadcast_to(values[:, None, None, None], (len(values), SIDE, SIDE, 1)
                                   ).copy(), "label": np.zeros(len(values), np.int32)}


def build(config):
  exp = experiment.setup(config)
  state = jax.device_get(jax.jit(exp.objective.init)(exp.init_rng))
  return exp, state


def d_grad(state, new_state, b1):
  """The discriminator's gradient ``(dL/dw, dL/db)`` applied by the step (one update)."""
  mu = new_state["disc"]["opt"][0].mu
  return {k: float(v) / (1 - b1) for k, v in mu.items()}


def keyed_steps(exp, state, batch, keys):
  """The new states and metrics of one step from ``state`` under each of ``keys``."""
  run = jax.jit(jax.vmap(lambda k: exp.objective.train_step(state, batch, k)))
  return jax.device_get(run(keys))


# --- The gradient penalty: at per-example interpolates of reals and fakes. ----------------


def test_the_gradient_penalty_is_taken_at_per_example_interpolates():
  """WGAN-GP, reals of norm R = 2, fakes 0, w = 1: the penalty of example i is
  ``(u_i R - 1)^2`` with its own ``u_i ~ U(0, 1)``. Over 1,024 keys its batch mean has mean
  ``R^2/3 - R + 1 = 1/3`` and variance ``(4/45) / B``; at the reals it would be 1, at the
  fakes 1, and with one mix for the whole batch its variance would be B times larger. The
  penalty enters D's loss times ``gp_weight``: E[dL/dw] = -R^2/2 + 10 (2 R^2/3 - R) = 14/3."""
  batch_size, keys = 16, 1024
  config = toy_config(batch_size, loss="wasserstein", gp_weight=10.0)
  exp, state = build(config)
  batch = constant_reals(np.full(batch_size, 2.0 / SIDE))
  new, metrics = keyed_steps(exp, state, batch, jax.random.split(jax.random.key(0), keys))
  gp = np.asarray(metrics["gp"], np.float64)
  var = 4 / 45 / batch_size
  z = stats.norm.isf(P_FALSE / 2)
  assert abs(gp.mean() - 1 / 3) < z * math.sqrt(var / keys), gp.mean()
  low, high = (stats.chi2.ppf(P_FALSE / 2, keys - 1) / (keys - 1),
               stats.chi2.isf(P_FALSE / 2, keys - 1) / (keys - 1))
  # The sample variance of a sum of 16 bounded terms: near-Gaussian, so the chi-square
  # bounds (widened by half for its kurtosis) hold; one mix would be 16x.
  assert low / 1.5 < gp.var(ddof=1) / var < high * 1.5, gp.var(ddof=1) / var
  dw = np.asarray(new["disc"]["opt"][0].mu["w"], np.float64) / (1 - config.optim.disc.b1)
  # d/dw of example i's penalty at w = 1 is 8 u^2 - 4 u: mean 2/3, variance 76/45.
  spread = 10 * math.sqrt(76 / 45 / batch_size)
  assert abs(dw.mean() - 14 / 3) < z * spread / math.sqrt(keys), dw.mean()


def test_r1_is_taken_at_the_reals_and_lazily_every_k_steps():
  """R1 = |w x|^2 = w^2 R^2 = 4 at the reals (at fakes 0, at interpolates random), and
  ``gamma / 2 * k * R1`` enters D's loss on steps divisible by k = ``r1_every``:
  dL/dw = -R^2/2 + gamma k w R^2 there, -R^2/2 on the others."""
  config = toy_config(loss="wasserstein", r1_gamma=3.0, r1_every=4)
  exp, state = build(config)
  batch = constant_reals(np.full(16, 2.0 / SIDE))
  b1 = config.optim.disc.b1
  for step, want in ((0, -2 + 3.0 * 4 * 4), (1, -2.0), (8, -2 + 3.0 * 4 * 4)):
    start = dict(state, step=np.int32(step))
    new, metrics = jax.jit(exp.objective.train_step)(start, batch, jax.random.key(0))
    assert d_grad(start, jax.device_get(new), b1)["w"] == pytest.approx(want, rel=1e-4)
    if step % 4 == 0:
      assert float(metrics["r1"]) == pytest.approx(4.0, rel=1e-5)


def test_spectral_norm_divides_the_critic_the_config_names():
  """``spectral_norm='disc'``: D is applied with ``k / |k|`` (the power iteration is exact
  for a one-output kernel), so R1 = |k / |k||^2 = 1; without it R1 = |k|^2 = 0.01 P."""
  r1 = {}
  for nets in ("disc", ""):
    config = toy_config(model="toy_linear_gan", loss="wasserstein", r1_gamma=1.0,
                        spectral_norm=nets)
    exp, state = build(config)
    assert ("spectral" in state) == bool(nets)
    _, metrics = jax.jit(exp.objective.train_step)(
        state, constant_reals(np.full(16, 0.1)), jax.random.key(0))
    r1[nets] = float(metrics["r1"])
  assert r1["disc"] == pytest.approx(1.0, rel=1e-4)
  assert r1[""] == pytest.approx(0.01 * PIXELS, rel=1e-4)


# --- The loss family, label smoothing, importance weights. ---------------------------------


def softplus(x):
  return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


REAL_TERMS = {  # Per-example real terms of D(x) = l, and fake terms at D(0) = 0.
    "nonsaturating": (lambda l: softplus(-l), softplus(0.0)),
    "wasserstein": (lambda l: -l, 0.0),
    "hinge": (lambda l: max(0.0, 1 - l), 1.0),
    "ls": (lambda l: 0.5 * (l - 1) ** 2, 0.0),
}


@pytest.mark.parametrize("loss", sorted(REAL_TERMS))
def test_importance_weights_reach_the_real_term_of_every_loss(loss):
  """Reals of different norms, D(x_i) = |x_i|^2 / 2: ``d_loss = sum_i w_i real(l_i) /
  sum_i w_i + fake(0)`` for each loss family, with the batch's importance weights."""
  config = toy_config(8, loss=loss)
  exp, state = build(config)
  values = np.linspace(0.02, 0.09, 8)
  batch = constant_reals(values)
  batch["weight"] = np.array([0.2, 3.0, 1.0, 0.5, 2.0, 0.1, 1.5, 4.0], np.float32)
  _, metrics = jax.jit(exp.objective.train_step)(state, batch, jax.random.key(0))
  real, fake = REAL_TERMS[loss]
  logits = 0.5 * PIXELS * values ** 2
  want = sum(w * real(l) for w, l in zip(batch["weight"], logits)) / batch["weight"].sum()
  assert float(metrics["d_loss"]) == pytest.approx(want + fake, rel=1e-5)


def test_label_smoothing_is_the_configs_target_for_reals():
  """One-sided smoothing alpha: the real term is ``(1 - a) softplus(-l) + a softplus(l)``."""
  alpha = 0.2
  config = toy_config(loss="nonsaturating", label_smoothing=alpha)
  exp, state = build(config)
  _, metrics = jax.jit(exp.objective.train_step)(
      state, constant_reals(np.full(16, 0.1)), jax.random.key(0))
  l = 0.5 * PIXELS * 0.01
  want = (1 - alpha) * softplus(-l) + alpha * softplus(l) + softplus(0.0)
  assert float(metrics["d_loss"]) == pytest.approx(want, rel=1e-5)


# --- DiffAugment: what D sees in both updates, and nothing else. ---------------------------


def test_diffaugment_cuts_out_what_d_sees_and_leaves_r1_the_raw_reals():
  """``cutout`` zeroes a square of up to 14 x 14 pixels of every image D sees, so with
  constant reals of value a the real critic values drop from ``a^2 P / 2`` by 0..98 a^2 per
  image: the Wasserstein ``d_loss`` rises above ``-a^2 P / 2``. R1 still sees the raw reals
  (exactly ``a^2 P``). G's update sees cut fakes: with c = 0.5 its gradient ``-w c (P -
  cut)`` (w after D's update) is smaller in size than the uncut ``w c P``."""
  a = 0.1
  results = {}
  for policy in ("", "cutout"):
    config = toy_config(loss="wasserstein", diffaugment=policy, r1_gamma=1.0)
    exp, state = build(config)
    state["gen"]["params"]["c"] = np.float32(0.5)
    new, metrics = jax.jit(exp.objective.train_step)(
        state, constant_reals(np.full(16, a)), jax.random.key(0))
    new = jax.device_get(new)
    # G's update sees D after D's update: w' (Adam moved w by the learning rate).
    g_c = float(new["gen"]["opt"][0].mu["c"]) / (1 - config.optim.gen.b1)
    results[policy] = (float(metrics["d_loss"]), float(metrics["r1"]),
                       g_c / float(new["disc"]["params"]["w"]))
  plain, cut = results[""], results["cutout"]
  fake_plain = 0.5 * 0.25 * PIXELS  # D(c * 1) = c^2 P / 2 (D's update sees the old c = 0.5).
  r1_term = 0.5 * a ** 2 * PIXELS  # gamma / 2 * R1, R1 = a^2 P at the raw reals.
  assert plain[0] == pytest.approx(-0.5 * a ** 2 * PIXELS + fake_plain + r1_term, rel=1e-5)
  assert plain[1] == pytest.approx(a ** 2 * PIXELS, rel=1e-5) == cut[1]
  assert plain[2] == pytest.approx(-0.5 * PIXELS, rel=1e-4)
  lost_real_and_fake = cut[0] - plain[0]  # Reals lose 0..98 a^2; fakes lose 0..98 c^2 / 1.
  # A cut square holds 49..196 pixels: the reals' term rises by a^2/2 per pixel cut, the
  # fakes' falls by c^2/2 = 1/8 per pixel cut. Without fakes cut it would be > 0.
  assert -196 / 8 - 1e-4 < lost_real_and_fake < 196 * a ** 2 / 2 - 49 / 8
  assert -0.5 * PIXELS < cut[2] < -0.5 * (PIXELS - 14 * 14) + 1e-4


# --- The EMA's decay, and TTUR's two learning rates. --------------------------------------


def test_the_ema_decays_at_the_configs_rate():
  """Past the warm-up (step 10^6), ``ema' = d ema + (1 - d) params'`` with d = ema_decay."""
  config = toy_config(loss="wasserstein", ema_decay=0.63)
  exp, state = build(config)
  state = dict(state, step=np.int32(10 ** 6))
  state["gen"]["params"]["c"] = np.float32(0.5)
  state["ema"] = {"c": np.float32(-1.0)}
  new = jax.device_get(jax.jit(exp.objective.train_step)(
      state, constant_reals(np.full(16, 0.1)), jax.random.key(0))[0])
  c = float(new["gen"]["params"]["c"])
  assert c != 0.5
  assert float(new["ema"]["c"]) == pytest.approx(0.63 * -1.0 + 0.37 * c, rel=1e-6)


def test_the_two_nets_step_with_their_own_learning_rates():
  """TTUR: Adam's first update is ``-lr g / (|g| + eps)``, so each parameter moves by its
  own net's learning rate (optim.gen.lr for c, optim.disc.lr for w)."""
  config = toy_config(loss="wasserstein")
  config.optim.gen.lr, config.optim.disc.lr = 7e-3, 3e-4
  exp, state = build(config)
  state["gen"]["params"]["c"] = np.float32(0.5)
  new = jax.device_get(jax.jit(exp.objective.train_step)(
      state, constant_reals(np.full(16, 0.1)), jax.random.key(0))[0])
  for net, name, lr in (("gen", "c", 7e-3), ("disc", "w", 3e-4)):
    moved = abs(float(new[net]["params"][name]) - float(state[net]["params"][name]))
    assert moved == pytest.approx(lr, rel=1e-3), (net, name, moved)
