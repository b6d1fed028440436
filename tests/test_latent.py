"""Latent diffusion: ``ldm_mnist.py``'s two stages through the loop. The second stage trains
the config-built denoising objective on the frozen first stage's encoded images, its
checkpoints carry the autoencoder unchanged, sampling decodes, resumption is exact, and a
first stage that cannot serve is refused in one line before anything is written.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import assert_resume_is_exact, load_config, run_main
from fairgen import checkpoint, data, experiment, models, objectives, train
from fairgen.config import ConfigError
from fairgen.models.vae import VAE
from fairgen.objectives import latent

SCALE = 0.7


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory):
  """A smoke autoencoder trained for 2 steps: (workdir, its parameters)."""
  config = load_config("ldm_mnist", "stage=autoencoder,smoke", **{"train.num_steps": 2})
  workdir = str(tmp_path_factory.mktemp("autoencoder"))
  train.train_and_evaluate(config, workdir)
  exp = experiment.setup(config, for_training=False)
  state, _ = experiment.restore_checkpoint(exp, workdir)
  return workdir, jax.device_get(state["params"])


def second_stage(first_stage_dir, **overrides):
  return load_config("ldm_mnist", "smoke", **{"latent.workdir": first_stage_dir,
                                             "train.num_steps": 2, **overrides})


def test_the_denoiser_trains_on_the_frozen_encoders_latents_and_decodes(first_stage, tmp_path):
  """The config-built step's loss is the denoising loss of the encoded batch (posterior
  mean, times the scale), the checkpoint's autoencoder is the first stage's, and decode
  runs the unclipped latent sampler, then the first stage's decoder."""
  first_dir, first_params = first_stage
  config = second_stage(first_dir, **{"latent.scale": SCALE, "latent.posterior": "mean"})
  workdir = str(tmp_path / "ldm")
  assert train.train_and_evaluate(config, workdir)["final_step"] == 2
  exp = experiment.setup(config)
  state, _ = experiment.restore_checkpoint(exp, workdir)
  for a, b in zip(jax.tree.leaves(state[latent.AUTOENCODER]), jax.tree.leaves(first_params)):
    np.testing.assert_array_equal(np.asarray(a), b)

  vae = models.build(load_config("ldm_mnist", "stage=autoencoder,smoke").model, exp.spec)
  spec = latent.latent_spec(exp.spec, vae)
  assert spec.image_shape == (7, 7, 4)
  inner = objectives.build(config.objective, config.optim, models.build(config.model, spec),
                           spec)
  inner_state = {k: v for k, v in state.items() if k in ("step", "params", "opt", "ema")}
  batch = data.load(config.data, "train").get(np.arange(8))
  batch = {"image": jnp.asarray(batch["image"]), "label": jnp.asarray(batch["label"])}
  mean, _ = vae.apply({"params": first_params}, batch["image"], method=VAE.encode)
  encoded = {**batch, "image": SCALE * mean.reshape(8, 7, 7, 4)}
  rng = jax.random.key(3)
  _, want = inner.train_step(inner_state, encoded, rng)
  encoded_loss = want["loss"]
  _, got = exp.objective.train_step(state, batch, rng)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
  # posterior='sample' (latent.DEFAULTS'): the step's own draw, fixed by (seed, step).
  config.latent.posterior = "sample"
  sampling = experiment.setup(config).objective
  key = jax.random.fold_in(jax.random.fold_in(rng, state["step"]), latent._ENCODE_STREAM)
  mean, logvar = vae.apply({"params": first_params}, batch["image"], method=VAE.encode)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
  _, want = inner.train_step(inner_state, {**batch, "image": SCALE * z.reshape(8, 7, 7, 4)}, rng)
  _, got = sampling.train_step(state, batch, rng)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
  assert abs(float(got["loss"]) - float(encoded_loss)) > 1e-4

  z = jax.random.normal(jax.random.key(4), (4, exp.objective.latent_dim))
  labels = jnp.zeros((4,), jnp.int32)
  sampled = inner.decode(inner_state, z, labels)
  assert np.max(np.abs(sampled)) > 1.5  # Latents are not clipped to [-1, 1].
  out = vae.apply({"params": first_params}, sampled.reshape(4, -1) / SCALE, method=VAE.decode)
  want_images = vae.apply({"params": first_params}, out, method=VAE.mean_image)
  images = exp.objective.decode(state, z, labels)
  assert images.shape == (4, 28, 28, 1)
  np.testing.assert_allclose(images, want_images, atol=1e-5)


def test_the_second_stage_resumes_exactly_and_samples_images(first_stage, tmp_path):
  """With posterior samples the encoder's noise is fixed by (seed, step): stopped at step 1
  and resumed equals the straight run; --mode=sample decodes."""
  config = second_stage(first_stage[0], **{"train.checkpoint_every_steps": 2,
                                           "log.every_steps": 1, "latent.posterior": "sample"})
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(config, straight)
  assert_resume_is_exact(config, tmp_path, 1, straight)
  from fairgen.evaluation import modes
  files = modes.sample(config, straight)
  assert any(f.endswith("trajectory.png") for f in files)
  images = np.load(next(f for f in files if f.endswith("grid.npz")))["images"]
  assert images.shape[1:] == (28, 28, 1) and images.min() >= -1 and images.max() <= 1


def _workdir_with_config(tmp_path, name, arg, **overrides):
  """A directory holding only the config.json a run of ``name:arg`` would write."""
  config = load_config(name, arg, **overrides)
  directory = tmp_path / name
  directory.mkdir()
  (directory / checkpoint.CONFIG_FILE).write_text(config.to_json())
  return str(directory)


@pytest.mark.parametrize("case", ["empty", "not_a_workdir", "dcgan", "flat_vae",
                                  "no_checkpoint", "colour_images", "privacy", "vae"])
def test_a_first_stage_that_cannot_serve_is_refused_before_anything_is_written(
    case, first_stage, tmp_path):
  overrides, fragment, error = {}, "", ConfigError
  first = first_stage[0]
  if case == "empty":
    first, fragment = "", "latent.workdir must name the first stage's workdir"
  elif case == "not_a_workdir":
    first, fragment = str(tmp_path), "holds no config.json"
    error = checkpoint.WorkdirError
  elif case == "dcgan":
    first = _workdir_with_config(tmp_path, "dcgan_mnist", "smoke")
    fragment = "holds a run of model 'dcgan', not a VAE"
  elif case == "flat_vae":
    first = _workdir_with_config(tmp_path, "vae_mnist", "smoke")
    fragment = "a VAE with a flat latent"
  elif case == "no_checkpoint":
    first = _workdir_with_config(tmp_path, "ldm_mnist", "stage=autoencoder,smoke")
    fragment, error = "does not exist: train this workdir first", checkpoint.WorkdirError
  elif case == "colour_images":  # The autoencoder was trained on grey digits.
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i in range(4):
      Image.fromarray(np.full((28, 28, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    overrides = {"data.name": "image_folder", "data.options": {
        "directory": str(folder.parent), "image_size": 28, "cache_dir": str(tmp_path / "c")}}
    fragment, error = "another shape than (28, 28, 3)", checkpoint.WorkdirError
  elif case == "privacy":
    overrides = {"privacy": load_config("dp_diffusion_mnist", "smoke").privacy}
    fragment = "DP-SGD with a latent section is not supported"
  elif case == "vae":
    overrides = {"objective": load_config("vae_mnist", "smoke").objective}
    fragment = "not 'vae'"
  config = second_stage(first, **overrides)
  workdir = tmp_path / "second"
  before = sorted(os.listdir(first_stage[0]))
  with pytest.raises(error, match=None) as caught:
    train.train(config, str(workdir))
  assert fragment in str(caught.value), str(caught.value)
  assert "\n" not in str(caught.value)
  assert not workdir.exists()
  assert sorted(os.listdir(first_stage[0])) == before


def test_the_launcher_refuses_a_flat_latent_first_stage_in_one_line(tmp_path):
  first = _workdir_with_config(tmp_path, "vae_mnist", "smoke")
  result = run_main("--config=experiments/ldm_mnist.py:smoke", f"--workdir={tmp_path / 'w'}",
                    f"--config.latent.workdir={first}", timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("fairgen: error:")]
  assert len(lines) == 1 and "flat latent" in lines[0] and "Traceback" not in result.stderr
  assert json.loads(open(os.path.join(first, checkpoint.CONFIG_FILE)).read())


def test_guidance_toward_groups_reaches_the_latents_through_the_decoder(first_stage, tmp_path):
  """fair.method='guidance' with a latent section (flow matching on biased MNIST's digit
  groups): the sampler runs in latent space and the attribute classifier judges the
  decoded estimates. With the untrained denoiser (its velocity is 0, so unguided samples
  decode the starting noise) a strong guidance puts every decoded sample in its assigned
  group by that classifier; unguided, about half of them."""
  from ml_collections import ConfigDict
  from fairgen import fairness
  from fairgen.classifiers import backbones, fit
  options = {"attribute": "digit_group", "subset": "balanced", "biased_size": 200}
  source = data.load({"name": "biased_mnist", "options": options}, "train")
  params, info = fit.train_classifier(source, data.load(
      {"name": "biased_mnist", "options": options}, "test"), label_key="attr",
      num_classes=2, steps=30, width=8)
  classifier = str(tmp_path / "attr")
  backbones.save_classifier(classifier, params, info, overwrite=True)
  labels = jnp.arange(16) % 2
  matched = {}
  for scale in (0.0, 300.0):
    fair = fairness.fair_section("guidance")
    fair.update(classifier_dir=classifier, target=(0.5, 0.5))
    fair.guidance.scale = scale
    config = second_stage(first_stage[0], **{
        "data.name": "biased_mnist", "data.options": ConfigDict(options),
        "objective.sample_steps": 6})
    with config.unlocked():
      config.fair = fair
    exp = experiment.setup(config)
    assert exp.objective.num_classes == 2 and exp.objective.condition_key == "attr"
    state = jax.jit(exp.objective.init)(exp.init_rng)
    images = jax.jit(exp.objective.generate)(state, jax.random.key(0), labels)
    assert images.shape == (16, 28, 28, 1)
    logits = backbones.classifier_model(info["architecture"]).apply(
        {"params": params}, images, train=False)["logits"]
    matched[scale] = float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(labels)))
  assert matched[0.0] <= 0.75 and matched[300.0] == 1.0, matched
