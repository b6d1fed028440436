"""The composition root: the one place where a config becomes objects (vdm's Experiment).

``validate`` asks every family to check its own config section (data, model, objective,
fairness; the common sections are ``fairgen.config``'s), so an impossible value stops a run
before anything compiles. ``setup`` builds the mesh, model, objective (with its fairness
mitigation) and the abstract sharded state. Training, evaluation, sampling, the tools and
the tests all start here, and nothing else wires families together.

``setup(config, spec, for_training=False)`` builds what evaluation and sampling need from a
dataset spec alone: it neither reads the training split nor loads the frozen classifier that
only the training step's fairness penalty uses.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fairgen import checkpoint
from fairgen import config as config_lib
from fairgen import data
from fairgen import fairness
from fairgen import models
from fairgen import objectives
from fairgen.objectives import latent
from fairgen import parallel
from fairgen import privacy
from fairgen.privacy import ledger
from fairgen import robust
from fairgen import storage


@dataclasses.dataclass
class Experiment:
  """Everything built from a config that training, evaluation and sampling share."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  spec: data.DataSpec
  objective: objectives.Objective
  abstract_state: Any
  state_shardings: Any
  init_rng: jax.Array
  step_rng: jax.Array
  sample_rng: jax.Array
  # DP-SGD's resolved parameters when the config has a privacy section (None otherwise).
  privacy: privacy.DpSettings | None = None

  @functools.cached_property
  def sharded_decode(self) -> Any:
    """``objective.decode`` jitted with latents and labels split over the data axis."""
    return self._over_data(self.objective.decode)

  @functools.cached_property
  def sharded_trajectory(self) -> Any:
    """``objective.trajectory``, jitted as ``sharded_decode``."""
    return self._over_data(self.objective.trajectory)

  def _over_data(self, fn: Any) -> Any:
    """``fn(state, latents, labels)`` jitted with its batch in and out on the data axis."""
    batch = parallel.data_sharding(self.mesh)
    return jax.jit(fn, in_shardings=(self.state_shardings, batch, batch), out_shardings=batch)

  @property
  def makes_images(self) -> bool:
    """Whether the objective generates images (sample grids apply)."""
    return self.objective.decode is not None and hasattr(self.spec, "image_shape")

  def write_privacy_release(self, directory: str, step: int) -> dict[str, Any] | None:
    """``privacy.json`` beside a release of the weights of ``step`` (what they spent);
    None without privacy (``fairgen.privacy.ledger.write_release``)."""
    return ledger.write_release(directory, self.privacy, step)

  @property
  def global_batch(self) -> int:
    """Examples consumed per step (all processes together)."""
    return self.config.train.batch_size * self.objective.examples_per_step


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ``ConfigError`` for the first impossible or unknown value of any section.

  The common sections are checked by ``fairgen.config``; each family checks its own:
  ``data`` (dataset name and options), ``model`` (name and hyperparameters),
  ``objective``/``optim`` (the objective's keys) and ``fair`` (the method, against what
  the objective supports).
  """
  config_lib.validate(config)
  data.validate(config.data)
  models.validate(config.model)
  objectives.validate(config.objective, config.optim)
  if "fair" in config:
    fairness.validate(config, objectives.OBJECTIVES.get(config.objective.name).capabilities,
                      config.objective.name)
  if "privacy" in config:
    privacy.validate(config, objectives.OBJECTIVES.get(config.objective.name).private)
  if "latent" in config:
    latent.validate(config)


def build_model(config: ml_collections.ConfigDict, spec: data.DataSpec) -> Any:
  """The model modules named by ``config.model``, built from its hyperparameters."""
  return models.build(config.model, spec)


def build_objective(config: ml_collections.ConfigDict, spec: data.DataSpec,
                    for_training: bool = True,
                    dp: privacy.DpSettings | None = None) -> objectives.Objective:
  """The objective of ``config`` for data of ``spec``, with its fairness mitigation.

  The fairness method's generator penalty (``fair.method='penalty'``) joins the generator's
  loss (only ``for_training``: evaluation and sampling never run the step, so they do not
  load its classifier); a group-conditional generator samples its groups from
  ``fair.target``, and so does a sampler guided toward groups (``fair.method='guidance'``,
  whose classifier every mode loads). ``dp``: the objective trains its data-seeing
  networks by DP-SGD, through the one ``privacy.DpGradient`` it is handed. With a
  ``latent`` section, the network and objective are built for the first stage's latent
  map and trained and sampled through its frozen autoencoder (``load_first_stage``).
  """
  first = load_first_stage(config, spec) if "latent" in config else None
  guidance = fairness.sampler_guidance(config, spec)  # Sampling needs it, training too.
  if first is not None:
    if guidance is not None:
      guidance = latent.through_decoder(guidance, first, latent.section(config)["scale"])
    spec = latent.latent_spec(spec, first.vae)
  modules = build_model(config, spec)
  extras = {}
  if for_training:
    penalty = fairness.generator_penalty(config, spec)
    if penalty is not None:
      extras["penalty"] = penalty
  if dp is not None:
    extras["privacy"] = privacy.DpGradient(dp)
  if guidance is not None:
    extras["group_guidance"] = guidance
  objective = objectives.build(config.objective, config.optim, modules, spec, **extras)
  if first is not None:
    settings = latent.section(config)
    objective = latent.in_latent_space(objective, first, settings["scale"],
                                       settings["posterior"])
  probs = fairness.label_probs(config, objective.num_classes)
  return dataclasses.replace(objective, label_probs=probs) if probs else objective


def load_first_stage(config: ml_collections.ConfigDict, spec: data.DataSpec
                     ) -> latent.FirstStage:
  """The trained autoencoder that ``config.latent.workdir`` holds, restored read-only from
  its newest checkpoint for images of ``spec``.

  Raises:
    ConfigError: if the workdir's run is not a VAE with a spatial latent, or its config
      does not validate.
    checkpoint.WorkdirError: if it is not a fairgen workdir, holds no checkpoint, or its
      checkpoint does not fit that VAE over ``spec``'s images.
  """
  workdir = storage.normalize(latent.section(config)["workdir"])
  where = f"latent.workdir={workdir}"
  try:
    saved = checkpoint.read_config(workdir)
    latent.check_first_stage_config(saved, where)
    validate(saved)
    vae = build_model(saved, spec)
    latent.check_first_stage(vae, where)
    saved.mesh.fsdp = False  # Replicated parameters, whatever the first stage's layout.
    state, step = restore_checkpoint(build(saved, spec, for_training=False), workdir)
  except checkpoint.WorkdirError as e:
    why = " ".join(str(e).split())
    hint = (f" Was it trained on images of another shape than {spec.image_shape}?"
            if "does not fit" in why else "")
    raise checkpoint.WorkdirError(f"The first stage ({where}): {why}{hint}") from None
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"The first stage ({where}): {e}") from None
  params = jax.tree.map(lambda a: np.asarray(a.addressable_shards[0].data), state["params"])
  logging.info("Latent diffusion on the autoencoder of %s (step %d, latent %s).", workdir,
               step, vae.spatial_latent)
  return latent.FirstStage(vae, params, step, workdir)


def resolve_privacy(config: ml_collections.ConfigDict, num_examples: int | None,
                    mesh: jax.sharding.Mesh | None = None) -> privacy.DpSettings | None:
  """The run's DP-SGD mechanism (None without a privacy section): sigma solved for the run's
  draws (the objective's examples per step) from ``num_examples`` (default: the training
  split's size), the fairness method's weight bound and prior mechanisms composed in, and a
  privacy audit's canaries."""
  if "privacy" not in config:
    return None
  if num_examples is None:  # Evaluation and sampling: N of the split it was trained on.
    num_examples = len(data.load(config.data, config.data.split))
  draws = objectives.examples_per_step(config.objective)
  dp = dataclasses.replace(privacy.resolve(config, num_examples, draws,
                                           fairness.weight_bound(config),
                                           fairness.private_prior(config, num_examples)),
                           mesh=mesh)
  if config.get("audit") is not None and config.audit.get("active", False):
    dp = dataclasses.replace(dp, audit_canaries=int(config.audit.canaries))
  return dp


def setup(config: ml_collections.ConfigDict, spec: data.DataSpec | None = None,
          for_training: bool = True, num_examples: int | None = None) -> Experiment:
  """Validates ``config``, then ``build``s it (what a caller that has not validated calls).

  Args:
    config: the experiment config.
    spec: the dataset's spec; by default that of the training split (which is read).
    for_training: build the training step's extras too (the penalty's classifier).
    num_examples: the training split's size, which DP-SGD's accountant needs for a config
      with a privacy section (read from the split when not given).
  """
  validate(config)
  if spec is None:
    source = data.load(config.data, config.data.split)
    spec, num_examples = source.spec, num_examples or len(source)
  return build(config, spec, for_training, num_examples)


def build(config: ml_collections.ConfigDict, spec: data.DataSpec, for_training: bool = True,
          num_examples: int | None = None) -> Experiment:
  """The mesh, the objective (built once) and the abstract sharded state of a validated
  ``config`` (``validate``: the entry points validate once, then build).

  Args:
    config: the validated experiment config.
    spec: the dataset's spec.
    for_training: build the training step's extras too (the penalty's classifier).
    num_examples: the training split's size (for a privacy section; read when None).
  """
  mesh = parallel.make_mesh(config.mesh.data)
  dp = resolve_privacy(config, num_examples, mesh)
  objective = build_objective(config, spec, for_training, dp)
  if dp is not None and dp.audit_canaries:
    objective = with_canary_scores(objective, dp.audit_canaries)
  root = jax.random.key(config.seed, impl=config.get("rng_impl", config_lib.RNG_IMPLS[0]))
  init_rng, step_rng, sample_rng = jax.random.split(root, 3)
  abstract_state = jax.eval_shape(functools.partial(full_init, objective), init_rng)
  exp = Experiment(
      config=config, mesh=mesh, spec=spec, objective=objective,
      abstract_state=abstract_state,
      state_shardings=parallel.state_shardings(
          mesh, abstract_state, config.mesh.get("fsdp", False)),
      init_rng=init_rng, step_rng=step_rng, sample_rng=sample_rng, privacy=dp)
  parallel.check_batch(exp.global_batch, mesh)
  return exp


CANARY_SCORES = "canary_scores"


def with_canary_scores(objective: objectives.Objective, num: int) -> objectives.Objective:
  """``objective`` whose state sums the privatised values of the ``num`` white-box audit
  canaries over the steps (``state['canary_scores']``, ``fairgen.audit``): the step's
  ``canary_block`` metric, moved into the state."""
  def init(rng: jax.Array) -> Any:
    return {**objective.init(rng), CANARY_SCORES: jnp.zeros((num,), jnp.float32)}

  def train_step(state: Any, batch: Any, rng: jax.Array, **kwargs: Any) -> Any:
    inner = {k: v for k, v in state.items() if k != CANARY_SCORES}
    new, metrics = objective.train_step(inner, batch, rng, **kwargs)
    metrics = dict(metrics)
    return {**new, CANARY_SCORES: state[CANARY_SCORES] + metrics.pop("canary_block")}, metrics

  return dataclasses.replace(objective, init=init, train_step=train_step)


def check_data(exp: Experiment, source: data.Source) -> None:
  """Checks that a conditional model's labels fit its embedding, before anything compiles.

  An embedding lookup past the table does not fail under jit (it yields NaN or clamps), so
  a label/attribute mix-up would not crash where it happens. Sources that hold the column
  in memory are checked whole; others (TFDS) are left to the step's non-finite guard.

  Raises:
    DataError: if ``source``'s condition column holds values outside
      ``[0, objective.num_classes)``.
  """
  objective = exp.objective
  if not objective.num_classes:
    return
  values = data.column_in_memory(source, objective.condition_key)
  if values is None or not len(values):
    return
  low, high = int(values.min()), int(values.max())
  if low < 0 or high >= objective.num_classes:
    raise data.DataError(
        f"The model is conditioned on {objective.condition_key!r} with "
        f"{objective.num_classes} classes, but dataset {exp.spec.name!r} has "
        f"{objective.condition_key!r} values in [{low}, {high}]. Check model.condition_key "
        f"and the dataset's classes or groups.")


def full_init(objective: objectives.Objective, rng: jax.Array) -> Any:
  """The objective's initial state plus the loop's non-finite guard counters."""
  return {**objective.init(rng), robust.GUARD_KEY: robust.init_guard()}


# The initial state's program runs once, so it is built for compile time: XLA's LLVM
# optimisation level 1, not the default 2. Measured on XLA:CPU (jaxlib 0.10.2): the DCGAN
# smoke init compiles in 3 s instead of 12, the DDPM smoke U-Net's in 5.5 s instead of 17,
# to the same bits (the ResNet GAN's too in JAX's default threefry mode; in the
# non-partitionable one 13 of its 338 leaves differ in the last bits; it compiles no faster).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def init_state(exp: Experiment) -> Any:
  """The initial state, created directly in its shardings (no host copy, no aliasing)."""
  return jax.jit(functools.partial(full_init, exp.objective), out_shardings=exp.state_shardings,
                 compiler_options=INIT_COMPILER_OPTIONS)(exp.init_rng)


def restore_or_init(exp: Experiment, ckpt: checkpoint.Checkpointer) -> tuple[Any, int]:
  """Resumes from the newest readable checkpoint of the workdir, else starts from scratch.

  A checkpoint that fails to restore (corrupted or truncated files) is reported, moved to
  ``WORKDIR/checkpoints_damaged/`` for inspection, and the previous one is tried.
  """
  target = checkpoint.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
  errors = []
  for step in reversed(ckpt.all_steps()):
    try:
      state = ckpt.restore(step, target)
    except checkpoint.WorkdirError:
      raise  # The model code changed: every checkpoint would fail the same way.
    except Exception as e:  # Orbax/TensorStore raise many types for damaged files.
      moved = ckpt.quarantine(step)
      logging.error("Checkpoint %s/%d cannot be read (%s); moved it to %s and trying the "
                    "previous one.", ckpt.directory, step, _why(e), moved)
      errors.append(step)
      continue
    logging.info("Resumed from %s/%d.", ckpt.directory, step)
    return state, int(step)
  if errors:
    raise checkpoint.WorkdirError(
        f"No checkpoint in {ckpt.directory} can be read: steps {errors} are damaged and were "
        f"moved to {ckpt.directory}_damaged/. The next launch starts from scratch.")
  return init_state(exp), 0


def restore_checkpoint(exp: Experiment, workdir: str, which: str = "latest") -> tuple[Any, int]:
  """Loads a checkpoint read-only: 'latest', 'best' (by eval.best_metric) or a step number.

  Raises:
    checkpoint.WorkdirError: if the workdir has no such checkpoint, or it cannot be read.
  """
  which = str(which)
  subdir = "best" if which == "best" else "checkpoints"
  ckpt = checkpoint.Checkpointer(workdir, read_only=True, subdir=subdir)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise checkpoint.WorkdirError(f"{ckpt.directory} holds no checkpoint: train first.")
    if which in ("latest", "best"):
      step = ckpt.latest_step()
    else:
      step = int(which)
      if step not in steps:
        raise checkpoint.WorkdirError(f"No checkpoint for step {step}; available: {steps}.")
    target = checkpoint.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
    try:
      return ckpt.restore(step, target), int(step)
    except checkpoint.WorkdirError:
      raise
    except Exception as e:  # Damaged files; read-only, so it is reported, not moved.
      hint = ("Choose 'latest' or a step number instead." if subdir == "best" else
              f"Choose another of steps {steps}, or resume training, which moves it to "
              f"{ckpt.directory}_damaged/ and goes on from the previous one.")
      raise checkpoint.WorkdirError(
          f"The checkpoint {ckpt.directory}/{step} cannot be read ({_why(e)}). {hint}") from None
  finally:
    ckpt.close()


def _why(error: BaseException) -> str:
  """Why a checkpoint failed to restore, in one line (TensorStore's run to kilobytes)."""
  return config_lib.one_line(error)[:200]


def section_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
  """The value of every key a config may leave out, from the families the config names.

  The shared sections' from ``fairgen.config.base_config``; ``data.options`` from the
  dataset loader's keyword defaults (``data.eval_options``: the resolved ``data.options``,
  which it overrides); ``model`` from the builder's, ``objective`` from its registry
  entry's, ``fair`` from ``fairness.fair_section``, ``privacy`` from ``privacy.DEFAULTS``
  and ``latent`` from ``latent.DEFAULTS`` (the last three only for a config with that
  section). A name fairgen does not know (e.g. in an older workdir's config.json)
  contributes no defaults.
  ``fairgen.checkpoint.check_config`` compares workdir configs with these filled in, so a
  key at its default and an absent key are the same experiment.

  Args:
    config: a config, or its dict (e.g. a workdir's config.json).

  Returns:
    Nested dicts, section by section (``model`` and ``objective`` without a ``name``).
  """
  given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  out = config_lib.base_config().to_dict()
  given_data = given.get("data") or {}
  name = given_data.get("name", out["data"]["name"])
  if name in data.DATASETS:
    options = {k: p.default for k, p in data.DATASETS.get(name).options().items()
               if p.default is not p.empty}
    out["data"].update(options=options,
                       eval_options={**options, **dict(given_data.get("options") or {})})
  name = (given.get("model") or {}).get("name")
  if name in models.MODELS:
    out["model"] = {k: p.default for k, p in inspect.signature(
        models.MODELS.get(name)).parameters.items() if k != "spec" and p.default is not p.empty}
  name = (given.get("objective") or {}).get("name")
  if name in objectives.OBJECTIVES:
    out["objective"] = dict(objectives.OBJECTIVES.get(name).defaults)
  if given.get("fair") is not None:
    out["fair"] = fairness.fair_section(given["fair"].get("method", "baseline")).to_dict()
  if given.get("privacy") is not None:
    out["privacy"] = dict(privacy.DEFAULTS)
  if given.get("latent") is not None:
    out["latent"] = dict(latent.DEFAULTS)
  return out


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with every key of the families it names: the ``model`` builder's
  hyperparameters, the ``objective``'s keys and a ``latent`` section's, each at its
  family's default where the experiment does not state it, and each optimizer section's
  ``flatten`` (False).
  (``data.options`` stay as stated: ``--config.data.name`` may switch to a dataset that
  takes other options.)

  An experiment file states only what differs from those defaults and returns
  ``complete(c)`` from ``get_config``, so the config a run sees, writes to config.json and
  takes ``--config.<section>.<key>=`` overrides for holds every key.
  """
  defaults = section_defaults(config)
  for name in ("model", "objective", "latent"):
    section = config.get(name)
    if section is None:
      continue
    for key, value in (defaults.get(name) or {}).items():
      if key not in section:
        section[key] = value
  try:  # Each optimizer section's optional switch (validation reports a missing section).
    sections = objectives.optimizer_sections(config.objective, config.optim)
  except (AttributeError, KeyError):  # Also an unknown objective name.
    sections = []
  for _, section in sections:
    if "flatten" not in section:
      section["flatten"] = False
  return config
