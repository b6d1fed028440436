"""Converts pytorch-fid's Inception weights to the ``.npz`` that ``eval.backbone=inception_v3``
loads (without pickle, without torch).

Get the weights file where there is internet (fairgen never downloads at run time):
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
It is the TF FID graph ``inception-2015-12-05`` ported to PyTorch, the network pytorch-fid
and (through TF) the original FID and IS code use. Then, with torch installed (only this tool
needs it):
  python tools/convert_inception.py --weights=pt_inception-2015-12-05-6726825d.pth

The output (default ``$FAIRGEN_CACHE/pt_inception-2015-12-05.npz``, where evaluation looks
first) holds one float32 array per variable, keyed ``params/Mixed_5b/branch1x1/conv/kernel``
(convolutions HWIO, fc [2048, 1008]) and ``batch_stats/.../bn/mean|var``, plus
``__source__``: the input's name and SHA-256. The tool prints a JSON summary with the
output's SHA-256, which every evaluation with it records.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os

import numpy as np

from fairgen import cli
from fairgen import storage
from fairgen.classifiers import backbones
from fairgen.classifiers import inception


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses the command line."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--weights", required=True,
                      help="pytorch-fid's pt_inception-2015-12-05-*.pth (a state dict).")
  parser.add_argument("--out", default=None,
                      help=f"Output .npz (default: $FAIRGEN_CACHE/{backbones.INCEPTION_FILE}).")
  parser.add_argument("--overwrite", action="store_true", help="Replace an existing --out.")
  return parser.parse_args(argv)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a PyTorch state-dict file as float32 NumPy arrays (``weights_only``)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    cli.fail("converting needs torch (pip install torch); evaluation itself does not.")
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    cli.fail(f"{path} is not a PyTorch state dict that loads with weights_only=True: "
             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
  if not isinstance(state, dict) or not all(hasattr(v, "numpy") for v in state.values()):
    cli.fail(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def main(argv: list[str] | None = None) -> dict:
  """Converts, checks against the network's variables, writes; returns the JSON summary."""
  args = parse_args(argv)
  if not os.path.isfile(args.weights):
    cli.fail(f"--weights={args.weights} is not a file.")
  out = storage.normalize(args.out or backbones.default_inception_path())
  if storage.exists(out) and not args.overwrite:
    cli.fail(f"{out} exists; pass --overwrite to replace it.")
  with open(args.weights, "rb") as f:
    source_sha = hashlib.sha256(f.read()).hexdigest()
  try:
    arrays = inception.flax_arrays_from_torch(read_state_dict(args.weights))
    backbones.inception_variables(arrays, args.weights)
  except ValueError as e:
    cli.fail(str(e))
  arrays["__source__"] = np.array(f"{os.path.basename(args.weights)} sha256={source_sha}")
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  payload = buffer.getvalue()
  storage.makedirs(os.path.dirname(out))
  storage.write_atomic(out, payload)
  summary = {"out": out, "sha256": hashlib.sha256(payload).hexdigest(),
             "source": os.path.basename(args.weights), "source_sha256": source_sha,
             "arrays": len(arrays) - 1,
             "parameters": int(sum(v.size for k, v in arrays.items() if k.startswith("params/")))}
  print(json.dumps(summary, sort_keys=True))
  return summary


if __name__ == "__main__":
  main()
