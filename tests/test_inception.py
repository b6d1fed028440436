"""The FID Inception-v3 against pytorch-fid's own module code, the converter and the resizes.

The reference network is pytorch-fid's ``InceptionV3`` built by its own ``fid_inception_v3``
with random weights in place of the download: batch-norm scales and shifts are randomised
and its statistics calibrated on random images, so every layer's output matters. The
converter turns that state dict into the ``.npz`` fairgen loads, and the Flax network must
give the same pool features and logits to within 1e-4 relative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from fairgen import cli
from fairgen import parallel
from fairgen.classifiers import backbones
from fairgen.classifiers import inception

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(ROOT, "tools", "convert_inception.py")
# pytorch-fid importable with the CPU build of torch, and its network without a download.
BENCH = cli.load_module(os.path.join(ROOT, "tools", "bench_inception.py"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """pytorch-fid's network (random, calibrated weights), its fc layer, and the converted
  weights loaded as fairgen's ``inception_v3`` backbone."""
  pfi = BENCH.pytorch_fid_module()
  torch.manual_seed(0)
  fresh = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)  # pylint: disable=protected-access
  original = pfi.load_state_dict_from_url
  try:
    pfi.load_state_dict_from_url = lambda *a, **k: fresh.state_dict()
    full = pfi.fid_inception_v3()  # pytorch-fid's own patched blocks, our random weights.
    full.train()
    for m in full.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.reset_running_stats()
        m.momentum = None  # Running statistics = the calibration batch's.
        with torch.no_grad():
          m.weight.uniform_(0.5, 1.5)
          m.bias.normal_(0.0, 0.2)
    with torch.no_grad():
      full(torch.rand(8, 3, 96, 96) * 2 - 1)
    full.eval()
  finally:
    pfi.load_state_dict_from_url = original
  state = full.state_dict()
  net = BENCH.pytorch_fid_network(state)
  tmp = tmp_path_factory.mktemp("inception")
  pth, npz = str(tmp / "weights.pth"), str(tmp / "inception.npz")
  torch.save(state, pth)
  result = subprocess.run([sys.executable, CONVERT, f"--weights={pth}", f"--out={npz}"],
                          capture_output=True, text=True, check=True)
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  return {"net": net, "fc": full.fc, "npz": npz, "pth": pth, "summary": summary,
          "num_parameters": sum(p.numel() for p in full.parameters()),
          "backbone": backbones.load_backbone("inception_v3", npz)}


def _torch_outputs(reference, images_01: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """pytorch-fid's pool features and the fc logits for NHWC images in [0, 1]."""
  x = torch.from_numpy(np.ascontiguousarray(images_01.transpose(0, 3, 1, 2))).float()
  if x.shape[1] == 1:
    x = x.repeat(1, 3, 1, 1)
  with torch.no_grad():
    pool = reference["net"](x)[0][:, :, 0, 0]
    logits = reference["fc"](pool)
  return pool.numpy(), logits.numpy()


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
  # 1e-4 relative to the output's scale (elementwise relative error is meaningless near 0).
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("shape", [(3, 28, 28, 1), (2, 32, 32, 3)])
def test_pool_features_and_logits_match_pytorch_fid(reference, shape):
  rng = np.random.default_rng(shape[-1])
  levels = rng.integers(0, 256, shape).astype(np.float32)  # uint8 images, as files hold.
  images = levels / 127.5 - 1.0                             # fairgen's [-1, 1].
  backbone = reference["backbone"]
  features, probs = backbone.features_and_probs(images)
  ref_pool, ref_logits = _torch_outputs(reference, levels / 255.0)
  assert np.abs(ref_pool).max() > 1.0 and ref_pool.std() > 0.1  # A live network.
  _assert_close(features, ref_pool)
  rows = inception.resize_matrix("bilinear", shape[1])
  x = inception.preprocess(images, rows, rows, quantize=True, clip=False)
  logits = np.asarray(jax.jit(inception.FIDInceptionV3().apply)(backbone.variables, x)["logits"])
  _assert_close(logits, ref_logits)
  np.testing.assert_allclose(probs, jax.nn.softmax(ref_logits, axis=-1), atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option")
def test_on_cpu_the_backbone_runs_its_convolutions_on_eigen(reference):
  """The loaded backbone's program is the one compiled with Eigen convolutions (1.91x
  pytorch-fid's images/s here, against YNNPACK's 0.83x): its outputs are that program's bits
  (on this machine they differ from XLA's default, YNNPACK's, in the last places)."""
  backbone = reference["backbone"]
  images = np.random.default_rng(3).uniform(-1, 1, (3, 28, 28, 1)).astype(np.float32)
  apply = backbones._inception_apply("bilinear", True)  # pylint: disable=protected-access
  eigen, default = (np.asarray(jax.jit(apply, compiler_options=options or None)(
      backbone.variables, images)[0]) for options in (parallel.cpu_convolution_options(), {}))
  np.testing.assert_array_equal(backbone.features(images), eigen)
  np.testing.assert_allclose(eigen, default, rtol=1e-4, atol=1e-4 * np.abs(eigen).max())


def test_converter_output_and_provenance(reference):
  summary, backbone = reference["summary"], reference["backbone"]
  # 94 conv + batch-norm units (kernel, scale, bias, mean, var) and the fc layer.
  assert summary["arrays"] == 94 * 5 + 2
  assert summary["parameters"] == reference["num_parameters"]
  with np.load(reference["npz"], allow_pickle=False) as npz:
    assert "sha256=" in str(npz["__source__"])
  described = backbone.describe()
  assert described["weights_sha256"] == summary["sha256"]
  assert (described["resize"], described["quantize"]) == ("bilinear", True)


def test_quantize_rounds_samples_to_uint8_levels(reference):
  backbone = reference["backbone"]
  levels = np.random.default_rng(1).integers(0, 256, (2, 28, 28, 1)).astype(np.float32)
  images = levels / 127.5 - 1.0
  nudged = images + 0.3 / 127.5  # Less than half a level.
  np.testing.assert_array_equal(backbone.features(images), backbone.features(nudged))
  exact = backbones.load_backbone("inception_v3", reference["npz"], quantize=False)
  assert exact.describe()["quantize"] is False
  assert np.abs(exact.features(images) - exact.features(nudged)).max() > 1e-4


@pytest.mark.parametrize("size_in,size_out", [(28, 299), (64, 29)])
def test_bilinear_matrix_is_torch_interpolate(size_in, size_out):
  x = np.random.default_rng(0).normal(size=(2, 3, size_in, size_in)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(size_out, size_out),
                                        mode="bilinear", align_corners=False).numpy()
  m = inception.resize_matrix("bilinear", size_in, size_out)
  np.testing.assert_allclose(np.einsum("oh,nchw,pw->ncop", m, x, m), ref, atol=1e-5)


@pytest.mark.parametrize("size_in", [28, 400])  # Up, and down (where PIL antialiases).
def test_pil_bicubic_matrix_is_pil_resize(size_in):
  x = np.random.default_rng(1).uniform(0, 255, (size_in, size_in)).astype(np.float32)
  ref = np.asarray(Image.fromarray(x, mode="F").resize((299, 299), resample=Image.BICUBIC))
  m = inception.resize_matrix("pil_bicubic", size_in)
  np.testing.assert_allclose(m @ x @ m.T, ref, rtol=1e-5, atol=1e-3)


def test_missing_weights_say_how_to_get_them(tmp_path):
  with pytest.raises(backbones.BackboneNotFoundError,
                     match="fetch https://github.com/mseitzer/pytorch-fid.*convert_inception"):
    backbones.load_backbone("inception_v3", str(tmp_path / "none.npz"))


def test_converter_refuses_bad_input_in_one_line(reference, tmp_path):
  wrong = str(tmp_path / "wrong.pth")
  torch.save({"conv.weight": torch.zeros(3, 3, 1, 1)}, wrong)
  out = tmp_path / "out.npz"
  out.write_bytes(b"keep me")
  for args, message in (([f"--weights={wrong}", f"--out={tmp_path / 'new.npz'}"],
                         "Not the FID Inception-v3's weights"),
                        ([f"--weights={reference['pth']}", f"--out={out}"],
                         "exists; pass --overwrite")):
    result = subprocess.run([sys.executable, CONVERT, *args], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fairgen: error: ") and message in lines[0]
  assert out.read_bytes() == b"keep me"
  assert not (tmp_path / "new.npz").exists()


def test_evaluation_with_inception_records_its_protocol(reference, workdir):
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from fairgen import train  # pylint: disable=g-import-not-at-top
  from fairgen.evaluation import modes  # pylint: disable=g-import-not-at-top
  config = load_config("dcgan_mnist", "smoke", **{
      "eval.backbone": "inception_v3", "eval.inception_weights": reference["npz"],
      "eval.resize": "pil_bicubic", "eval.metrics": ("fid", "is"), "eval.num_samples": 8,
      "eval.batch_size": 8, "eval.is_splits": 2})
  train.train_and_evaluate(config, workdir)
  out = modes.evaluate(config, workdir)
  with open(out["path"]) as f:
    report = json.load(f)
  described = report["provenance"]["backbone"]
  assert described["kind"] == "inception_v3"
  assert described["weights_sha256"] == reference["summary"]["sha256"]
  assert (described["resize"], described["quantize"]) == ("pil_bicubic", True)
  assert report["provenance"]["num_samples"] == 8 and report["provenance"]["real_split"] == "test"
  assert np.isfinite(report["metrics"]["fid"]) and report["metrics"]["is"] >= 1.0


def test_a_wrong_weights_file_is_one_error_line(reference, tmp_path):
  from conftest import run_main  # pylint: disable=g-import-not-at-top
  wrong = tmp_path / "wrong.npz"
  np.savez(wrong, **{"params/fc/kernel": np.zeros((3, 3), np.float32)})
  for path, message in ((wrong, "Not the FID Inception-v3's weights"),
                        (tmp_path / "none.npz", "No Inception weights at")):
    out = run_main("--config=experiments/dcgan_mnist.py:smoke", f"--workdir={tmp_path / 'w'}",
                   "--config.eval.every_steps=2", "--config.eval.backbone=inception_v3",
                   f"--config.eval.inception_weights={path}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("fairgen: error: ")
    assert message in out.stderr
    ckpts = tmp_path / "w" / "checkpoints"
    assert not ckpts.exists() or not list(ckpts.iterdir())  # It failed before training.
