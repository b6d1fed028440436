"""A user's mistake ends in one ``fairgen: error: ...`` line, exit status 2, no traceback.

Config files that cannot be loaded, workdirs that cannot be used, and values that are
impossible for their key; nothing is written and no earlier result is touched.
"""

import errno
import os

import ml_collections
import pytest

from conftest import load_config, run_main
from fairgen import checkpoint
from fairgen import config as config_lib
from fairgen import train
from fairgen.evaluation import modes

SMOKE = "experiments/vae_mnist.py:smoke"


def _assert_one_line_error(result, *fragments):
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  lines = [line for line in result.stderr.splitlines() if line.startswith("fairgen: error:")]
  assert len(lines) == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


CONFIG_FILES = {
    "missing.py": (None, "no such file"),
    "raises.py": ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
    "raises_in_get_config.py": ("def get_config(arg=None):\n  return {}['x']\n",
                                "KeyError"),
    "not_python.py": ("this is not python(\n", "SyntaxError"),
    "no_get_config.py": ("x = 1\n", "has no get_config()"),
    "returns_a_dict.py": ("def get_config(arg=None):\n  return {'a': 1}\n", "not a ConfigDict"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_a_config_file_that_cannot_be_loaded(name, tmp_path):
  text, fragment = CONFIG_FILES[name]
  path = tmp_path / name
  if text is not None:
    path.write_text(text)
  workdir = tmp_path / "workdir"
  result = run_main(f"--config={path}", f"--workdir={workdir}", timeout=120)
  _assert_one_line_error(result, fragment)
  assert not workdir.exists()


@pytest.mark.parametrize("arg,fragment", [
    ("experiments/fair_mnist.py:method=reweight", "Unknown method='reweight'"),
    ("experiments/fair_mnist.py:tiny", "Unknown config flag 'tiny'"),
    ("experiments/fair_mnist.py:colour=red", "Unknown config key 'colour'"),
    ("experiments/dcgan_mnist.py:smok", "Unknown config variant 'smok'"),
    ("experiments", "no such file (it is a directory)"),
])
def test_an_unknown_variant_or_flag_of_a_config(arg, fragment, tmp_path):
  result = run_main(f"--config={arg}", f"--workdir={tmp_path / 'w'}", timeout=120)
  _assert_one_line_error(result, fragment)


def test_load_config_file_reports_one_line(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("def get_config(arg=None):\n  raise ValueError('line one\\nline two')\n")
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.load_config_file(str(path))
  assert "\n" not in str(info.value) and "ValueError: line one" in str(info.value)


def test_a_workdir_that_is_a_file_or_below_one(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("precious")
  for workdir, fragment in ((a_file, "is an existing file"),
                            (a_file / "sub", "lies below")):
    result = run_main(f"--config={SMOKE}", f"--workdir={workdir}", timeout=240)
    _assert_one_line_error(result, fragment)
  assert a_file.read_text() == "precious"


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_an_unwritable_workdir_is_refused_before_training(code, tmp_path, monkeypatch):
  """Permissions and read-only filesystems (root ignores mode bits, so the OS is faked)."""
  real_open = open

  def refuse(path, *args, **kwargs):
    if ".write_probe." in str(path):
      raise OSError(code, os.strerror(code), str(path))
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr("builtins.open", refuse)
  with pytest.raises(checkpoint.WorkdirError, match=f"cannot be written: {os.strerror(code)}"):
    checkpoint.ensure_writable(str(tmp_path / "w"))


@pytest.mark.parametrize("name,key,value,fragment", [
    ("dcgan_mnist", "model.width", -0.5, "model.width must be > 0"),
    ("dcgan_mnist", "model.latent_dim", 0, "model.latent_dim must be a positive integer"),
    ("vae_mnist", "model.hidden", (64, 0), "model.hidden must be positive layer widths"),
    ("dcgan_mnist", "model.dropout", 1.0, "model.dropout must be in [0, 1)"),
    ("fair_mnist", "fair.alpha", -0.5, "fair.alpha must be >= 0"),
    ("fair_mnist", "fair.target", (0.7, 0.7), "fair.target must be a probability"),
    ("fair_mnist", "fair.ratio.batch_size", 7, "fair.ratio.batch_size must be even"),
    ("dcgan_mnist", "log.num_samples", 0, "log.num_samples must be >= 1"),
    ("dcgan_mnist", "eval.checkpoint", "12.5", "eval.checkpoint must be 'latest', 'best'"),
    ("dcgan_mnist", "sample.checkpoint", "-3", "sample.checkpoint must be 'latest', 'best'"),
    ("dcgan_mnist", "objective.loss", "hinge2", "Unknown objective.loss='hinge2'"),
    ("dcgan_mnist", "optim.gen.b1", 1.0, "optim.gen.b1 must be in [0, 1)"),
    ("vae_mnist", "optim.name", "sgdd", "Unknown optim.name='sgdd'"),
    ("vae_mnist", "data.prefetch", -1, "data.prefetch must be >= 0"),
    ("vae_mnist", "eval.kid_subset_size", 1, "eval.kid_subset_size must be >= 2"),
    ("ddpm_mnist", "objective.sample_steps", 50, "objective.sample_steps must be an integer"),
    ("ddpm_mnist", "optim.warmup_steps", -5, "optim.warmup_steps must be >= 0"),
    ("edm_mnist", "objective.parameterization", "vpsde", "objective.parameterization must be"),
    ("edm_mnist", "objective.sigma_min", 90.0, "objective.sigma_min and sigma_max must"),
    ("edm_mnist", "objective.s_churn", -1.0, "objective.s_churn must be >= 0"),
    ("flow_mnist", "objective.sampler", "rk4", "objective.sampler must be one of euler, heun"),
    ("flow_mnist", "objective.noise_multiplicity", 0, "objective.noise_multiplicity must be a"),
    ("fair_mnist", "fair.guidance.scale", -1.0, "fair.guidance.scale must be >= 0"),
])
def test_impossible_values_name_their_key(name, key, value, fragment):
  config = load_config(name, "smoke")
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  with config.unlocked():
    node[leaf] = value
  with pytest.raises(config_lib.ConfigError) as info:
    train.validate(config)
  assert fragment in str(info.value) and "\n" not in str(info.value)


NAN, INF = float("nan"), float("inf")


def _set(config, key, value):
  """Sets a dotted key of ``config``, creating sections that do not exist."""
  node = config
  *parents, leaf = key.split(".")
  with config.unlocked():
    for p in parents:
      if p not in node:
        node[p] = ml_collections.ConfigDict()
      node = node[p]
    node[leaf] = value


# (config, dotted key, value, the key and value the message names): NaN and +-inf in every
# kind of section, nested ones, a tuple, and a section no family owns.
NON_FINITE = [
    ("vae_mnist", "optim.lr", NAN, "optim.lr=nan"),
    ("vae_mnist", "objective.beta", INF, "objective.beta=inf"),
    ("dcgan_mnist", "optim.gen.lr", NAN, "optim.gen.lr=nan"),
    ("dcgan_mnist", "optim.disc.b2", -INF, "optim.disc.b2=-inf"),
    ("dcgan_mnist", "objective.gp_weight", NAN, "objective.gp_weight=nan"),
    ("dcgan_mnist", "model.dropout", INF, "model.dropout=inf"),
    ("vae_mnist", "eval.truncation", NAN, "eval.truncation=nan"),
    ("vae_mnist", "sample.truncation", INF, "sample.truncation=inf"),
    ("fair_mnist", "fair.alpha", NAN, "fair.alpha=nan"),
    ("fair_mnist", "fair.ratio.lr", INF, "fair.ratio.lr=inf"),
    ("fair_mnist", "fair.target", (0.5, NAN), "fair.target[1]=nan"),
    ("fair_mnist", "data.options.ref_fraction", -INF, "data.options.ref_fraction=-inf"),
    ("fair_mnist", "data.options.proportions", (INF, 0.1), "data.options.proportions[0]=inf"),
    ("dp_vae_mnist", "privacy.clip_norm", NAN, "privacy.clip_norm=nan"),
    ("dp_vae_mnist", "privacy.delta", INF, "privacy.delta=inf"),
    ("vae_mnist", "extra.scale", (1.0, (2.0, -INF)), "extra.scale[1][1]=-inf"),
]


@pytest.mark.parametrize("name,key,value,named", NON_FINITE)
def test_a_non_finite_number_in_any_section_is_refused(name, key, value, named):
  config = load_config(name, "smoke")
  _set(config, key, value)
  with pytest.raises(config_lib.ConfigError) as info:
    train.validate(config)
  assert str(info.value) == f"{named} is not a finite number."


def test_evaluate_and_sample_refuse_a_non_finite_number_first(tmp_path):
  """Before they read the workdir (which does not exist here) or build anything."""
  config = load_config("vae_mnist", "smoke")
  _set(config, "optim.lr", NAN)
  for mode in (modes.evaluate, modes.sample):
    with pytest.raises(config_lib.ConfigError, match=r"^optim\.lr=nan is not a finite"):
      mode(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_a_non_finite_override_fails_on_the_command_line(tmp_path):
  result = run_main("--config=experiments/dcgan_mnist.py:smoke", f"--workdir={tmp_path / 'w'}",
                    "--config.optim.gen.lr=nan", timeout=240)
  line = _assert_one_line_error(result)
  assert line == "fairgen: error: optim.gen.lr=nan is not a finite number."
  assert not (tmp_path / "w").exists()


def test_a_misspelt_dataset_option_is_an_error():
  config = load_config("fair_mnist", "smoke")
  with config.unlocked():
    config.data.options.ref_fracton = 0.5
  with pytest.raises(config_lib.ConfigError, match="data.options.ref_fracton.*ref_fraction"):
    train.validate(config)


def test_the_readme_adult_dir_override_works(tmp_path):
  """README: ``--config.data.options.adult_dir=DIR`` reads another copy of the files."""
  result = run_main("--config=experiments/adult_debias.py:full_features",
                    f"--workdir={tmp_path / 'w'}", f"--config.data.options.adult_dir={tmp_path}",
                    timeout=240)
  # The override is accepted (no unknown key) and reaches the loader, which names the path.
  _assert_one_line_error(result, f"{tmp_path}/adult.data does not exist")


def test_impossible_values_fail_on_the_command_line_too(tmp_path):
  result = run_main(f"--config={SMOKE}", f"--workdir={tmp_path / 'w'}",
                    "--config.model.latent_dim=0", timeout=240)
  _assert_one_line_error(result, "model.latent_dim must be a positive integer")
  assert not (tmp_path / "w").exists()
