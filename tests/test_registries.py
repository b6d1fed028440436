"""A model or a dataset is one file: it registers itself with its keys, defaults and checks.

Toys registered from this test module (as a new file would) reach ``validate``, ``build``,
``load`` and ``cache_tag`` without any other edit; the package ``__init__`` files hold no
logic, and every built-in entry lives in its own network's or dataset's module.
"""

import ast
import os

import numpy as np
import pytest

from conftest import REPO
from fairgen import data, fairness, models, objectives
from fairgen.config import ConfigError
from fairgen.data import base, registry as data_registry, tabular
from fairgen.models import registry as model_registry

TOY_SPEC = base.DataSpec("toy_registry_data", (2, 2, 1), 2)


def check_toy_options(scale: float = 1.0, pick: int = 0) -> None:
  """The toy's option check: scale must be positive."""
  del pick
  if scale <= 0:
    raise base.DataError(f"scale must be > 0, got {scale}.")


@data_registry.register("toy_registry_data", check=check_toy_options,
                        domain_options=("scale",))
def toy_data(split: str, scale: float = 1.0, pick: int = 0) -> base.ArraySource:
  """Four constant images; ``scale`` changes them (a domain option), ``pick`` does not."""
  del split, pick
  images = np.full((4, 2, 2, 1), 0.5 * min(scale, 1.0), np.float32)
  return base.ArraySource(TOY_SPEC, {"image": images, "label": np.array([0, 1, 0, 1],
                                                                        np.int32)})


@models.MODELS.register("toy_registry_model")
def build_toy_model(spec: base.DataSpec, latent_dim: int = 3,
                    conditional: bool = False) -> models.GanModules:
  """A toy GAN builder: nothing but its keys, defaults and checks."""
  num_classes = model_registry.num_conditions(spec, conditional, "label")
  return models.GanModules(None, None, latent_dim, num_classes)


def test_a_dataset_registered_from_its_own_file_is_checked_loaded_and_tagged():
  assert "toy_registry_data" in data.DATASETS.names()
  data.validate({"name": "toy_registry_data", "options": {"scale": 2.0}})
  with pytest.raises(ConfigError, match="Unknown key data.options.size.*scale, pick"):
    data.validate({"name": "toy_registry_data", "options": {"size": 2}})
  with pytest.raises(ConfigError, match="data.eval_options of 'toy_registry_data'.*scale"):
    data.validate({"name": "toy_registry_data", "eval_options": {"scale": -1.0}})
  assert len(data.load({"name": "toy_registry_data"}, "train")) == 4
  assert data.cache_tag({"name": "toy_registry_data", "options": {"pick": 3}}) == (
      "toy_registry_data")
  assert data.cache_tag({"name": "toy_registry_data", "options": {"scale": 2.0}}) == (
      "toy_registry_data-scale=2.0")


def test_a_name_registers_once():
  with pytest.raises(ValueError, match="registered twice"):
    data_registry.register("toy_registry_data")(toy_data)
  with pytest.raises(ValueError, match="registered twice"):
    models.MODELS.register("toy_registry_model")(build_toy_model)


def test_a_model_registered_from_its_own_file_is_checked_and_built():
  models.validate({"name": "toy_registry_model", "latent_dim": 5})
  with pytest.raises(ConfigError, match="Unknown key model.width.*latent_dim, conditional"):
    models.validate({"name": "toy_registry_model", "width": 1.0})
  with pytest.raises(ConfigError, match="model.latent_dim must be a positive integer"):
    models.validate({"name": "toy_registry_model", "latent_dim": 0})
  nets = models.build({"name": "toy_registry_model", "conditional": True}, TOY_SPEC)
  assert (nets.latent_dim, nets.num_classes) == (3, 2)


@pytest.mark.parametrize("package", ["models", "data", "objectives", "fairness", "privacy",
                                     "evaluation", "metrics"])
def test_package_inits_only_import_and_document(package):
  path = os.path.join(REPO, "fairgen", package, "__init__.py")
  tree = ast.parse(open(path).read())
  logic = [type(n).__name__ for n in tree.body
           if not isinstance(n, (ast.Import, ast.ImportFrom, ast.Expr, ast.Assign))]
  assigned = [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets]
  assert not logic and assigned in ([], ["__all__"]), (logic, assigned)


def test_builtin_entries_live_beside_their_networks_and_loaders():
  # Entries from fairgen itself (test modules register their own toys in the same process).
  builders = {name: models.MODELS.get(name).__module__ for name in models.MODELS.names()
              if models.MODELS.get(name).__module__.startswith("fairgen.")}
  assert builders == {
      "dcgan": "fairgen.models.dcgan", "resnet_gan": "fairgen.models.resnet_gan",
      "vae": "fairgen.models.vae", "unet": "fairgen.models.unet",
      "fair_mlp": "fairgen.models.tabular", "pixel_transformer": "fairgen.models.transformer",
      "vfae": "fairgen.models.vfae", "tabgan": "fairgen.models.tabgan",
      "dit": "fairgen.models.dit", "ddpmpp": "fairgen.models.ddpmpp"}
  loaders = {name: data.DATASETS.get(name).loader.__module__ for name in data.DATASETS.names()
             if data.DATASETS.get(name).loader.__module__.startswith("fairgen.")}
  assert set(loaders.values()) == {
      "fairgen.data.offline", "fairgen.data.tfds_datasets", "fairgen.data.uci",
      "fairgen.data.adult_aif360", "fairgen.data.bias", "fairgen.data.image_folder"}
  builds = {name: objectives.OBJECTIVES.get(name).build.__module__
            for name in objectives.OBJECTIVES.names()
            if objectives.OBJECTIVES.get(name).build.__module__.startswith("fairgen.")}
  assert builds == {name: f"fairgen.objectives.{module}" for name, module in (
      ("gan", "gan"), ("vae", "vae"), ("diffusion", "diffusion"), ("vfae", "vfae"),
      ("adversarial_debiasing", "debias"), ("autoregressive", "autoregressive"),
      ("tabgan", "tabgan"), ("edm", "edm"), ("flow", "flow"))}
  hooks = {name: fairness.METHODS.get(name).prepare for name in ("importance", "resample")}
  assert {name: hook.__module__ for name, hook in hooks.items()} == {
      "importance": "fairgen.fairness.importance", "resample": "fairgen.fairness.resample"}
  assert data.DATASETS.get("biased_mnist").domain_options == (
      "attribute", "num_colors", "digits", "color_seed")
  assert data.DATASETS.get("mnist_5k").check is data.offline.check_mnist_5k_options


def test_tabular_source_is_an_array_source_checked_as_a_table():
  spec = tabular.TabularSpec("toy", 2, 2, 2, "s", "s == 'a'", "y == 1", ())
  rows = {"features": np.zeros((3, 2), np.float32), "label": np.array([0, 1, 1], np.int32),
          "attr": np.array([1, 0, 1], np.int32)}
  source = tabular.TabularSource(spec, rows)
  assert isinstance(source, base.ArraySource) and len(source) == 3
  assert source.get(np.array([2, 0]))["label"].tolist() == [1, 0]
  with pytest.raises(base.DataError, match="attr values must be in"):
    tabular.TabularSource(spec, {**rows, "attr": np.array([0, 2, 1], np.int32)})
