"""Inception-v3 feature extraction, images/s: fairgen's ``inception_v3`` backbone or pytorch-fid.

One side per process (``benchmark.py --compare inception`` interleaves them):
  python tools/bench_inception.py --side=fairgen             # convolutions on Eigen (default)
  python tools/bench_inception.py --side=fairgen_ynnpack     # XLA:CPU's default convolutions
  python tools/bench_inception.py --side=pytorch_fid         # pytorch-fid's InceptionV3
  python tools/bench_inception.py --side=fairgen --breakdown # where fairgen's time goes

The protocol of issue 41: random weights (the speed does not depend on them; nothing is
downloaded), 28x28 grayscale images resized to 299 inside each side (fairgen: its bilinear
resize matrices and the uint8 quantisation; pytorch-fid: ``F.interpolate``, bilinear),
batches of 50 (pytorch-fid's default and fairgen's ``INCEPTION_CHUNK``), the pool features
fetched to the host. After one warm-up batch (compilation), ``--batches`` batches are timed,
``--repeats`` times.

``--breakdown`` (fairgen only) times the parts of one batch separately, each jitted alone:
the host-to-device transfer, the preprocessing (quantise, resize, scale), the network on
preprocessed images, and the whole backbone call; and gives XLA's FLOP count of the network.

Output: one JSON line, {"side", "it_per_s": {"median", "min", "max"} (images/s),
"others_cpu_share": the median share of the CPU other processes used while timing,
"threads", and with --breakdown "breakdown_ms" and "gflop_per_image"}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from fairgen import cli

cpu_load = cli.import_beside(__file__, "cpu_load")

SIDES = ("fairgen", "fairgen_ynnpack", "pytorch_fid")
_TORCHVISION_OPS = None  # Keeps the stand-in op library alive.


def pytorch_fid_module() -> Any:
  """``pytorch_fid.inception``, importable with the CPU build of torch.

  torchvision's wheels on the package index are built against CUDA torch. With the CPU
  torch its compiled ops do not load, and ``import torchvision`` (0.28.0) then stops where it
  registers fake kernels for ``torchvision::nms`` and ``qnms``. Defining those two schemas
  lets the pure-Python model code import; Inception uses neither op.
  """
  global _TORCHVISION_OPS
  import torch  # pylint: disable=g-import-not-at-top
  try:
    importlib.import_module("torchvision")
  except RuntimeError as e:
    if "torchvision::nms" not in str(e):
      raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
    _TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
      _TORCHVISION_OPS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  from pytorch_fid import inception as pfi  # pylint: disable=g-import-not-at-top
  return pfi


def pytorch_fid_network(state: dict[str, Any] | None = None) -> Any:
  """pytorch-fid's ``InceptionV3([pool])`` (resizing and normalising its input) with the FID
  weights replaced by ``state`` (default: a fresh random network's), without a download."""
  pfi = pytorch_fid_module()
  if state is None:
    state = pfi._inception_v3(num_classes=1008, aux_logits=False,  # pylint: disable=protected-access
                              weights=None).state_dict()
  original = pfi.load_state_dict_from_url
  try:
    pfi.load_state_dict_from_url = lambda *a, **k: state
    return pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
  finally:
    pfi.load_state_dict_from_url = original


def _fairgen_apply(side: str) -> tuple[Callable[[np.ndarray], np.ndarray], Any]:
  """The side's batch function (NHWC in [-1, 1] -> pool features on the host) and backbone."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fairgen.classifiers import backbones, inception  # pylint: disable=g-import-not-at-top
  variables = jax.jit(inception.FIDInceptionV3().init)(
      jax.random.key(0), jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3)))
  # None: the loaded backbone's own options (Eigen convolutions on a CPU); {}: XLA's defaults.
  options = {} if side == "fairgen_ynnpack" else None
  backbone = backbones.inception_backbone(variables, compiler_options=options)
  return backbone.features, backbone


def _torch_apply() -> Callable[[np.ndarray], np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  net = pytorch_fid_network()

  def apply(images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).repeat(1, 3, 1, 1)
    with torch.no_grad():
      return net((x + 1) / 2)[0][:, :, 0, 0].numpy()

  return apply


def breakdown(backbone: Any, images: np.ndarray) -> dict[str, Any]:
  """Milliseconds per batch of each part of fairgen's backbone call (medians of 3)."""
  import jax  # pylint: disable=g-import-not-at-top
  from fairgen.classifiers import inception  # pylint: disable=g-import-not-at-top
  rows = inception.resize_matrix("bilinear", images.shape[1])
  prep = jax.jit(lambda x: inception.preprocess(x, rows, rows, quantize=True, clip=False))
  net = jax.jit(lambda v, x: inception.FIDInceptionV3().apply(v, x)["pool"],
                compiler_options=backbone.compiler_options or None)
  on_device = jax.device_put(images)
  pre = prep(on_device).block_until_ready()
  parts = {"transfer": lambda: jax.device_put(images).block_until_ready(),
           "preprocess": lambda: prep(on_device).block_until_ready(),
           "network": lambda: net(backbone.variables, pre).block_until_ready(),
           "backbone_call": lambda: backbone.features(images)}
  out = {}
  for name, fn in parts.items():
    fn()
    times = []
    for _ in range(3):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    out[name] = round(1e3 * statistics.median(times), 2)
  cost = net.lower(backbone.variables, pre).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"breakdown_ms": out, "gflop_per_image": round(cost["flops"] / 1e9 / len(images), 3)}


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Times the side (see the module docstring)."""
  images = np.random.default_rng(0).integers(0, 256, (args.batch * args.batches, 28, 28, 1))
  images = (images / 127.5 - 1.0).astype(np.float32)
  if args.side == "pytorch_fid":
    import torch  # pylint: disable=g-import-not-at-top
    apply, backbone, threads = _torch_apply(), None, torch.get_num_threads()
  else:
    apply, backbone = _fairgen_apply(args.side)
    threads = None
  apply(images[:args.batch])  # Warm-up: compilation, allocation.
  rates, shares = [], []
  for _ in range(args.repeats):
    before = cpu_load.cpu_snapshot()
    start = time.perf_counter()
    for i in range(args.batches):
      apply(images[i * args.batch:(i + 1) * args.batch])
    rates.append(len(images) / (time.perf_counter() - start))
    shares.append(cpu_load.others_share(before, cpu_load.cpu_snapshot()))
  out = {"side": args.side, "it_per_s": {"median": statistics.median(rates), "min": min(rates),
                                         "max": max(rates)},
         "others_cpu_share": statistics.median(shares), "threads": threads}
  if args.breakdown and backbone is not None:
    out.update(breakdown(backbone, images[:args.batch]))
  return out


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--side", choices=SIDES, default="fairgen")
  p.add_argument("--batch", type=int, default=50, help="images per call (default 50)")
  p.add_argument("--batches", type=int, default=4, help="timed batches per repeat")
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--breakdown", action="store_true", help="time fairgen's parts too")
  args = p.parse_args(argv)
  if min(args.batch, args.batches, args.repeats) < 1:
    p.error("--batch, --batches and --repeats must be >= 1")
  print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
  main()
