"""End-to-end training: every objective, the workdir contract, sharding equivalence."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from conftest import load_config
from fairgen import checkpoint, experiment, train

OBJECTIVE_CONFIGS = ["dcgan_mnist", "vae_mnist"]


def _final_state(config, workdir):
  exp = experiment.setup(config)
  ckpt = checkpoint.Checkpointer(workdir, 1, 1)
  state, step = experiment.restore_or_init(exp, ckpt)
  ckpt.close()
  return jax.tree.map(np.asarray, state), step


@pytest.mark.parametrize("name", OBJECTIVE_CONFIGS)
def test_smoke_train_writes_the_workdir_contract(name, workdir, max_traces):
  config = load_config(name, "smoke")
  max_traces(1)  # jitted once for all steps
  summary = train.train_and_evaluate(config, workdir)
  assert summary["final_step"] == config.train.num_steps
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["name"] == config.model.name
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps[-1] == config.train.num_steps
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(
      range(config.log.every_steps, config.train.num_steps + 1, config.log.every_steps))
  loss_key = "g_loss" if config.objective.name == "gan" else "loss"
  assert all(np.isfinite(r[loss_key]) for r in records)
  assert os.path.exists(os.path.join(workdir, "samples",
                                     f"step_{config.train.num_steps:06d}.png"))
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))


@pytest.mark.parametrize("name", OBJECTIVE_CONFIGS)
def test_one_device_and_eight_devices_agree(name, tmp_path, partitionable_rng):
  assert jax.device_count() == 8
  results = {}
  for n in (1, 8):
    config = load_config(name, "smoke", **{"mesh.data": n, "train.num_steps": 5,
                                           "train.checkpoint_every_steps": 5,
                                           "log.every_steps": 5})
    workdir = str(tmp_path / f"d{n}")
    summary = train.train_and_evaluate(config, workdir)
    results[n] = (summary["scalars"], _final_state(config, workdir)[0])
  (s1, p1), (s8, p8) = results[1], results[8]
  for key in s1:
    if key not in ("steps_per_sec", "input_wait_seconds"):
      np.testing.assert_allclose(s8[key], s1[key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    if a.dtype.kind == "f":
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    else:
      np.testing.assert_array_equal(b, a)


def test_eight_device_state_is_sharded_as_configured(tmp_path):
  config = load_config("dcgan_mnist", "smoke", **{"mesh.data": 8})
  exp = experiment.setup(config)
  state = experiment.init_state(exp)
  leaf = jax.tree.leaves(state["gen"]["params"])[0]
  assert len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated


def test_batch_not_divisible_by_data_axis_is_a_clear_error():
  config = load_config("dcgan_mnist", "smoke", **{"mesh.data": 8, "train.batch_size": 12})
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    experiment.setup(config)


def test_resume_continues_from_the_last_checkpoint(workdir, max_traces):
  config = load_config("vae_mnist", "smoke")
  train.train_and_evaluate(config, workdir)
  config.train.num_steps = 6
  summary = train.train_and_evaluate(config, workdir)
  assert summary["start_step"] == 4 and summary["final_step"] == 6
  max_traces(0)  # nothing left to do: the step is never traced
  again = train.train_and_evaluate(config, workdir)
  assert again["start_step"] == 6 and again["final_step"] == 6


def test_several_discriminator_steps_load_that_many_batches():
  """n_disc=2: the loop loads 2 x batch_size rows per step (what each D update uses is
  checked in test_behaviour_loop)."""
  for n_disc in (1, 2):
    config = load_config("dcgan_mnist", "smoke", **{"objective.n_disc": n_disc})
    exp = experiment.setup(config)
    assert exp.global_batch == n_disc * config.train.batch_size
