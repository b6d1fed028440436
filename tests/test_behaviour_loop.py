"""Behaviour of the GAN objective and the training loop, in tests that fail when it breaks.

- GAN mechanics: the non-saturating losses, the EMA warm-up recurrence over real steps,
  samples drawn with the EMA weights, one real micro-batch per discriminator step.
- The training batch is split over the data axis (8 devices), not replicated.
- Exact resume (stop at N, resume to 2N == 2N in one go, bit for bit) for the VAE, the
  resampling and importance-weighting mitigations and a tabular objective, and after SIGTERM.
- The best checkpoint (``eval.best_mode``, kept across a resume) and ``--mode=evaluate`` of
  one step.

The GAN tests use a tiny MLP generator/discriminator (``_tiny_gan``) in place of the DCGAN,
whose compilation takes tens of seconds on a CPU: the objective code is the same. Identical
programs compile once, here and in the processes a test starts: the suite's persistent
compilation cache (conftest.py; one directory, since JAX's cache key includes its path).
Resumed and uninterrupted runs are compared on the checkpoint files read by Orbax alone
(``_saved_arrays``) as well as through fairgen's restore, so a restore bug cannot make both
sides agree.
"""

import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import (REPO, assert_resume_is_exact, assert_same_final_state, final_state,
                      load_config, metric_records, run_main, subprocess_env)
from fairgen import checkpoint
from fairgen import data
from fairgen import experiment
from fairgen import parallel
from fairgen import sampling
from fairgen import train
from fairgen.evaluation import modes
from fairgen.config import ConfigError
from fairgen.evaluation import runner
from fairgen.models import GanModules
from fairgen.objectives import adversarial
from fairgen.objectives import gan
from fairgen.objectives import losses

# --- Helpers. ------------------------------------------------------------------------------

class _TinyGenerator(nn.Module):
  """Dense -> BatchNorm -> tanh; ``zero_init``: every output is exactly 0."""

  image_shape: tuple
  zero_init: bool = False

  @nn.compact
  def __call__(self, z, labels=None, train=True):
    del labels
    init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
    x = nn.Dense(int(np.prod(self.image_shape)), kernel_init=init)(z)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return jnp.tanh(x).reshape((z.shape[0],) + tuple(self.image_shape))


class _TinyDiscriminator(nn.Module):
  """A small MLP logit; ``linear``: the zero-initialised linear logit ``<w, x> + b``."""

  linear: bool = False

  @nn.compact
  def __call__(self, x, labels=None, train=True):
    del labels, train
    h = x.reshape((x.shape[0], -1))
    if self.linear:
      return nn.Dense(1, kernel_init=nn.initializers.zeros)(h)[:, 0]
    h = nn.leaky_relu(nn.Dense(8)(h), 0.2)
    return nn.Dense(1)(h)[:, 0]


def _tiny_gan(image_shape, zero_generator=False, linear_discriminator=False, latent_dim=4):
  return GanModules(generator=_TinyGenerator(tuple(image_shape), zero_generator),
                    discriminator=_TinyDiscriminator(linear_discriminator),
                    latent_dim=latent_dim, num_classes=0)


_GAN_OPTIM = {"gen": {"name": "adam", "lr": 1e-2, "b1": 0.5, "b2": 0.999},
              "disc": {"name": "adam", "lr": 1e-2, "b1": 0.5, "b2": 0.999}}


def _f64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _assert_trees_close(actual, expected, rtol=1e-5, atol=1e-7):
  actual, expected = jax.tree.leaves(_f64(actual)), jax.tree.leaves(_f64(expected))
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected):
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(x - y)))
             for x, y in zip(jax.tree.leaves(_f64(a)), jax.tree.leaves(_f64(b))))


def _wrap_objective_step(monkeypatch, before_step):
  """Every objective built from now on calls ``before_step(batch)`` inside its (jitted) step."""
  original = experiment.build_objective

  def build(config, spec, for_training=True, dp=None):
    obj = original(config, spec, for_training, dp)

    def train_step(state, batch, rng):
      before_step(batch)
      return obj.train_step(state, batch, rng)

    return dataclasses.replace(obj, train_step=train_step)

  monkeypatch.setattr(experiment, "build_objective", build)


def _register_evaluator(monkeypatch, name, fn):
  """Registers ``fn`` as evaluator ``name`` for one test."""
  monkeypatch.setitem(runner.EVALUATORS._entries, name, runner.Entry(fn))  # pylint: disable=protected-access


# --- 1. GAN mechanics. ---------------------------------------------------------------------


def test_nonsaturating_losses_are_minus_log_sigmoid():
  real = np.linspace(-12.0, 12.0, 25)
  fake = np.linspace(9.0, -9.0, 25) + 0.3  # Other values than ``real``: a swap shows.
  sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))
  real_loss, fake_loss = losses.d_nonsaturating(jnp.asarray(real, jnp.float32),
                                             jnp.asarray(fake, jnp.float32))
  np.testing.assert_allclose(real_loss, -np.log(sigmoid(real)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fake_loss, -np.log(1.0 - sigmoid(fake)), rtol=1e-5, atol=1e-6)
  g_loss = losses.g_nonsaturating(jnp.asarray(fake, jnp.float32))
  np.testing.assert_allclose(g_loss, -np.log(sigmoid(fake)), rtol=1e-5, atol=1e-6)
  # Non-saturating: where D rejects the fakes (logit -9), G's gradient is ~-1, not ~0.
  grad = jax.grad(lambda x: jnp.sum(losses.g_nonsaturating(x)))(jnp.asarray(fake, jnp.float32))
  np.testing.assert_allclose(grad, -sigmoid(-fake), rtol=1e-5, atol=1e-7)
  assert grad[-1] < -0.99


def test_hinge_and_least_squares_losses_match_their_definitions():
  real = np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0], np.float32)
  fake = np.array([-3.0, -1.0, -0.5, 0.0, 1.0, 2.0], np.float32)
  # Hinge (Lim & Ye 2017): D pays only for reals below +1 and fakes above -1.
  d_real, d_fake = losses.d_hinge(jnp.asarray(real), jnp.asarray(fake))
  np.testing.assert_allclose(d_real, [3.0, 2.0, 1.0, 0.5, 0.0, 0.0])
  np.testing.assert_allclose(d_fake, [0.0, 0.0, 0.5, 1.0, 2.0, 3.0])
  np.testing.assert_allclose(losses.g_hinge(jnp.asarray(fake)), -fake)
  grad_real = jax.grad(lambda x: jnp.sum(losses.d_hinge(x, jnp.asarray(fake))[0]))(
      jnp.asarray(real))
  np.testing.assert_allclose(grad_real, [-1.0, -1.0, -1.0, -1.0, 0.0, 0.0])  # relu'(0) = 0.
  # Least squares (Mao et al. 2017, a=0, b=c=1).
  d_real, d_fake = losses.d_least_squares(jnp.asarray(real), jnp.asarray(fake))
  np.testing.assert_allclose(d_real, [4.5, 2.0, 0.5, 0.125, 0.0, 2.0])
  np.testing.assert_allclose(d_fake, [4.5, 0.5, 0.125, 0.0, 0.5, 2.0])
  np.testing.assert_allclose(losses.g_least_squares(jnp.asarray(fake)),
                             [8.0, 2.0, 1.125, 0.5, 0.0, 0.5])
  # Every loss is in the family that objective.loss and the step read.
  for name in ("nonsaturating", "wasserstein", "hinge", "ls"):
    assert losses.adversarial_loss(name) is losses.ADVERSARIAL_LOSSES.get(name)


def test_one_sided_label_smoothing_moves_only_the_real_target():
  real = np.array([-4.0, 0.0, 2.5], np.float32)
  fake = np.array([1.0, -2.0, 0.5], np.float32)
  sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))
  loss = losses.adversarial_loss("nonsaturating", label_smoothing=0.1)
  d_real, d_fake = loss.d_loss(jnp.asarray(real), jnp.asarray(fake))
  np.testing.assert_allclose(
      d_real, -0.9 * np.log(sigmoid(real)) - 0.1 * np.log(1.0 - sigmoid(real)), rtol=1e-5)
  np.testing.assert_allclose(d_fake, -np.log(1.0 - sigmoid(fake)), rtol=1e-5)  # Target 0.
  np.testing.assert_allclose(loss.g_loss(jnp.asarray(fake)), -np.log(sigmoid(fake)), rtol=1e-5)
  # The optimum moves from D(x) = 1 to D(x) = 0.9: the real term's slope is 0 at logit(0.9).
  slope = jax.grad(lambda x: loss.d_loss(x, jnp.zeros(()))[0])(jnp.float32(np.log(9.0)))
  assert abs(float(slope)) < 1e-6
  with pytest.raises(ValueError, match="non-saturating"):
    losses.adversarial_loss("hinge", label_smoothing=0.1)
  for bad in ({"label_smoothing": 0.1, "loss": "hinge"}, {"label_smoothing": 0.5},
              {"r1_every": 0}, {"r1_gamma": -1.0}):
    with pytest.raises(ConfigError):
      gan.check({**gan.DEFAULTS, **bad})


def test_gradient_penalty_and_r1_of_a_linear_critic_and_lazy_r1_skips_steps():
  """A linear D(x) = <k, x> + b has input gradient k for every example and every input, so
  the gradient penalty at any interpolate is (|k| - 1)^2 and R1 = |k|^2: the D loss grows by
  gp_weight * (|k| - 1)^2, and by gamma / 2 * |k|^2 (times k_lazy on the steps lazy R1 runs,
  0 between)."""
  shape, rows = (4, 4, 1), 6
  nets = _tiny_gan(shape, zero_generator=True, linear_discriminator=True)
  tx = optax.sgd(0.0)  # Nothing moves: every step sees the same D.
  state = jax.jit(functools.partial(gan.init, nets, tx, tx, shape, False))(jax.random.key(0))
  kernel = np.linspace(-1.0, 1.0, 16, dtype=np.float32).reshape(16, 1)
  state["disc"]["params"]["Dense_0"]["kernel"] = jnp.asarray(kernel)
  k_sq = float(np.sum(kernel**2))
  images = np.random.default_rng(0).uniform(-1, 1, (rows,) + shape).astype(np.float32)
  batch = {"image": images, "label": np.zeros(rows, np.int32)}

  def d_loss(step, **settings):
    s = adversarial.Settings(losses.adversarial_loss("nonsaturating"), n_disc=1, **settings)
    fn = jax.jit(functools.partial(adversarial.train_step, adapter=gan.adapter(nets),
                                   settings=s, gen_tx=tx, disc_tx=tx))
    metrics = fn({**state, "step": jnp.int32(step)}, batch, jax.random.key(1))[1]
    return float(metrics["d_loss"]), float(metrics.get("r1", metrics.get("gp", np.nan)))

  base_loss, _ = d_loss(0)
  loss, gp = d_loss(0, gp_weight=10.0)
  np.testing.assert_allclose(gp, (np.sqrt(k_sq) - 1.0)**2, rtol=1e-5)
  np.testing.assert_allclose(loss - base_loss, 10.0 * (np.sqrt(k_sq) - 1.0)**2, rtol=1e-4)
  loss, r1 = d_loss(0, r1_gamma=0.5)
  np.testing.assert_allclose(r1, k_sq, rtol=1e-5)
  np.testing.assert_allclose(loss - base_loss, 0.25 * k_sq, rtol=1e-4)
  lazy_on, _ = d_loss(8, r1_gamma=0.5, r1_every=4)  # 8 % 4 == 0: runs, scaled by 4.
  np.testing.assert_allclose(lazy_on - d_loss(8)[0], 4 * 0.25 * k_sq, rtol=1e-4)
  lazy_off, r1_off = d_loss(9, r1_gamma=0.5, r1_every=4)
  assert r1_off == 0.0 and lazy_off == d_loss(9)[0]


def test_ema_follows_the_warmup_recurrence_over_real_steps():
  """ema_{t+1} = d_t ema_t + (1 - d_t) G_{t+1}, d_t = min(decay, (1 + t) / (10 + t)).

  With decay 0.3 the warm-up term is smaller for t < 3 and the decay from t = 3 on, so both
  sides of the min are exercised.
  """
  shape, decay = (4, 4, 1), 0.3
  obj = gan.build(_tiny_gan(shape), types.SimpleNamespace(image_shape=shape),
                  {**gan.DEFAULTS, "n_disc": 1, "ema_decay": decay}, _GAN_OPTIM)
  state = jax.jit(obj.init)(jax.random.key(0))
  _assert_trees_close(state["ema"], state["gen"]["params"], rtol=0, atol=0)
  expected = _f64(state["gen"]["params"])
  step = jax.jit(obj.train_step)
  rng = np.random.default_rng(0)
  for t in range(6):
    batch = {"image": rng.uniform(-1, 1, (8,) + shape).astype(np.float32),
             "label": np.zeros(8, np.int32)}
    state, metrics = step(state, batch, jax.random.key(1))
    assert np.isfinite(float(metrics["g_loss"]))
    d = min(decay, (1.0 + t) / (10.0 + t))
    expected = jax.tree.map(lambda e, p, d=d: d * e + (1.0 - d) * p, expected,
                            _f64(state["gen"]["params"]))
    _assert_trees_close(state["ema"], expected)
  assert _max_abs_diff(state["ema"], state["gen"]["params"]) > 1e-3  # The EMA lags G.


def test_samples_are_drawn_with_the_ema_generator(monkeypatch):
  """``sampling.decode_images`` (grids, --mode=sample, evaluation) applies G with the EMA."""
  monkeypatch.setattr(experiment, "build_model",
                      lambda config, spec: _tiny_gan(spec.image_shape))
  # The tiny G has no bn_momentum, so it samples with the running statistics.
  config = load_config("dcgan_mnist", "smoke", **{"mesh.data": 1, "optim.gen.lr": 0.05,
                                                  "objective.standing_stats": 0})
  exp = experiment.setup(config)
  state = experiment.init_state(exp)
  step = train.make_train_step(exp)
  rng = np.random.default_rng(0)
  sharding = parallel.data_sharding(exp.mesh)
  for _ in range(3):
    batch = {"image": rng.uniform(-1, 1, (exp.global_batch,) + exp.spec.image_shape),
             "label": np.zeros(exp.global_batch, np.int32)}
    batch = {k: jax.device_put(v.astype(np.float32) if k == "image" else v, sharding)
             for k, v in batch.items()}
    state, _ = step(state, batch, exp.step_rng)
  latents = rng.normal(size=(10, exp.objective.latent_dim)).astype(np.float32)
  labels = np.zeros(10, np.int32)
  images = sampling.decode_images(exp, state, latents, labels)
  nets = _tiny_gan(exp.spec.image_shape)
  stats = state["gen"]["batch_stats"]
  with_ema = nets.generator.apply({"params": state["ema"], "batch_stats": stats}, latents,
                                  labels, train=False)
  with_gen = nets.generator.apply({"params": state["gen"]["params"], "batch_stats": stats},
                                  latents, labels, train=False)
  np.testing.assert_allclose(images, with_ema, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(images - np.asarray(with_gen))) > 1e-2


def _recording_optimizer(num_updates):
  """An optax transformation that stores each update's gradient and leaves params unchanged."""

  def init(params):
    return {"count": jnp.zeros((), jnp.int32),
            "grads": jax.tree.map(lambda p: jnp.zeros((num_updates,) + p.shape, p.dtype),
                                  params)}

  def update(grads, state, params=None):
    del params
    recorded = jax.tree.map(lambda buf, g: buf.at[state["count"]].set(g), state["grads"], grads)
    return (jax.tree.map(jnp.zeros_like, grads),
            {"count": state["count"] + 1, "grads": recorded})

  return optax.GradientTransformation(init, update)


# For each loss at D's output 0: the slope of the per-example real term, and the D and G
# losses (the non-saturating D pays log 2 per term, hinge 1, least squares 1/2 on reals).
_LOSSES_AT_ZERO = {"nonsaturating": (-0.5, 2 * np.log(2.0), np.log(2.0)),
                   "wasserstein": (-1.0, 0.0, 0.0), "hinge": (-1.0, 2.0, 0.0),
                   "ls": (-1.0, 0.5, 0.5)}


@pytest.mark.parametrize("loss", sorted(_LOSSES_AT_ZERO))
def test_each_discriminator_step_gets_its_own_real_micro_batch(loss):
  """n_disc=3: each D update sees B real rows of its own; together they are the batch, and
  the importance weight multiplies the real term whatever the loss.

  Row r of the batch is the one-hot image e_r with importance weight w_r. D is the
  zero-initialised linear logit <k, x> + b and G outputs exactly 0, so the kernel gradient
  of D update i is slope * w_r / sum(w of its micro-batch) at pixel r for each real row r
  it used, and 0 elsewhere (slope: the real term's derivative at 0). A recording optimizer
  keeps the gradient of every D update (and leaves D unchanged, so every update starts at
  logit 0).
  """
  slope, d_loss_at_zero, g_loss_at_zero = _LOSSES_AT_ZERO[loss]
  n_disc, b, shape = 3, 4, (4, 4, 1)
  rows = n_disc * b
  nets = _tiny_gan(shape, zero_generator=True, linear_discriminator=True)
  disc_tx, gen_tx = _recording_optimizer(n_disc), optax.sgd(0.1)
  state = jax.jit(functools.partial(gan.init, nets, gen_tx, disc_tx, shape, True))(
      jax.random.key(0))
  images = np.zeros((rows, int(np.prod(shape))), np.float32)
  images[np.arange(rows), np.arange(rows)] = 1.0
  weights = np.arange(1.0, rows + 1.0, dtype=np.float32)
  batch = {"image": images.reshape((rows,) + shape), "label": np.zeros(rows, np.int32),
           "weight": weights}
  settings = adversarial.Settings(losses.adversarial_loss(loss), n_disc=n_disc, ema_decay=0.9)
  step = jax.jit(functools.partial(adversarial.train_step, adapter=gan.adapter(nets),
                                   settings=settings, gen_tx=gen_tx, disc_tx=disc_tx))
  new_state, metrics = step(state, batch, jax.random.key(1))
  built = gan.build(nets, types.SimpleNamespace(image_shape=shape),
                    {**gan.DEFAULTS, "n_disc": n_disc, "ema_decay": 0.9}, _GAN_OPTIM)
  assert built.examples_per_step == n_disc  # The loop loads n_disc * batch_size rows.
  opt = new_state["disc"]["opt"]
  assert int(opt["count"]) == n_disc
  grads = np.asarray(opt["grads"]["Dense_0"]["kernel"])[..., 0]  # [n_disc, pixels]
  assert np.all(grads[:, rows:] == 0)  # Pixels no row lights.
  used = [np.flatnonzero(g) for g in grads]
  assert [len(u) for u in used] == [b] * n_disc, used  # B real rows per D update ...
  assert sorted(np.concatenate(used).tolist()) == list(range(rows)), used  # ... disjoint, all.
  for i, u in enumerate(used):  # Each row's weight stays with its image.
    np.testing.assert_allclose(grads[i, u], slope * weights[u] / weights[u].sum(), rtol=1e-6)
  # At logit 0 the losses are their closed forms.
  np.testing.assert_allclose(metrics["d_loss"], d_loss_at_zero, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(metrics["g_loss"], g_loss_at_zero, rtol=1e-6, atol=1e-7)


# --- 2. Data parallelism. ------------------------------------------------------------------


def test_training_batches_are_split_over_the_data_axis(monkeypatch, workdir):
  """On 8 devices each device holds 1/8 of the batch the loop trains on, in the step too;
  with 2 steps per dispatch the loader's stacked ``[2, batch, ...]`` arrays are split on
  the batch axis alike. (``test_train.py``'s 1-vs-8-device test covers one step per
  dispatch.)"""
  config = load_config("vae_mnist", "smoke", **{
      "mesh.data": 8, "train.num_steps": 2, "train.checkpoint_every_steps": 2,
      "log.every_steps": 2, "log.sample_every_steps": 1000, "train.steps_per_dispatch": 2})
  loaded, inside = [], []

  class RecordingLoader(data.Loader):

    def __iter__(self):
      for step, batch in super().__iter__():
        loaded.append((batch, [self.host_batch(step), self.host_batch(step + 1)]))
        yield step, batch

  monkeypatch.setattr(data, "Loader", RecordingLoader)
  _wrap_objective_step(monkeypatch, lambda batch: jax.debug.inspect_array_sharding(
      batch["image"], callback=inside.append))
  train.train_and_evaluate(config, workdir)

  mesh = parallel.make_mesh(8)
  want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))
  n, per = config.train.batch_size, config.train.batch_size // 8
  assert len(loaded) == 1  # Steps 0 and 1, stacked.
  for batch, hosts in loaded:
    for key, array in batch.items():
      assert array.shape[:2] == (2, n), key
      assert not array.sharding.is_fully_replicated, key
      assert array.sharding.is_equivalent_to(want, array.ndim), (key, array.sharding)
      shards = sorted(array.addressable_shards, key=lambda s: s.index[1].start or 0)
      assert len({s.device for s in shards}) == 8, key
      for k, shard in enumerate(shards):
        assert shard.data.shape == (2, per) + array.shape[2:], (key, shard.data.shape)
        np.testing.assert_array_equal(
            np.asarray(shard.data), np.stack([h[key][k * per:(k + 1) * per] for h in hosts]))
  # The compiled step takes the batch with the same split (reported while it compiles).
  assert inside
  image_shape = (n,) + tuple(loaded[0][0]["image"].shape[2:])
  for sharding in inside:
    assert not sharding.is_fully_replicated
    assert sharding.shard_shape(image_shape) == (per,) + image_shape[1:]
    assert sharding.is_equivalent_to(parallel.data_sharding(mesh), len(image_shape))


# --- 3. Exact resume. ----------------------------------------------------------------------


def _assert_resume_is_exact(config, tmp_path, n, after_stop=None):
  """Stop at n and resume to 2n == 2n in one go (``conftest.assert_resume_is_exact``)."""
  config.mesh.data = 1
  config.train.checkpoint_every_steps = n
  config.log.every_steps = 1
  config.log.sample_every_steps = 1000
  config.eval.every_steps = 0
  config.train.num_steps = 2 * n
  assert_resume_is_exact(config, tmp_path, n, after_stop=after_stop)


def test_vae_resume_is_exact(tmp_path):
  _assert_resume_is_exact(load_config("vae_mnist", "smoke"), tmp_path, 3)


def test_fair_resample_resume_is_exact(tmp_path):
  _assert_resume_is_exact(load_config("fair_mnist", "method=resample,model=vae,smoke"),
                          tmp_path, 3)


def test_fair_importance_resume_is_exact(tmp_path):
  """The first run fits and saves the weights; the resumed run must apply the saved ones."""

  def reuse_weights(split, straight):  # The uninterrupted run skips a second fit.
    shutil.copytree(os.path.join(split, "density_ratio"),
                    os.path.join(straight, "density_ratio"))

  _assert_resume_is_exact(load_config("fair_mnist", "method=importance,model=vae,smoke"),
                          tmp_path, 3, reuse_weights)


def test_gan_resume_is_exact(tmp_path, monkeypatch):
  """Both optimizers, the EMA and BatchNorm statistics (tiny nets, n_disc=2)."""
  monkeypatch.setattr(experiment, "build_model",
                      lambda config, spec: _tiny_gan(spec.image_shape))
  config = load_config("dcgan_mnist", "smoke", **{"objective.n_disc": 2,
                                                  "objective.ema_decay": 0.9,
                                                  "objective.standing_stats": 0})
  _assert_resume_is_exact(config, tmp_path, 3)


def test_tabular_debiasing_resume_is_exact(tmp_path):
  _assert_resume_is_exact(load_config("adult_debias", "smoke"), tmp_path, 3)


def _launch(workdir, flags, log_path):
  env = subprocess_env()
  with open(log_path, "w") as log:
    return subprocess.Popen([sys.executable, "-m", "fairgen.main", f"--workdir={workdir}",
                             *flags], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=log, text=True)


def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path):
  flags = ("--config=experiments/vae_mnist.py:smoke", "--config.train.num_steps=60",
           "--config.train.checkpoint_every_steps=1000", "--config.log.every_steps=1",
           "--config.log.sample_every_steps=1000")
  straight, workdir = str(tmp_path / "straight"), str(tmp_path / "w")
  result = run_main(*flags, f"--workdir={straight}")
  assert result.returncode == 0, result.stderr[-3000:]

  log_path = str(tmp_path / "stderr.txt")
  proc = _launch(workdir, flags, log_path)
  try:
    deadline = time.monotonic() + 240
    while not metric_records(workdir) and proc.poll() is None:  # A step is logged.
      assert time.monotonic() < deadline, "no step logged"
      time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    returncode = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  with open(log_path) as f:
    stderr = f.read()
  assert returncode == 0, stderr[-3000:]
  match = re.search(r"stopped by a signal at step (\d+)", stderr)
  assert match, stderr[-3000:]
  stopped = int(match.group(1))
  assert 1 <= stopped < 60
  assert max(metric_records(workdir)) == stopped
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    assert ckpt.all_steps() == [stopped]  # Saved where it stopped, and committed.
  finally:
    ckpt.close()

  result = run_main(*flags, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(rf"Resumed from \S+/checkpoints/{stopped}\b", result.stderr), (
      result.stderr[-3000:])
  assert_same_final_state(workdir, straight, load_config("vae_mnist", "smoke"), 60)


def test_a_preemption_checkpoints_without_sampling_or_evaluating_first(tmp_path, monkeypatch):
  """The grace period of a preemption notice is short: the stop step saves and exits; the
  sample grid and the evaluation due at the end belong to the resumed run."""
  from fairgen import robust

  class StopAtThree(robust.Preemption):
    def should_stop(self, step, steps=1):
      return step == 3

  monkeypatch.setattr(robust, "Preemption", StopAtThree)
  evaluated = []
  _register_evaluator(monkeypatch, "counted", lambda ctx: evaluated.append(ctx.step) or [])
  config = load_config("vae_mnist", "smoke", **{
      "train.num_steps": 10, "train.checkpoint_every_steps": 1000, "log.every_steps": 1,
      "log.sample_every_steps": 1000, "eval.every_steps": 1000, "eval.metrics": ("counted",)})
  workdir = str(tmp_path / "w")
  summary = train.train_and_evaluate(config, workdir)
  assert summary["preempted"] and summary["final_step"] == 3
  assert final_state(workdir, config)[0] == 3
  assert evaluated == [] and not os.path.exists(os.path.join(workdir, "samples"))


# --- 4. Best checkpoint and --mode=evaluate of one step. -----------------------------------

_SCORES = {2: 0.5, 4: 0.9, 6: 0.3, 8: 0.7, 10: 0.95}


def _scripted(monkeypatch, workdir, seen):
  """Evaluator 'scripted': score by step, the evaluated state's step, best.json at the call."""

  def scripted(ctx):
    seen.append((ctx.step, checkpoint.read_best(workdir)))
    yield "score", _SCORES[ctx.step] if ctx.step in _SCORES else 0.0
    yield "state_step", float(ctx.state["step"])
    yield "param_sum", float(sum(np.sum(np.asarray(x, np.float64))
                                 for x in jax.tree.leaves(ctx.state["params"])))

  _register_evaluator(monkeypatch, "scripted", scripted)


def _best_config(**overrides):
  return load_config("vae_mnist", "smoke", **{
      "mesh.data": 1, "train.num_steps": 6, "train.checkpoint_every_steps": 2,
      "train.max_to_keep": 3, "log.sample_every_steps": 1000, "eval.every_steps": 2,
      "eval.metrics": ("scripted",), "eval.best_metric": "score", "eval.best_mode": "max",
      **overrides})


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
  """A VAE workdir trained 6 steps with checkpoints 2, 4, 6 and scores 0.5, 0.9, 0.3."""
  workdir = str(tmp_path_factory.mktemp("best") / "w")
  with pytest.MonkeyPatch.context() as mp:
    seen = []
    _scripted(mp, workdir, seen)
    train.train_and_evaluate(_best_config(), workdir)
  return workdir


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_best_checkpoint_keeps_the_max_and_survives_a_resume(six_steps, tmp_path,
                                                             monkeypatch):
  workdir = str(tmp_path / "w")
  shutil.copytree(six_steps, workdir)
  seen = []
  _scripted(monkeypatch, workdir, seen)
  config = _best_config()
  exp = experiment.setup(config)
  record = checkpoint.read_best(workdir)
  assert {k: record[k] for k in ("step", "metric", "mode", "value")} == {
      "step": 4, "metric": "score", "mode": "max", "value": 0.9}
  assert record["provenance"]["num_samples"] == config.eval.num_samples
  best_state, best_step = experiment.restore_checkpoint(exp, workdir, "best")
  step4_state, _ = experiment.restore_checkpoint(exp, workdir, "4")
  assert best_step == 4
  for x, y in zip(_leaves(best_state), _leaves(step4_state)):
    np.testing.assert_array_equal(x, y)

  # Resume to 10: 0.7 at step 8 must not replace 0.9; 0.95 at step 10 must.
  config.train.num_steps = 10
  summary = train.train_and_evaluate(config, workdir)
  assert summary["start_step"] == 6
  at_call = dict(seen)
  assert at_call[8]["step"] == 4 and at_call[10]["step"] == 4, at_call  # After step 8: 4.
  assert checkpoint.read_best(workdir)["step"] == 10
  assert checkpoint.read_best(workdir)["value"] == 0.95
  best_state, best_step = experiment.restore_checkpoint(exp, workdir, "best")
  last_state, _ = experiment.restore_checkpoint(exp, workdir, "10")
  assert best_step == 10
  for x, y in zip(_leaves(best_state), _leaves(last_state)):
    np.testing.assert_array_equal(x, y)


def test_evaluate_mode_evaluates_the_requested_step(six_steps, monkeypatch):
  seen = []
  _scripted(monkeypatch, six_steps, seen)
  exp = experiment.setup(_best_config())
  state2, _ = experiment.restore_checkpoint(exp, six_steps, "2")
  param_sum = float(sum(np.sum(np.asarray(x, np.float64))
                        for x in jax.tree.leaves(state2["params"])))
  out = modes.evaluate(_best_config(**{"eval.checkpoint": "2"}), six_steps)
  assert out["step"] == 2 and out["path"].endswith(os.path.join("eval", "step_000002.json"))
  with open(out["path"]) as f:
    report = json.load(f)
  assert report["step"] == 2 and report["checkpoint"] == "2"
  assert report["metrics"]["state_step"] == 2.0  # The state of step 2, not the latest (6).
  assert report["metrics"]["param_sum"] == param_sum

  with pytest.raises(checkpoint.WorkdirError, match=r"No checkpoint for step 5; available: "
                     r"\[2, 4, 6\]"):
    modes.evaluate(_best_config(**{"eval.checkpoint": "5"}), six_steps)
  result = run_main("--config=experiments/vae_mnist.py:smoke", f"--workdir={six_steps}",
                    "--mode=evaluate", "--config.eval.checkpoint=5")
  assert result.returncode == 2, result.stderr[-3000:]
  assert "fairgen: error: No checkpoint for step 5; available: [2, 4, 6]" in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(os.path.join(six_steps, "eval", "step_000005.json"))
