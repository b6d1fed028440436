"""``data.name='image_folder'`` on folders written here: colour and grey, PNG and JPEG, mixed
sizes, class subfolders and an attribute file; the decoded cache; every bad input refused
in one line; and a biased split trained through Choi et al.'s importance weighting."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fairgen import data, fairness, images, train
from fairgen.data import image_folder

from conftest import assert_resume_is_exact, load_config, run_main

N_PER_CLASS = 24


def _write(path: str, array: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def make_folder(root, attributes: bool = True) -> str:
  """Two class subfolders of mixed-size images: ``cat`` colour PNGs (red), ``dog`` grey
  JPEGs (mid grey); attributes ``young`` and ``smiling`` (0/1) and ``ref`` (a quarter),
  with ``young`` rare outside the reference set."""
  directory = str(root / "images")
  rows = []
  for i in range(N_PER_CLASS):
    h, w = 20 + i % 5, 30 - i % 7
    _write(f"{directory}/cat/c{i:02d}.png",
           np.broadcast_to(np.array([255, 0, 0], np.uint8), (h, w, 3)).copy())
    _write(f"{directory}/dog/d{i:02d}.jpg", np.full((w, h), 128, np.uint8))
    for name in (f"cat/c{i:02d}.png", f"dog/d{i:02d}.jpg"):
      ref = int(i % 4 == 0)
      rows.append({"file": name, "young": int(ref and i % 8 == 0 or i % 12 == 5),
                   "smiling": i % 2, "ref": ref})
  if attributes:
    with open(str(root / "attributes.csv"), "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  return directory


def options(root, **kw) -> dict:
  return {"directory": str(root / "images"), "attributes": str(root / "attributes.csv"),
          "image_size": 16, "cache_dir": str(root / "cache"), **kw}


def load(root, split="train", **kw):
  return data.load({"name": "image_folder", "options": options(root, **kw)}, split)


def test_a_folder_decodes_to_the_requested_size_channels_and_classes(tmp_path):
  make_folder(tmp_path)
  train_split, test_split = load(tmp_path), load(tmp_path, "test")
  assert len(train_split) + len(test_split) == 2 * N_PER_CLASS
  assert train_split.spec.image_shape == (16, 16, 3) and train_split.spec.num_classes == 2
  batch = train_split.get(np.arange(len(train_split)))
  cats = batch["image"][batch["label"] == 0]
  np.testing.assert_allclose(cats[..., 0], 1.0)  # Red, after resize and crop.
  np.testing.assert_allclose(cats[..., 1:], -1.0)
  dogs = batch["image"][batch["label"] == 1]  # Grey JPEGs, as three equal channels.
  np.testing.assert_allclose(dogs, 128 / 127.5 - 1, atol=2 / 127.5)
  grey = load(tmp_path, channels=1)
  assert grey.get(np.arange(2))["image"].shape == (2, 16, 16, 1)
  # Stratified by class: both splits hold both classes, in the test fraction.
  assert np.bincount(load(tmp_path, "test").get(np.arange(len(test_split)))["label"]
                     ).tolist() == [2, 2]


def test_attributes_make_labels_and_intersectional_groups(tmp_path):
  make_folder(tmp_path)
  source = load(tmp_path, "all", label="smiling", groups="young,smiling")
  assert source.spec.num_classes == 2 and source.spec.num_groups == 4
  batch = source.get(np.arange(len(source)))
  np.testing.assert_array_equal(batch["attr"] % 2, batch["label"])  # smiling is the 2nd.
  assert set(np.unique(batch["attr"])) == {0, 1, 2, 3}


def test_the_decoded_cache_is_reused_and_a_changed_folder_is_decoded_afresh(tmp_path):
  directory = make_folder(tmp_path)
  load(tmp_path)
  cached = sorted(os.listdir(tmp_path / "cache"))
  assert len(cached) == 1 and cached[0].endswith(".npy")
  load(tmp_path, "test")  # Same folder, same options: the same file.
  assert sorted(os.listdir(tmp_path / "cache")) == cached
  _write(f"{directory}/cat/c00.png", np.zeros((20, 30, 3), np.uint8))  # Now black.
  os.utime(f"{directory}/cat/c00.png", ns=(1, 1))
  assert len(os.listdir(tmp_path / "cache")) == 1
  fresh = load(tmp_path, "all")
  assert len(os.listdir(tmp_path / "cache")) == 2
  assert fresh.get(np.array([0]))["image"].max() == -1.0  # c00 is the first file.


def test_worker_processes_decode_exactly_what_one_process_decodes(tmp_path):
  """The cache's rows are ``images.decode`` of each file, whichever of several worker
  processes wrote them (chunks dealt round-robin), and a worker imports no JAX."""
  directory = make_folder(tmp_path)
  paths = sorted(os.path.join(d, f) for d, _, files in os.walk(directory) for f in files
                 if f.endswith((".png", ".jpg")))
  paths = paths * (images.CHUNK // len(paths) + 2)  # More than two chunks: both workers work.
  out = str(tmp_path / "rows.npy")
  np.lib.format.open_memmap(out, "w+", np.uint8, (len(paths), 12, 12, 3))
  images.decode_into(out, paths, 12, 3, workers=2)
  written = np.load(out)
  for i in (0, len(paths) // 2, len(paths) - 1):
    np.testing.assert_array_equal(written[i], images.decode(paths[i], 12, 3))
  assert written.reshape(len(paths), -1).max(axis=1).min() > 0  # No row left unwritten.
  probe = subprocess.run([sys.executable, "-c", "import sys, fairgen.images; "
                          "print(sorted(m for m in ('jax', 'fairgen.data') if m in sys.modules))"],
                         capture_output=True, text=True, check=True)
  assert probe.stdout.strip() == "[]"


def _bad(root, kind: str) -> dict:
  """Options for one kind of bad input (the folder at ``root`` is written first)."""
  directory = make_folder(root)
  path = str(root / "attributes.csv")
  rows = list(csv.DictReader(open(path)))
  if kind == "missing folder":
    return options(root, directory=str(root / "nowhere"))
  if kind == "no images":
    os.makedirs(root / "empty")
    return options(root, directory=str(root / "empty"), attributes="")
  if kind == "truncated file":
    with open(f"{directory}/cat/c03.png", "r+b") as f:
      f.truncate(40)
  elif kind == "row without an image":
    rows.append({**rows[0], "file": "cat/ghost.png"})
  elif kind == "image without a row":
    rows = rows[1:]
  elif kind == "non-numeric attribute":
    rows[5]["young"] = "yes"
  elif kind == "group without examples":
    for row in rows:
      row["young"] = 0 if row["ref"] == "1" else row["young"]
    return options(root, groups="young,smiling", subset="reference", reference="ref")
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return options(root, groups="young")


BAD = {"missing folder": "no such directory", "no images": "holds no PNG or JPEG",
       "truncated file": "cannot decode .*c03.png", "row without an image":
       "names 'cat/ghost.png', which is not an image", "image without a row":
       "has no row in", "non-numeric attribute": "attribute 'young' of .* is 'yes', not an "
       "integer", "group without examples": "has no examples in the 'train' split"}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_bad_input_is_one_data_error(tmp_path, kind):
  given = _bad(tmp_path, kind)
  with pytest.raises(data.DataError, match=BAD[kind]):
    data.load({"name": "image_folder", "options": given}, "train")


def test_the_launcher_refuses_a_bad_folder_in_one_line(tmp_path):
  config = os.path.join(os.path.dirname(__file__), "..", "experiments", "dcgan_mnist.py")
  result = run_main(f"--config={config}:smoke", f"--workdir={tmp_path / 'run'}",
                    "--config.data.name=image_folder",
                    f"--config.data.options={json.dumps({'directory': str(tmp_path / 'x')})}")
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("fairgen: error:") and "no such directory" in lines[-1]
  assert "Traceback" not in result.stderr


def test_a_biased_folder_trains_with_importance_weights_end_to_end(tmp_path):
  """A biased split of the folder (few ``young``, a reference quarter) through the Choi
  importance method: the density-ratio classifier's weights reach the training split."""
  make_folder(tmp_path)
  config = load_config("dcgan_mnist", "smoke")
  config.data.name = "image_folder"
  config.data.options = options(tmp_path, image_size=28, channels=1, groups="young",
                                reference="ref", subset="union")
  config.data.eval_options = {"subset": "reference"}
  config.fair = fairness.fair_section("importance")
  config.fair.clip = 5.0
  fairness.make_smoke(config)
  config.eval.every_steps = 0
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(config, workdir)
  assert summary["final_step"] == config.train.num_steps
  weights = np.load(os.path.join(workdir, "density_ratio", "weights.npy"))
  source = data.load(config.data, "train")
  is_ref = source.get(np.arange(len(source)))["is_ref"]
  assert weights.shape == (len(source),) and np.all(weights[is_ref == 1] == 1.0)
  assert not np.allclose(weights[is_ref == 0], 1.0)


def test_a_run_on_a_folder_resumes_exactly(tmp_path):
  """Batches are a pure function of (seed, step): stopped at step 2 and resumed, the run
  ends bit-identical to an uninterrupted one."""
  make_folder(tmp_path)
  config = load_config("dcgan_mnist", "smoke", **{"log.every_steps": 1})
  config.data.name = "image_folder"
  config.data.options = options(tmp_path, image_size=28, channels=1)
  assert_resume_is_exact(config, tmp_path, stop=2)
