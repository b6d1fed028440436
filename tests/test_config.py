"""Every experiment config and variant validates; impossible values are named."""

import glob
import os

import pytest

from conftest import EXPERIMENTS, load_config
from fairgen import checkpoint, config as config_lib, experiment, parallel, privacy, train

VARIANTS = {"dcgan_mnist": [None, "smoke", "full", "seeds"],
            "vae_mnist": [None, "smoke", "conv", "digits", "conditional"],
            "adult_debias": [None, "smoke", "plain", "full_features"],
            "vfae_adult": [None, "smoke", "no_mmd"],
            "fair_tabgan_adult": [None, "smoke", "plain"],
            "fair_mnist": [None, "smoke", "method=importance", "method=resample",
                           "method=conditional", "method=penalty,smoke",
                           "method=importance,model=vae", "method=resample,attribute=color",
                           "method=conditional,model=vae,smoke", "model=ddpm",
                           "method=conditional,model=ddpm,smoke", "model=edm",
                           "method=resample,model=flow", "method=conditional,model=edm,smoke",
                           "method=guidance,model=edm"],
            "ddpm_mnist": [None, "smoke", "conditional", "cosine"],
            "ddpm_cifar10": [None, "smoke"],
            "edm_cifar10": [None, "smoke"],
            "edm_mnist": [None, "smoke", "conditional", "vp", "ve", "stochastic"],
            "flow_mnist": [None, "smoke", "conditional", "logit_normal", "adaptive"],
            "ldm_mnist": [None, "smoke", "stage=autoencoder", "stage=autoencoder,smoke",
                          "objective=edm", "objective=ddpm,smoke", "conditional"],
            "dit_mnist": [None, "smoke", "objective=flow", "objective=ddpm,smoke",
                          "conditional,objective=edm"],
            "resnet_gan_mnist": [None, "smoke"],
            "sngan_cifar10": [None, "smoke"],
            "dp_vae_mnist": [None, "smoke", "eps=1", "eps=inf"],
            "dp_diffusion_mnist": [None, "smoke", "eps=1", "eps=inf"],
            "dp_dcgan_mnist": [None, "smoke", "eps=1", "eps=inf", "conditional,smoke"],
            "dp_adult_debias": [None, "smoke", "eps=10", "eps=inf", "plain,smoke"],
            "beta_vae_mnist": [None, "smoke", "beta=0.25", "beta=4,smoke"],
            "ar_mnist": [None, "smoke", "sinusoidal", "full_attention", "conditional"],
            "fair_celeba": [None, "smoke", "method=importance,bias=multi",
                            "method=conditional,bias=80_20", "method=penalty,smoke"],
            "image_folder": [None, "smoke", "method=resample", "method=conditional,smoke",
                             "method=importance"]}


def test_every_experiment_file_is_covered():
  files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(EXPERIMENTS, "*.py"))}
  assert files == set(VARIANTS)


@pytest.mark.parametrize("name,variant",
                         [(n, v) for n, vs in VARIANTS.items() for v in vs])
def test_variants_validate(name, variant):
  config = load_config(name, variant)
  if name == "image_folder":  # The one key a user must give (checked before any file is read).
    config.data.options.update(directory="/data/my_images", groups="young", reference="ref")
  if "latent" in config:  # The first stage's workdir (restored when the run is built).
    config.latent.workdir = "/data/autoencoder"
  train.validate(config)
  for section in config_lib.REQUIRED_SECTIONS:
    assert section in config


def test_unknown_variant_is_refused():
  with pytest.raises(config_lib.ConfigError, match="smoke"):
    load_config("dcgan_mnist", "smok")


@pytest.mark.parametrize("key,value,message", [
    ("train.num_steps", 0, "train.num_steps must be >= 1"),
    ("optim.disc.lr", 0.0, "optim.disc.lr must be > 0"),
    ("objective.n_disc", 0, "objective.n_disc must be >= 1"),
    ("objective.ema_decay", 1.0, "objective.ema_decay"),
    ("model.name", "stylegan9", "valid names: .*dcgan.*vae"),
    ("objective.name", "difusion", "valid names: .*gan, vae"),
])
def test_impossible_values_name_the_key(key, value, message):
  config = load_config("dcgan_mnist", "smoke", **{key: value})
  with pytest.raises(config_lib.ConfigError, match=message):
    train.validate(config)


def test_unknown_model_hyperparameter_is_named():
  config = load_config("vae_mnist", "smoke")
  with config.unlocked():
    config.model.depth = 3
  with pytest.raises(config_lib.ConfigError, match="model.depth"):
    train.validate(config)


def test_mesh_larger_than_the_devices_is_refused():
  with pytest.raises(parallel.MeshError, match="16.*8 device"):
    parallel.make_mesh(16)


def test_fingerprint_ignores_run_length_but_not_the_model(tmp_path):
  config = load_config("dcgan_mnist", "smoke")
  checkpoint.check_and_write_config(str(tmp_path), config)
  config.train.num_steps = 100  # a longer run of the same experiment is fine
  checkpoint.check_and_write_config(str(tmp_path), config)
  config.model.latent_dim = 7
  with pytest.raises(checkpoint.WorkdirError, match="model.latent_dim: 16 -> 7"):
    checkpoint.check_and_write_config(str(tmp_path), config)


def test_a_workdir_from_before_model_dtype_resumes_in_float32_only(tmp_path):
  config = load_config("vae_mnist", "smoke")
  del config.model["dtype"]  # A config.json written before the key existed.
  checkpoint.check_and_write_config(str(tmp_path), config)
  config = load_config("vae_mnist", "smoke")
  checkpoint.check_and_write_config(str(tmp_path), config)  # dtype='float32': the same run.
  config.model.dtype = "bfloat16"
  with pytest.raises(checkpoint.WorkdirError, match="model.dtype: None -> 'bfloat16'"):
    checkpoint.check_and_write_config(str(tmp_path), config)


def test_workdirs_from_before_the_nested_and_privacy_keys_resume(tmp_path):
  """fair.ratio.noise_multiplier (two levels down) and privacy.ghost_clipping were added
  later: at their defaults a workdir without them is the same experiment, not otherwise."""
  config = load_config("fair_mnist", "method=importance,smoke")
  config.privacy = privacy.section(expected_batch_size=8, noise_multiplier=1.0)
  del config.fair.ratio["noise_multiplier"], config.privacy["ghost_clipping"]
  checkpoint.check_and_write_config(str(tmp_path), config)
  config.fair.ratio.noise_multiplier = 3.0
  config.privacy.ghost_clipping = False
  checkpoint.check_and_write_config(str(tmp_path), config)  # The defaults: the same run.
  config.fair.ratio.noise_multiplier = 2.0
  with pytest.raises(checkpoint.WorkdirError, match="fair.ratio.noise_multiplier: None -> 2.0"):
    checkpoint.check_and_write_config(str(tmp_path), config)
  config.fair.ratio.noise_multiplier = 3.0
  config.privacy.ghost_clipping = True
  with pytest.raises(checkpoint.WorkdirError, match="privacy.ghost_clipping: None -> True"):
    checkpoint.check_and_write_config(str(tmp_path), config)


@pytest.mark.parametrize("defaults", [None, experiment.section_defaults])
def test_a_gan_workdir_from_before_objective_loss_resumes_with_the_same_loss_only(
    tmp_path, defaults):
  """Without the families' defaults, config.ADDED_KEYS makes a key at the value such
  workdirs ran with the same as an absent one; with them (test_experiment_defaults.py),
  every key at its default is."""
  config = load_config("dcgan_mnist", "seeds")  # The seeds' recipe states none of the keys.
  checkpoint.check_and_write_config(str(tmp_path), config, defaults=defaults)
  config.objective.update(loss="nonsaturating", gp_weight=0.0, r1_gamma=0.0, r1_every=1,
                          diffaugment="")
  # The defaults: the same run.
  checkpoint.check_and_write_config(str(tmp_path), config, defaults=defaults)
  config.objective.loss = "hinge"
  with pytest.raises(checkpoint.WorkdirError, match="objective.loss: .* -> 'hinge'"):
    checkpoint.check_and_write_config(str(tmp_path), config, defaults=defaults)


def test_the_main_jobs_learning_rates_reach_zero_at_its_last_step_and_raising_steps_warns():
  """The main job decays both rates linearly to 0 over exactly its run (its recipe, README;
  the schedule itself: test_resnet_gan); with num_steps raised alone the rates would sit at
  0, and validation says so."""
  for variant in (None, "full"):
    config = load_config("dcgan_mnist", variant)
    for name in ("gen", "disc"):
      assert config.optim[name].linear_decay_steps == config.train.num_steps, (variant, name)
    assert train.early_decay_warnings(config) == []
  assert "linear_decay_steps" not in load_config("dcgan_mnist", "seeds").optim.gen
  config = load_config("dcgan_mnist", None, **{"train.num_steps": 12000})
  assert train.early_decay_warnings(config) == [
      f"optim.{n}.linear_decay_steps=10000 < train.num_steps=12000: its learning rate is 0 "
      "from update 10000 on." for n in ("gen", "disc")]
  vae = load_config("vae_mnist", None, **{"train.num_steps": 10**6})
  assert train.early_decay_warnings(vae) == []  # No decay at all: nothing to warn about.
