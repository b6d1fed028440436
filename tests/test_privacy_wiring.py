"""DP-SGD as every private step wires it, measured through the step a config builds.

``test_privacy.py`` checks ``dpsgd.private_gradient`` against its definition. These check
that each private objective hands it the config's mechanism, by looking only at what the
real jitted step does to the state:

- the gradient a step applied is read back from its Adam state (``mu' = b1 mu + (1 - b1) g``),
  so the update's deviation from the same step without noise (the same config with
  ``privacy.noise_multiplier=0``: the same per-example keys and clipped sum) is exactly the
  noise, whose standard deviation must be ``sigma * C * W / E`` (a chi-square test over
  thousands of coordinates);
- an example's contribution is the change of that gradient when its mask bit is switched
  off (with the noise on: the same key draws the same noise), which must have norm ``C *
  w / E`` for examples whose gradient exceeds ``C`` (all of them, at the configs' small C);
- rows outside the Poisson draw (mask 0) may hold anything: the new state is bit-identical;
- epsilon is dp-accounting's for the config's ``(q = E / N, sigma, steps * draws, delta)``,
  computed here directly from the config, not through ``fairgen.privacy``.

The privacy values are chosen unlike any default (C = 0.01, sigma = 1.7, E = 11), so a step
that used a default instead of the config would fail. Each statistical check has a false
failure probability of ``P_FALSE`` (two-sided); no test makes more than four, so each test
fails by chance with probability below 1e-6, and the seeds are fixed.
"""

import dataclasses
import math

import dp_accounting
import jax
import numpy as np
import optax
import pytest
from dp_accounting import pld
from scipy import stats

from conftest import load_config
from fairgen import data, experiment, privacy
from fairgen.classifiers import fit
from fairgen.fairness import importance
from fairgen.privacy import accounting

P_FALSE = 1e-7
CLIP, SIGMA, EXPECTED = 0.01, 1.7, 11
PRIVATE = {"privacy.clip_norm": CLIP, "privacy.noise_multiplier": SIGMA,
           "privacy.target_epsilon": 0.0, "privacy.expected_batch_size": EXPECTED}


# --- Reading a step's gradient back from its Adam state. -----------------------------------


def adam_state(opt_state):
  """The ``ScaleByAdamState`` inside an optax state (adam, adamw, chained)."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(
      s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  assert len(found) == 1, f"expected one Adam state, found {len(found)}"
  return found[0]


def applied_gradient(opt_before, opt_after, b1):
  """The gradient an Adam update took, flattened: ``(mu' - b1 mu) / (1 - b1)``."""
  before, after = adam_state(opt_before).mu, adam_state(opt_after).mu
  parts = [(np.asarray(a, np.float64) - b1 * np.asarray(m, np.float64)) / (1 - b1)
           for m, a in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)]
  return np.concatenate([p.reshape(-1) for p in parts])


def check_gaussian(deviation, std):
  """``deviation`` is i.i.d. N(0, std^2): its sum of squares and its mean, each at P_FALSE."""
  n = deviation.size
  # At n = 1,000 the accepted range of the measured std is about +-12%: a noise scaled by
  # any wrong factor in the mechanism (E, C, sigma, 2) is refused.
  assert n >= 1000, f"only {n} coordinates: too few for the test's power"
  ss = float(np.sum((deviation / std) ** 2))
  low, high = stats.chi2.ppf(P_FALSE / 2, n), stats.chi2.isf(P_FALSE / 2, n)
  measured = float(np.sqrt(np.mean(deviation ** 2)))
  assert low < ss < high, (f"noise std {measured:.4g}, expected {std:.4g} (ratio "
                           f"{measured / std:.3f}; accepted {math.sqrt(low / n):.3f}.."
                           f"{math.sqrt(high / n):.3f})")
  z = abs(float(np.mean(deviation))) * math.sqrt(n) / std
  assert z < stats.norm.isf(P_FALSE / 2), f"noise mean is {z:.1f} standard errors off 0"


# --- The private steps, as configs build them. ---------------------------------------------


@dataclasses.dataclass
class Case:
  """A private objective: its config, its batch, and where its private optimizer state is."""

  config: object
  batch_fn: object  # (source, rows, batch_size, rng) -> batch (without mask)
  opt_path: tuple  # Path of the private network's optimizer state in the state.
  b1: float
  weight_bound: float = 1.0
  keys: int = 1  # Step keys to vmap over (networks too small for one draw to test).


def image_batch(source, rows, _, rng):
  del rng
  out = source.get(rows)
  return {"image": out["image"], "label": out["label"].astype(np.int32)}


def weighted_image_batch(source, rows, size, rng):
  out = image_batch(source, rows, size, rng)
  out["attr"] = source.get(rows)["attr"].astype(np.int32)
  out["weight"] = rng.uniform(0.25, 4.0, size).astype(np.float32)  # Within fair.clip = 4.
  return out


def table_batch(source, rows, _, rng):
  del rng
  out = source.get(rows)
  return {k: out[k] for k in ("features", "label", "attr")}


def case(name):
  """The ``Case`` called ``name``."""
  if name == "vae":
    config = load_config("dp_vae_mnist", "smoke", **PRIVATE)
    return Case(config, image_batch, ("opt",), config.optim.b1)
  if name == "gan":
    config = load_config("dp_dcgan_mnist", "smoke", **PRIVATE)
    return Case(config, image_batch, ("disc", "opt"), config.optim.disc.b1)
  if name == "weighted_gan":  # Importance weights scale the clipped gradients (W = fair.clip).
    config = load_config("fair_mnist", "method=importance,smoke", **{"fair.clip": 4.0,
                                                                     "eval.every_steps": 0})
    config.privacy = privacy.section(**{k.split(".")[1]: v for k, v in PRIVATE.items()})
    return Case(config, weighted_image_batch, ("disc", "opt"), config.optim.disc.b1, 4.0)
  if name in ("debias", "debias_plain"):  # The adversary's (the predictor's) update.
    config = load_config("dp_adult_debias", "plain,smoke" if name == "debias_plain" else "smoke",
                         **PRIVATE)
    path = ("pred", "opt") if name == "debias_plain" else ("adv", "opt")
    # The adversary has 5 parameters: 256 keys give 1,280 noise draws.
    return Case(config, table_batch, path, config.optim.b1,
                keys=256 if name == "debias" else 1)
  if name == "edm":  # DPDM: the denoiser's update, with noise multiplicity and guidance.
    config = load_config("dp_diffusion_mnist", "smoke", **PRIVATE)
    # A one-block DiT: the objective's wiring is the network's, and it compiles in seconds.
    config.model = {"name": "dit", "patch": 7, "hidden": 32, "depth": 1, "heads": 2,
                    "conditional": True}
    return Case(config, image_batch, ("opt",), config.optim.b1)
  raise ValueError(name)


CASES = ("vae", "gan", "weighted_gan", "debias", "debias_plain", "edm")


class Built:
  """A case's experiment, its noisy and noise-free steps, initial state and a batch."""

  def __init__(self, name):
    self.case = c = case(name)
    self.exp = experiment.setup(c.config)
    clean_config = c.config.copy_and_resolve_references()
    clean_config.privacy.noise_multiplier = 0.0
    self.clean_exp = experiment.setup(clean_config)
    self.source = data.load(c.config.data, c.config.data.split)
    self.state = jax.device_get(jax.jit(self.exp.objective.init)(self.exp.init_rng))
    rng = np.random.default_rng(0)
    size = c.config.train.batch_size * self.exp.objective.examples_per_step
    rows = np.sort(rng.choice(len(self.source), size, replace=False))
    self.batch = c.batch_fn(self.source, rows, size, rng)
    self.batch["mask"] = np.r_[np.ones(size - 3), np.zeros(3)].astype(np.float32)
    self.keys = jax.random.split(jax.random.key(7), c.keys)
    self.noisy_states = self._stepper(self.exp)
    self.clean_states = self._stepper(self.clean_exp)  # Compiled when first called.

  def _stepper(self, exp):
    """``batch -> new states``, one per key (a leading key axis), from the initial state."""
    run = jax.jit(lambda state, batch, keys: jax.vmap(
        lambda k: exp.objective.train_step(state, batch, k)[0])(keys))
    return lambda batch: jax.device_get(run(self.state, batch, self.keys))

  def gradients(self, states):
    """``[keys, P]``: the gradients the private network's update applied in ``states``."""
    def opt_of(state):
      for k in self.case.opt_path:
        state = state[k]
      return state

    after, before = opt_of(states), opt_of(self.state)
    return np.stack([applied_gradient(before, jax.tree.map(lambda x: x[i], after),
                                      self.case.b1) for i in range(len(self.keys))])

  def noisy(self, batch):
    return self.gradients(self.noisy_states(batch))

  def clean(self, batch):
    return self.gradients(self.clean_states(batch))

  @property
  def sigma_c_w_over_e(self):
    return SIGMA * CLIP * self.case.weight_bound / EXPECTED


_BUILT = {}


def built_case(name):
  """The ``Built`` of case ``name``, made once per test module (its programs compiled once)."""
  if name not in _BUILT:
    _BUILT[name] = Built(name)
  return _BUILT[name]


@pytest.fixture(scope="module", params=CASES)
def built(request):
  return built_case(request.param)


# The weighted GAN is the GAN's step with a weight column: its noise (sigma C W / E, the same
# code path) is left to the unweighted case, its weights to the contribution test.
@pytest.mark.parametrize("name", [c for c in CASES if c != "weighted_gan"])
def test_the_update_deviates_from_the_noise_free_one_by_sigma_c_w_over_e(name):
  """The noise reaches the update, calibrated to the config's sigma, C, E (and W)."""
  built = built_case(name)
  deviation = built.noisy(built.batch) - built.clean(built.batch)
  check_gaussian(deviation.reshape(-1), built.sigma_c_w_over_e)


def test_each_example_contributes_exactly_its_clipped_share(built):
  """With the noise on: switching one sampled row off moves the applied gradient by that
  row's clipped gradient, of norm C * w / E (every raw gradient here exceeds C = 0.01)."""
  base = built.noisy(built.batch)
  weights = built.batch.get("weight", np.ones(len(built.batch["mask"]), np.float32))
  for row in (0, 5):
    off = dict(built.batch, mask=built.batch["mask"].copy())
    off["mask"][row] = 0.0
    contribution = np.linalg.norm(base - built.noisy(off), axis=-1)
    want = CLIP * float(weights[row]) / EXPECTED
    if built.case.opt_path[0] == "adv":  # The adversary's share of the joint clipped vector.
      assert np.all(contribution <= want * (1 + 1e-3)) and np.all(contribution > 0)
    else:
      np.testing.assert_allclose(contribution, want, rtol=2e-3)


def test_rows_outside_the_poisson_draw_contribute_nothing(built):
  """Padding rows (mask 0) hold other data: the whole new state is the same, bit for bit."""
  other = {k: v.copy() for k, v in built.batch.items()}
  rng = np.random.default_rng(1)
  for key, value in other.items():
    if key != "mask":
      pad = value[-3:]
      value[-3:] = (rng.permutation(value[:-3])[:3] if value.dtype.kind in "iu"
                    else rng.uniform(-1, 1, pad.shape).astype(value.dtype))
  a, b = built.noisy_states(built.batch), built.noisy_states(other)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def direct_epsilon(noise, rate, draws, n, batch, delta, prior=()):
  """dp-accounting's PLD epsilon of truncated Poisson-sampled Gaussian draws (and priors)."""
  acc = pld.PLDAccountant(value_discretization_interval=accounting.PLD_INTERVAL)
  event = lambda s, q, b, t: dp_accounting.SelfComposedDpEvent(
      dp_accounting.TruncatedSubsampledGaussianDpEvent(
          dataset_size=n, sampling_probability=q, truncated_batch_size=b,
          noise_multiplier=s), t)
  events = [event(*p) for p in prior] + [event(noise, rate, batch, draws)]
  acc.compose(events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events))
  return acc.get_epsilon(delta)


@pytest.mark.parametrize("name,n_disc", [("vae", 1), ("gan", 2), ("debias", 1)])
def test_epsilon_is_the_accountants_for_the_configs_mechanism(name, n_disc):
  """The resolved mechanism is the config's; epsilon is dp-accounting's for it, at the
  run's step count times the draws per step (a GAN's n_disc)."""
  config = case(name).config
  if name == "gan":
    config.objective.n_disc = n_disc
  exp = experiment.setup(config)
  n = len(data.load(config.data, config.data.split))
  dp, p = exp.privacy, config.privacy
  assert (dp.clip_norm, dp.noise_multiplier, dp.expected_batch_size, dp.num_examples,
          dp.delta, dp.draws_per_step) == (p.clip_norm, p.noise_multiplier,
                                           p.expected_batch_size, n, p.delta, n_disc)
  steps = 40
  want = direct_epsilon(SIGMA, EXPECTED / n, steps * n_disc, n, config.train.batch_size,
                        p.delta)
  assert privacy.epsilon(dp, steps) == pytest.approx(want, rel=1e-9)


# --- The auxiliary classifiers' fits (attribute/backbone classifiers, density ratio). -------


@pytest.fixture
def fit_states(monkeypatch):
  """The states ``fit.fit`` returns, in call order (train_classifier and the density-ratio
  fit both train through it)."""
  states = []
  original = fit.fit

  def recording(*args, **kwargs):
    state, recent = original(*args, **kwargs)
    states.append(jax.device_get(state))
    return state, recent

  monkeypatch.setattr(fit, "fit", recording)
  return states


def classifier_gradient(fit_states, sigma, clip=CLIP, source=None, expected=EXPECTED, seed=0):
  """The gradient of a one-step private ``train_classifier`` on the 8x8 digits."""
  train = source or data.load({"name": "digits"}, "train")
  test = data.load({"name": "digits"}, "test")
  fit.train_classifier(train, test, steps=1, width=8, feature_dim=16, batch_size=32, seed=seed,
                       dropout=0.0, privacy={"noise_multiplier": sigma, "clip_norm": clip,
                                             "expected_batch_size": expected})
  state = fit_states.pop()
  zeros = jax.tree.map(np.zeros_like, state["opt"])
  return applied_gradient(zeros, state["opt"], 0.9), state


def test_a_private_classifier_fit_is_noised_and_clipped_as_configured(fit_states):
  noisy, _ = classifier_gradient(fit_states, SIGMA)
  clean, _ = classifier_gradient(fit_states, 0.0)
  check_gaussian(noisy - clean, SIGMA * CLIP / EXPECTED)
  # One example drawn (a seed whose first Poisson draw holds one): the update is its
  # gradient clipped to C, divided by E.
  n = len(data.load({"name": "digits"}, "train"))
  seed = next(s for s in range(1000)
              if data.PoissonSampler(n, 32, 1 / n, s).mask(0).sum() == 1)
  one, _ = classifier_gradient(fit_states, 0.0, expected=1, seed=seed)
  assert np.linalg.norm(one) == pytest.approx(CLIP, rel=1e-4)


def test_a_private_classifier_fit_ignores_the_examples_it_did_not_draw(fit_states):
  source = data.load({"name": "digits"}, "train")
  drawn = data.PoissonSampler(len(source), 32, EXPECTED / len(source), 0)
  mask = drawn.mask(0).astype(bool)
  kept = set(drawn.indices(0)[mask].tolist())
  images = source.arrays["image"].copy()
  others = np.array([i for i in range(len(source)) if i not in kept])
  images[others] = np.random.default_rng(0).uniform(-1, 1, images[others].shape)
  changed = data.ArraySource(source.spec, {**source.arrays, "image": images})
  _, a = classifier_gradient(fit_states, SIGMA)
  _, b = classifier_gradient(fit_states, SIGMA, source=changed)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_the_dp_density_ratio_fit_is_noised_with_fair_ratio_sigma_and_privacy_clip(
    fit_states):
  """Importance weighting's classifier, from a DP config: noise ``fair.ratio.noise_multiplier
  * privacy.clip_norm / fair.ratio.batch_size`` on the union's Poisson batches."""
  config = load_config("fair_mnist", "method=importance,smoke", **{"fair.clip": 4.0})
  config.privacy = privacy.section(clip_norm=CLIP, noise_multiplier=SIGMA,
                                   expected_batch_size=EXPECTED)
  config.fair.ratio.update(steps=1, batch_size=14, noise_multiplier=2.3)  # Even: 2 halves.
  source = data.load(config.data, "train")
  grads = []
  for sigma in (2.3, 0.0):
    config.fair.ratio.noise_multiplier = sigma
    importance.fit_importance_weights(config, source)
    state = fit_states.pop()
    zeros = jax.tree.map(np.zeros_like, state["opt"])
    grads.append(applied_gradient(zeros, state["opt"], 0.9))
  check_gaussian(grads[0] - grads[1], 2.3 * CLIP / 14)
