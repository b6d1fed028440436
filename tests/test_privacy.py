"""DP-SGD against its definition, the accountant against dp-accounting and a published
figure, Poisson sampling, the privacy config's refusals, and DP runs on 1 and 8 devices."""

import json
import math
import os

import dp_accounting
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import rdp

from conftest import TIMING_KEYS, load_config, run_main
from fairgen import config as config_lib
from fairgen import checkpoint, data, experiment, privacy, train
from fairgen.evaluation import modes, runner
from fairgen.evaluation.context import RealData
from fairgen.privacy import accounting, dpsgd


def _linear_loss(params, ex, key):
  """0.5 (w.x + b - y)^2 for one example: its gradient is (w.x + b - y) (x, 1)."""
  del key
  r = jnp.dot(params["w"], ex["x"]) + params["b"] - ex["y"]
  return 0.5 * r ** 2, {"r": r}


def _numpy_reference(params, x, y, mask, scale, clip, expected):
  """sum_i m_i s_i clip(g_i, C) / E, written out per example."""
  total_w, total_b = np.zeros_like(params["w"]), 0.0
  for i in range(len(x)):
    r = x[i] @ params["w"] + params["b"] - y[i]
    g_w, g_b = r * x[i], r
    norm = math.sqrt(float(np.sum(g_w ** 2) + g_b ** 2))
    factor = min(1.0, clip / norm) * mask[i] * scale[i]
    total_w, total_b = total_w + factor * g_w, total_b + factor * g_b
  return total_w / expected, total_b / expected


@pytest.mark.parametrize("microbatch", [0, 3])
def test_clipping_matches_the_definition_written_in_numpy(microbatch):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(9, 5)).astype(np.float32) * np.arange(1, 10)[:, None]
  y = rng.normal(size=9).astype(np.float32)
  params = {"w": rng.normal(size=5).astype(np.float32), "b": np.float32(0.3)}
  mask = np.array([1, 1, 1, 0, 1, 1, 1, 1, 0], np.float32)
  scale = rng.uniform(0.2, 1.0, 9).astype(np.float32)
  grad, aux, stats = dpsgd.private_gradient(
      _linear_loss, params, {"x": x, "y": y}, jax.random.key(0), clip_norm=2.0,
      noise_multiplier=0.0, expected_batch_size=6.5, mask=jnp.asarray(mask),
      scale=jnp.asarray(scale), microbatch_size=microbatch)
  ref_w, ref_b = _numpy_reference(params, x, y, mask, scale, 2.0, 6.5)
  np.testing.assert_allclose(grad["w"], ref_w, rtol=1e-5)
  np.testing.assert_allclose(grad["b"], ref_b, rtol=1e-5)
  assert aux["r"].shape == (9,)
  # Most examples' gradients exceed C = 2 (inputs are scaled up): clipping is exercised.
  assert 0.5 < float(stats["clipped_fraction"]) < 1.0


def test_per_example_gradients_match_a_loop_over_examples():
  """A small convolutional net: vmapped per-example gradients (in microbatches), clipped,
  against jax.grad of one example at a time."""
  net = nn.Sequential([nn.Conv(4, (3, 3)), nn.relu, lambda h: h.reshape(-1), nn.Dense(1)])
  x = jax.random.normal(jax.random.key(1), (6, 5, 5, 1))
  params = net.init(jax.random.key(2), x[0])["params"]

  def loss(p, ex, key):
    del key
    return jnp.sum(net.apply({"params": p}, ex["x"]) ** 2), ()

  mask = jnp.ones(6)
  clip = 0.5
  grad, _, _ = dpsgd.private_gradient(loss, params, {"x": x}, jax.random.key(0),
                                      clip_norm=clip, noise_multiplier=0.0,
                                      expected_batch_size=6, mask=mask, microbatch_size=2)
  total = jax.tree.map(jnp.zeros_like, params)
  for i in range(6):
    g = jax.grad(lambda p: loss(p, {"x": x[i]}, None)[0])(params)
    norm = float(jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(g))))
    total = jax.tree.map(lambda t, v: t + v * min(1.0, clip / norm), total, g)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(total)):
    np.testing.assert_allclose(a, b / 6, rtol=1e-5, atol=1e-7)


class _MixedNet(nn.Module):
  """Convolution, a Dense called twice (shared weights), a Dense without bias on [T, 3]
  rows, a bare parameter, a Dense subclass: every case ghost clipping must get right."""

  @nn.compact
  def __call__(self, x, seq):
    h = nn.relu(nn.Conv(4, (3, 3))(x)).reshape(x.shape[0], -1)
    h = nn.tanh(nn.Dense(7)(h))
    shared = nn.Dense(7)
    h = shared(h)
    h = h + shared(jnp.tanh(h))
    s = nn.Dense(5, use_bias=False)(seq)
    scale = self.param("scale", nn.initializers.ones, (1,))
    return (jnp.sum(nn.Dense(1)(h)) * scale[0] + jnp.sum(s ** 2)
            + jnp.sum(_SubDense(2)(h)))


class _SubDense(nn.Dense):
  """Not nn.Dense itself: keeps exact per-example gradients."""


def test_ghost_clipping_is_the_same_clipped_sum():
  net = _MixedNet()
  x = jax.random.normal(jax.random.key(1), (6, 5, 5, 1))
  seq = jax.random.normal(jax.random.key(2), (6, 4, 3))
  params = net.init(jax.random.key(2), x[:1], seq[:1])["params"]

  def loss(p, ex, key):
    out = net.apply({"params": p}, ex["x"][None], ex["s"][None])
    return out ** 2, {"out": out}

  kwargs = dict(clip_norm=0.7, noise_multiplier=0.0, expected_batch_size=5.0,
                mask=jnp.array([1, 1, 1, 1, 0, 1.0]), scale=jnp.array([1, 2, 0.5, 1, 1, 1.0]),
                scale_bound=2.0, microbatch_size=3)
  # Jitted, as in training: one program each, not one per operation and shape.
  exact, aux, stats = jax.jit(lambda p, b, k: dpsgd.private_gradient(loss, p, b, k, **kwargs))(
      params, {"x": x, "s": seq}, jax.random.key(0))
  ghost, ghost_aux, ghost_stats = jax.jit(lambda p, b, k: dpsgd.private_gradient(
      loss, p, b, k, ghost=True, **kwargs))(params, {"x": x, "s": seq}, jax.random.key(0))
  assert float(stats["clipped_fraction"]) > 0.5  # Clipping is exercised.
  for a, b in zip(jax.tree.leaves(exact), jax.tree.leaves(ghost), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(aux["out"], ghost_aux["out"], rtol=1e-6)
  np.testing.assert_allclose(stats["example_grad_norm"], ghost_stats["example_grad_norm"],
                             rtol=1e-5)


def test_noise_is_calibrated_to_the_sum_and_then_divided():
  """With zero gradients, the output is pure noise: its standard deviation, measured over
  many entries and steps, is sigma * C / E. Noise calibrated to the sum but added to the
  mean (a known bug) would give sigma * C."""
  params = {"w": jnp.zeros((2000,))}
  zero = lambda p, ex, key: (0.0 * jnp.sum(p["w"]) * ex, ())
  sigma, clip, expected = 2.0, 0.5, 8.0
  draws = []
  for step in range(20):
    g, _, _ = dpsgd.private_gradient(zero, params, jnp.ones(10), jax.random.key(step),
                                     clip_norm=clip, noise_multiplier=sigma,
                                     expected_batch_size=expected, mask=jnp.ones(10))
    draws.append(np.asarray(g["w"]))
  draws = np.stack(draws)
  assert abs(draws.mean()) < 0.01
  np.testing.assert_allclose(draws.std(), sigma * clip / expected, rtol=0.02)
  # Independent across steps and entries.
  assert abs(np.corrcoef(draws[0], draws[1])[0, 1]) < 0.1


def test_the_accountant_matches_dp_accounting_and_abadi_et_al():
  """Abadi et al. 2016 (Deep Learning with Differential Privacy, Sec. 3.1): q = 0.01,
  sigma = 4, delta = 1e-5, T = 10,000 steps give epsilon ~ 1.26 with their moments
  accountant (strong composition: 9.34). RDP is the moments accountant, tightened; PLD is
  tighter still."""
  q, sigma, steps, delta = 0.01, 4.0, 10_000, 1e-5
  direct = rdp.RdpAccountant()
  direct.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
  # Batch size = N: no truncation, so our RDP epsilon is the library's exactly.
  ours_rdp = accounting.epsilon(sigma, q, steps, 60_000, 60_000, delta, "rdp")
  assert ours_rdp == pytest.approx(direct.get_epsilon(delta), rel=1e-12)
  assert 1.0 < ours_rdp <= 1.26
  ours_pld = accounting.epsilon(sigma, q, steps, 60_000, 60_000, delta, "pld")
  assert 0.85 < ours_pld < ours_rdp
  # Truncation to a batch far above the expected 600 changes nothing.
  truncated = accounting.epsilon(sigma, q, steps, 60_000, 800, delta, "pld")
  assert truncated == pytest.approx(ours_pld, rel=1e-3)
  assert accounting.epsilon(0.0, q, steps, 60_000, 800, delta) == math.inf
  assert accounting.epsilon(sigma, q, 0, 60_000, 800, delta) == 0.0


def test_solved_noise_spends_the_target_epsilon():
  for acc in ("rdp", "pld"):
    sigma = accounting.solve_noise_multiplier(2.0, 0.02, 500, 5000, 200, 1e-5, acc)
    eps = accounting.epsilon(sigma, 0.02, 500, 5000, 200, 1e-5, acc)
    assert 1.99 < eps <= 2.0
    assert accounting.epsilon(sigma * 0.97, 0.02, 500, 5000, 200, 1e-5, acc) > 2.0


def test_poisson_sampler_is_a_pure_function_of_seed_and_step():
  n, rate, batch = 1000, 0.05, 80
  sampler = data.PoissonSampler(n, batch, rate, seed=3, draws=2)
  sizes = []
  for step in range(300):
    idx, mask = sampler.indices(step), sampler.mask(step)
    assert idx.shape == mask.shape == (160,)
    for d in range(2):
      part_idx, part_mask = idx[d * 80:(d + 1) * 80], mask[d * 80:(d + 1) * 80]
      k = int(part_mask.sum())
      assert np.all(part_mask[:k] == 1) and np.all(part_mask[k:] == 0)
      assert len(set(part_idx[:k])) == k  # Without repetition.
      sizes.append(k)
  assert np.mean(sizes) == pytest.approx(rate * n, rel=0.05)
  assert np.var(sizes) == pytest.approx(rate * (1 - rate) * n, rel=0.25)
  again = data.PoissonSampler(n, batch, rate, seed=3, draws=2)
  np.testing.assert_array_equal(again.indices(17), sampler.indices(17))
  np.testing.assert_array_equal(again.mask(17), sampler.mask(17))
  # A draw larger than the batch is cut to a random subset of the batch's size.
  small = data.PoissonSampler(n, 20, rate, seed=3)
  assert small.mask(0).sum() == 20 and len(set(small.indices(0))) == 20


@pytest.mark.parametrize("name,arg", [("dp_vae_mnist", "smoke"),
                                      ("dp_dcgan_mnist", "conditional,smoke")])
def test_padding_rows_never_touch_the_update(name, arg):
  """The rows a Poisson batch is padded with (mask 0) may hold anything: the step's new
  state is the same bit for bit (with noise on). A conditional DP GAN's fakes take drawn
  labels, so the real labels reach only the clipped, noised real-data term."""
  config = load_config(name, arg)
  exp = experiment.setup(config)
  state = jax.jit(exp.objective.init)(jax.random.key(0))
  rng = np.random.default_rng(0)
  b = config.train.batch_size
  mask = np.r_[np.ones(9), np.zeros(b - 9)].astype(np.float32)
  batch = {"image": rng.uniform(-1, 1, (b, 28, 28, 1)).astype(np.float32),
           "label": rng.integers(0, 10, b).astype(np.int32), "mask": mask}
  other = {k: v.copy() for k, v in batch.items()}
  other["image"][9:] = rng.uniform(-1, 1, (b - 9, 28, 28, 1))
  other["label"][9:] = (other["label"][9:] + 3) % 10
  step = jax.jit(exp.objective.train_step)
  a, _ = step(state, batch, jax.random.key(1))
  c, _ = step(state, other, jax.random.key(1))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c), strict=True):
    np.testing.assert_array_equal(x, y)
  # A sampled row does change it (the test can fail).
  other["image"][0] = -batch["image"][0]
  d, _ = step(state, other, jax.random.key(1))
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(d)))


def _dp_config(name="dp_vae_mnist", **overrides):
  return load_config(name, "smoke", **overrides)


def _final_leaves(config, workdir):
  exp = experiment.setup(config)
  state, _ = experiment.restore_checkpoint(exp, workdir)
  return [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.mark.parametrize("key,value,message", [
    ("privacy.clip_norm", 0.0, "privacy.clip_norm must be > 0"),
    ("privacy.noise_multiplier", -0.5, "privacy.noise_multiplier must be >= 0"),
    ("privacy.target_epsilon", 3.0, "Set one of privacy.noise_multiplier"),
    ("privacy.sampling", "shuffle", "no accountant covers shuffled"),
    ("privacy.expected_batch_size", 17, "privacy.expected_batch_size must be"),
    ("privacy.microbatch_size", 5, "privacy.microbatch_size must be 0 or divide"),
    ("privacy.accountant", "moments", "Unknown privacy.accountant"),
])
def test_impossible_privacy_settings_are_refused(key, value, message):
  config = _dp_config(**{key: value})
  with pytest.raises(config_lib.ConfigError, match=message):
    experiment.validate(config)


def test_privacy_refusals_that_need_the_data():
  with pytest.raises(config_lib.ConfigError, match="must be below 1/N"):
    experiment.setup(_dp_config(**{"privacy.delta": 1e-3}))
  with pytest.raises(config_lib.ConfigError, match="over privacy.epsilon_budget=0.5"):
    experiment.setup(_dp_config(**{"privacy.epsilon_budget": 0.5}))
  # Within the budget, the same run starts.
  exp = experiment.setup(_dp_config(**{"privacy.epsilon_budget": 5.0}))
  assert exp.privacy.noise_multiplier == 1.0 and exp.privacy.num_examples == 4000


def test_privacy_is_refused_where_it_cannot_hold():
  vfae = load_config("vfae_adult", "smoke")
  vfae.privacy = privacy.section(expected_batch_size=8, noise_multiplier=1.0)
  with pytest.raises(config_lib.ConfigError, match="has no DP-SGD step"):
    experiment.validate(vfae)
  fair = load_config("fair_mnist", "method=resample,smoke")
  fair.privacy = privacy.section(expected_batch_size=8, noise_multiplier=1.0)
  with pytest.raises(config_lib.ConfigError, match="resample"):
    experiment.validate(fair)
  with pytest.raises(config_lib.ConfigError, match="batch norm"):
    dpsgd.check_no_batch_stats(nn.BatchNorm(use_running_average=False).init(
        jax.random.key(0), jnp.ones((2, 3))), "discriminator")


def test_a_bad_privacy_config_is_one_line_on_the_command_line(tmp_path):
  workdir = tmp_path / "w"
  result = run_main("--config=experiments/dp_vae_mnist.py:smoke", f"--workdir={workdir}",
                    "--config.privacy.delta=0.01", timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("fairgen: error:")]
  assert len(lines) == 1 and "must be below 1/N" in lines[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_dp_run_reports_epsilon_resumes_exactly_and_refuses_a_new_mechanism(tmp_path):
  """A DP VAE: epsilon in metrics.jsonl is the accountant's at each logged step; 4 steps
  in one go equal 2 + 2 with a restart; resuming with another sigma is refused."""
  config = _dp_config()
  whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
  train.train_and_evaluate(config, whole)
  half = _dp_config(**{"train.num_steps": 2})
  train.train_and_evaluate(half, split)
  train.train_and_evaluate(config, split)
  exp = experiment.setup(config)
  for x, y in zip(_final_leaves(config, whole), _final_leaves(config, split), strict=True):
    np.testing.assert_array_equal(x, y)
  before = _final_leaves(config, whole)
  with open(os.path.join(whole, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  for r in records:
    assert r["epsilon"] == pytest.approx(privacy.epsilon(exp.privacy, r["step"]), rel=1e-12)
    assert 0 < r["batch_examples"] <= config.train.batch_size
  assert records[-1]["epsilon"] > records[0]["epsilon"] > 0
  with open(os.path.join(whole, "privacy.json")) as f:
    assert json.load(f)["noise_multiplier"] == 1.0
  # Every evaluation reports the epsilon of its step, and the mechanism in its provenance.
  config.eval.metrics = ()
  evaluator = runner.Evaluator(exp, real=RealData(config))
  state, _ = experiment.restore_checkpoint(exp, whole)
  assert evaluator(state, 4)["epsilon"] == records[-1]["epsilon"]
  assert evaluator.provenance()["privacy"]["noise_multiplier"] == 1.0
  # So do the samples of --mode=sample.
  config.sample.num = 4
  files = modes.sample(config, whole)
  with open(next(f for f in files if f.endswith("privacy.json"))) as f:
    assert json.load(f)["epsilon"] == records[-1]["epsilon"]
  with np.load(next(f for f in files if f.endswith("grid.npz"))) as npz:
    assert float(npz["epsilon"]) == records[-1]["epsilon"]
  # Even past the config check (a solved sigma changes with train.num_steps, which the
  # experiment fingerprint leaves free), steps of two mechanisms are never one run.
  more_noise = _dp_config(**{"privacy.noise_multiplier": 2.0, "train.num_steps": 6})
  with pytest.raises(checkpoint.WorkdirError, match="another DP mechanism"):
    train.train_and_evaluate(more_noise, whole, allow_new_experiment=True)
  for x, y in zip(_final_leaves(config, whole), before, strict=True):
    np.testing.assert_array_equal(x, y)  # The refused run changed nothing.


def test_dp_runs_agree_on_one_and_eight_devices(tmp_path, partitionable_rng):
  """Each device clips its own rows' gradients (shard_map); the DCGAN's convolution-kernel
  gradients came out wrong on 7 of 8 devices when XLA partitioned the vmap itself. (The
  smoke DCGAN has D dropout: per-example keys on the devices are covered too.) The 8-device
  run clips D's last (Dense) layer by ghost clipping, the 1-device run by per-example
  gradients: the same update either way."""
  name = "dp_dcgan_mnist"
  results = {}
  for n in (1, 8):
    config = load_config(name, "smoke", **{"mesh.data": n, "train.num_steps": 3,
                                           "train.checkpoint_every_steps": 3,
                                           "log.every_steps": 3,
                                           "privacy.ghost_clipping": n == 8})
    summary = train.train_and_evaluate(config, str(tmp_path / f"d{n}"))
    results[n] = summary["scalars"], _final_leaves(config, str(tmp_path / f"d{n}"))
  (s1, p1), (s8, p8) = results[1], results[8]
  assert s1["epsilon"] == s8["epsilon"] > 0
  for key in s1:
    if key not in TIMING_KEYS:
      np.testing.assert_allclose(s8[key], s1[key], rtol=1e-5, atol=1e-6, err_msg=key)
  for a, b in zip(p1, p8, strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
