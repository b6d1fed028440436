"""The GAN step's named pieces, each on its own (``fairgen/objectives/adversarial.py``).

``train_step`` composes ``disc_batch``, ``disc_updates`` (of ``disc_update``, with
``disc_loss`` or ``private_disc_grads``), ``gen_update`` and ``averages``; the config-level
tests (``test_gan_wiring.py``, ``test_privacy_wiring.py``) pin what the composed step does.
Here each piece is checked with toy nets whose values have closed forms: a generator of
constant images ``c`` (a learnable scalar) and the critic ``D(x) = w/2 |x|^2 + b``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fairgen import models
from fairgen.objectives import adversarial
from fairgen.objectives import gan
from fairgen.objectives import losses

SHAPE = (4, 4, 1)
P = int(np.prod(SHAPE))


class ConstantGenerator(nn.Module):
  """Fakes ``c * ones`` whatever the latents (``c`` = 0.5 at init)."""

  @nn.compact
  def __call__(self, z, y, train=False):
    del y, train
    c = self.param("c", nn.initializers.constant(0.5), ())
    return c * jnp.ones((z.shape[0],) + SHAPE)


class QuadraticCritic(nn.Module):
  """``D(x) = w / 2 * |x|^2 + b`` per example (``w = 1``, ``b = 0`` at init)."""

  @nn.compact
  def __call__(self, x, y, train=False):
    del y, train
    w = self.param("w", nn.initializers.ones, ())
    b = self.param("b", nn.initializers.zeros, ())
    return 0.5 * w * jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1) + b


NETS = models.GanModules(ConstantGenerator(), QuadraticCritic(), latent_dim=2, num_classes=0)
ADAPTER = gan.adapter(NETS)
SGD = optax.sgd(0.1)


def settings(**kw) -> adversarial.Settings:
  return adversarial.Settings(loss=losses.adversarial_loss("wasserstein"),
                              **{"n_disc": 1, **kw})


def state(ema: bool = False) -> dict:
  return gan.init(NETS, SGD, SGD, SHAPE, ema, jax.random.key(0))


def reals(values) -> jax.Array:
  """Real images, each constant at ``values[i]``: ``|x_i|^2 = P values[i]^2``."""
  values = jnp.asarray(values, jnp.float32)
  return values[:, None, None, None] * jnp.ones((len(values),) + SHAPE)


def test_disc_batch_cuts_one_micro_batch_per_d_update():
  batch = {"image": reals(np.arange(6.0)), "label": jnp.arange(6, dtype=jnp.int32),
           "weight": jnp.arange(6.0)}
  parts = adversarial.disc_batch(batch, ADAPTER, settings(n_disc=3))
  assert parts.reals.shape == (3, 2) + SHAPE
  # Row j of micro-batch i is row j * n_disc + i (losses.split_microbatches).
  np.testing.assert_array_equal(parts.conds, [[0, 3], [1, 4], [2, 5]])
  np.testing.assert_array_equal(parts.weights, [[0, 3], [1, 4], [2, 5]])
  np.testing.assert_array_equal(parts.masks, np.ones((3, 2)))  # Without privacy: all rows.
  np.testing.assert_array_equal(parts.canaries, -np.ones((3, 2)))  # No audit: none.


def test_fakes_take_the_real_labels_unless_a_private_run_conditions_on_them():
  y = jnp.arange(64, dtype=jnp.int32) % 3
  key = jax.random.key(1)
  np.testing.assert_array_equal(adversarial.fake_labels(settings(), key, y), y)
  private = settings(privacy=object(), num_classes=3)
  drawn = adversarial.fake_labels(private, key, y)
  assert drawn.dtype == y.dtype and set(np.unique(drawn)) == {0, 1, 2}
  assert not np.array_equal(drawn, y)
  # Private but unconditional: the labels are unused; they stay as they are.
  np.testing.assert_array_equal(adversarial.fake_labels(settings(privacy=object()), key, y), y)


@pytest.mark.parametrize("step, computed", [(0, True), (3, False), (4, True)])
def test_lazy_r1_is_computed_every_r1_every_steps_only(step, computed):
  value = adversarial.r1_term(settings(r1_every=4), jnp.asarray(step), lambda: jnp.float32(7.0))
  assert float(value) == (7.0 if computed else 0.0)
  assert float(adversarial.r1_term(settings(), jnp.asarray(3), lambda: jnp.float32(7.0))) == 7.0


def test_disc_loss_is_the_weighted_real_term_plus_the_fake_term_and_its_penalties():
  """WGAN: ``-sum(w_i D(x_i)) / sum(w) + mean(D(fake))``, plus ``r1_gamma/2 * r1_every *
  mean |grad D(x)|^2`` at the reals (``|grad|^2 = |x|^2`` for w = 1)."""
  params = state()["disc"]["params"]
  x, fake = reals([1.0, 2.0]), reals([0.5, 0.5])
  w = jnp.asarray([3.0, 1.0])
  keys = ADAPTER.d_keys(jax.random.key(0))
  d_real = 0.5 * P * np.array([1.0, 4.0])
  d_fake = 0.5 * P * 0.25
  plain = -(3 * d_real[0] + d_real[1]) / 4 + d_fake
  total, aux = adversarial.disc_loss(params, None, x, fake, None, jnp.zeros(2, jnp.int32), w,
                                     keys, jnp.asarray(0), adapter=ADAPTER,
                                     settings=settings())
  assert float(total) == pytest.approx(plain, rel=1e-6)
  r1 = P * np.mean([1.0, 4.0])
  total, aux = adversarial.disc_loss(params, None, x, fake, None, jnp.zeros(2, jnp.int32), w,
                                     keys, jnp.asarray(0), adapter=ADAPTER,
                                     settings=settings(r1_gamma=0.5, r1_every=2))
  assert float(aux["r1"]) == pytest.approx(r1, rel=1e-6)
  assert float(total) == pytest.approx(plain + 0.5 * 0.5 * 2 * r1, rel=1e-6)


def test_a_d_update_steps_its_optimizer_on_the_losss_gradient():
  """SGD(0.1) on ``dL/dw = -mean(|x|^2)/2 + |fake|^2/2`` and ``dL/db = -1 + 1 = 0``."""
  s = state()
  disc = adversarial.DiscState(s["disc"]["params"], s["disc"]["opt"], None)
  x = reals([1.0, 2.0])
  gen_now = {k: v for k, v in s["gen"].items()}
  new, metrics = adversarial.disc_update(
      disc, x, jnp.zeros(2, jnp.int32), jnp.ones(2), jnp.ones(2), -jnp.ones(2, jnp.int32),
      ADAPTER.d_keys(jax.random.key(0)), gen_now, jnp.asarray(0), adapter=ADAPTER,
      settings=settings(), disc_tx=SGD)
  grad_w = -0.5 * P * np.mean([1.0, 4.0]) + 0.5 * P * 0.25
  assert float(new.params["w"]) == pytest.approx(1.0 - 0.1 * grad_w, rel=1e-6)
  assert float(new.params["b"]) == pytest.approx(0.0, abs=1e-7)
  assert float(metrics["d_grad_norm"]) == pytest.approx(abs(grad_w), rel=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_the_d_updates_are_n_disc_successive_updates_on_their_own_micro_batches(scan):
  s = state()
  adapter = gan.adapter(NETS)
  if scan:
    adapter = adversarial.Adapter(**{**adapter.__dict__, "scan_disc": True})
  batch = {"image": reals([1.0, 2.0, 3.0, 1.5]), "label": jnp.zeros(4, jnp.int32)}
  cfg = settings(n_disc=2)
  parts = adversarial.disc_batch(batch, adapter, cfg)
  rng, step = jax.random.key(3), jnp.asarray(0)
  start = adversarial.DiscState(s["disc"]["params"], s["disc"]["opt"], None)
  done, metrics = adversarial.disc_updates(start, parts, rng, s["gen"], step, adapter=adapter,
                                           settings=cfg, disc_tx=SGD)
  by_hand = start
  for i in range(2):
    by_hand, last = adversarial.disc_update(
        by_hand, *(part[i] for part in parts), adapter.d_keys(jax.random.fold_in(rng, i)),
        s["gen"], step, adapter=adapter, settings=cfg, disc_tx=SGD)
  np.testing.assert_allclose(done.params["w"], by_hand.params["w"], rtol=1e-6)
  np.testing.assert_allclose(metrics["d_loss"], last["d_loss"], rtol=1e-6)


def test_the_g_update_adds_the_penalty_to_the_adversarial_term():
  """WGAN's G loss is ``-mean D(G(z)) = -P c^2 / 2``; the penalty ``fake.mean() * 2``
  adds ``2c``: ``dL/dc = -P c + 2``, stepped by SGD(0.1)."""
  s = state()
  d_params = s["disc"]["params"]
  z = jnp.zeros((3, 2))
  y = jnp.zeros(3, jnp.int32)
  penalty = lambda fake, step, constants: (2.0 * jnp.mean(fake), {"pen": jnp.mean(fake)})
  new_gen, metrics = adversarial.gen_update(
      s["gen"], None, d_params, z, y, ADAPTER.g_keys(jax.random.key(0)), jnp.asarray(0),
      adapter=ADAPTER, settings=settings(), gen_tx=SGD, penalty=penalty, constants=None)
  c = 0.5
  assert float(metrics["g_adv_loss"]) == pytest.approx(-P * c * c / 2, rel=1e-6)
  assert float(metrics["g_loss"]) == pytest.approx(-P * c * c / 2 + 2 * c, rel=1e-6)
  assert float(new_gen["params"]["c"]) == pytest.approx(c - 0.1 * (-P * c + 2), rel=1e-6)


def test_the_averages_move_the_ema_at_its_warmed_up_decay():
  """``ema' = d ema + (1 - d) params`` with ``d = min(decay, (1 + t) / (10 + t))``."""
  s = state(ema=True)
  s["ema"] = {"c": jnp.asarray(0.0)}
  new = {"step": s["step"] + 1, "gen": {**s["gen"], "params": {"c": jnp.asarray(1.0)}},
         "disc": s["disc"]}
  out = adversarial.averages({**s, "step": jnp.asarray(90)}, new, {}, jnp.zeros((2, 2)),
                             jnp.zeros(2, jnp.int32), adapter=ADAPTER,
                             settings=settings(ema_decay=0.5))
  assert float(out["ema"]["c"]) == pytest.approx(0.5)  # min(0.5, 91/100) = 0.5.
  out = adversarial.averages({**s, "step": jnp.asarray(0)}, new, {}, jnp.zeros((2, 2)),
                             jnp.zeros(2, jnp.int32), adapter=ADAPTER,
                             settings=settings(ema_decay=0.999))
  assert float(out["ema"]["c"]) == pytest.approx(0.9)  # Warm-up: d = 1/10.
  assert "spectral" not in out and "ema_stats" not in out
