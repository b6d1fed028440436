"""The Choi et al. CelebA reproduction end to end on synthetic CelebA files (``--quick``)."""

import csv
import json
import subprocess
import sys

import numpy as np

from conftest import REPO, subprocess_env
from fairgen.data import tfds_fakes


def test_choi_celeba_repro_quick_on_synthetic_files_and_resumable(tmp_path):
  """Four intersectional groups (Black_Hair x Male), the importance run (one method keeps the
  test short; the MNIST reproduction's test runs several): the table row is the run's own
  evaluation, FD-L2 is the distance of its group shares from uniform, the run fitted its
  weights, and a second invocation trains nothing again."""
  data_dir = str(tmp_path / "tfds")
  tfds_fakes.write_celeb_a(data_dir, {"train": 2400, "validation": 20, "test": 200})
  out = tmp_path / "out"
  cmd = [sys.executable, "experiments/repro/choi2020_celeba.py", "--quick", f"--out={out}",
         f"--tfds_data_dir={data_dir}", "--biases=multi", "--methods=importance"]
  result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Black_Hair+Male classifier: test accuracy" in result.stdout
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["bias"], r["method"]) for r in rows] == [("multi", "importance")]
  table = {line.split(" | ")[1]: line.split(" | ") for line in result.stdout.splitlines()
           if line.startswith("| 0.25 | ")}
  for method in ("importance",):
    run_dir = out / "runs" / f"multi_{method}_ref0.25_seed0"
    reports = sorted((run_dir / "eval").glob("step_*.json"))
    with open(reports[-1]) as f:
      ev = json.load(f)["metrics"]
    cells = table[method]
    assert cells[2] == f"{ev['fd_l2']:.3f}" and cells[4] == f"{ev['fid']:.1f}", method
    shares = [ev[f"group_share_{g}"] for g in range(4)]
    np.testing.assert_allclose(sum(shares), 1.0, atol=1e-6)
    # FD-L2 is the L2 distance of those shares from the uniform target.
    np.testing.assert_allclose(ev["fd_l2"], np.linalg.norm(np.asarray(shares) - 0.25),
                               atol=1e-6)
    with open(run_dir / "config.json") as f:
      config = json.load(f)
    assert config["model"]["name"] == "resnet_gan" and config["fair"]["method"] == method
  assert (out / "runs" / "multi_importance_ref0.25_seed0" / "density_ratio" /
          "weights.npy").exists()
  assert "The paper: bias reduced by up to 34.6%" in result.stdout
  again = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "seed 0: fd_l2" not in again.stdout
  with open(out / "results.csv") as f:
    assert list(csv.DictReader(f)) == rows
