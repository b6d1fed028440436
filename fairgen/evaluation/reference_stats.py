"""FID reference statistics files: ``(mu, sigma)`` of real images' backbone features.

The layout is pytorch-fid's: an ``.npz`` with float64 ``mu`` ``[d]`` and ``sigma`` ``[d, d]``,
so published statistics files (pytorch-fid's, TTUR's ``fid_stats_*.npz``) load as they are.
Files that ``tools/fid_stats.py`` writes add ``num_samples`` and ``provenance`` (JSON: the
backbone's ``describe()``, the dataset, split and sample count). Reading never unpickles.

With ``eval.reference_stats=FILE`` FID compares the samples with the file's Gaussian instead
of with features of ``eval.num_samples`` real images. A file whose recorded backbone or
preprocessing differs from the evaluation's is refused: the two FIDs would not be comparable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import Any, Mapping

import numpy as np

from fairgen import storage

# The backbone fields that must match for a statistics file to serve an evaluation.
MATCHED_FIELDS = ("kind", "weights_sha256", "resize", "quantize", "dataset", "test_accuracy")


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
  """A loaded statistics file.

  Attributes:
    mu: float64 ``[d]`` feature mean.
    sigma: float64 ``[d, d]`` feature covariance.
    path: where it was read from.
    sha256: digest of the file's bytes.
    num_samples: how many images it summarises, or None where the file does not say.
    provenance: what ``tools/fid_stats.py`` recorded, or None (e.g. a published file).
  """

  mu: np.ndarray
  sigma: np.ndarray
  path: str
  sha256: str
  num_samples: int | None
  provenance: dict[str, Any] | None

  def describe(self) -> dict[str, Any]:
    """The statistics file's part of an evaluation's provenance."""
    return {"path": self.path, "sha256": self.sha256, "num_samples": self.num_samples,
            "provenance": self.provenance}


def save(path: str, mu: np.ndarray, sigma: np.ndarray, num_samples: int,
         provenance: Mapping[str, Any]) -> str:
  """Writes ``mu``, ``sigma`` (float64), ``num_samples`` and ``provenance`` (JSON) to an
  ``.npz`` atomically; returns the file's SHA-256."""
  buffer = io.BytesIO()
  np.savez(buffer, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
           num_samples=np.int64(num_samples),
           provenance=np.array(json.dumps(dict(provenance), sort_keys=True)))
  payload = buffer.getvalue()
  storage.write_atomic(path, payload)
  return hashlib.sha256(payload).hexdigest()


def load(path: str, feature_dim: int | None = None) -> ReferenceStats:
  """Reads a statistics file (``mu`` and ``sigma``; the rest is optional).

  Raises:
    FileNotFoundError: if there is no file at ``path``.
    ValueError: if ``mu``/``sigma`` are missing, mis-shaped, not finite, or of another
      dimension than ``feature_dim``.
  """
  path = storage.normalize(path)
  if not storage.isfile(path):
    raise FileNotFoundError(f"No reference statistics file at {path}; write one with "
                            f"`python tools/fid_stats.py --config=... --out={path}`.")
  raw = storage.read_bytes(path)
  try:
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (ValueError, OSError) as e:
    raise ValueError(f"{path} is not an .npz of plain arrays: {e}") from None
  if "mu" not in arrays or "sigma" not in arrays:
    raise ValueError(f"{path} has no 'mu' and 'sigma' arrays (it has {sorted(arrays)}).")
  mu, sigma = np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64)
  d = mu.shape[0] if mu.ndim == 1 else -1
  if mu.ndim != 1 or sigma.shape != (d, d):
    raise ValueError(f"{path}: mu must be [d] and sigma [d, d], got {mu.shape} and "
                     f"{sigma.shape}.")
  if feature_dim is not None and d != feature_dim:
    raise ValueError(f"{path} holds statistics of {d}-d features; the backbone gives "
                     f"{feature_dim}-d ones.")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f"{path}: mu or sigma contains NaN or inf.")
  provenance = json.loads(str(arrays["provenance"])) if "provenance" in arrays else None
  num = int(arrays["num_samples"]) if "num_samples" in arrays else None
  return ReferenceStats(mu, sigma, path, hashlib.sha256(raw).hexdigest(), num, provenance)


def check_backbone(stats: ReferenceStats, backbone: Mapping[str, Any]) -> None:
  """Raises ValueError if ``stats`` records a backbone other than ``backbone`` (a
  ``Backbone.describe()``) in any of ``MATCHED_FIELDS``; files without a record pass."""
  recorded = (stats.provenance or {}).get("backbone")
  if not recorded:
    return
  differ = [f"{k}: file {recorded.get(k)!r}, evaluation {backbone.get(k)!r}"
            for k in MATCHED_FIELDS if recorded.get(k) != backbone.get(k)]
  if differ:
    raise ValueError(f"{stats.path} was computed with another backbone or preprocessing ("
                     f"{'; '.join(differ)}); its FID would not be comparable. Write it again "
                     "with tools/fid_stats.py and this eval config.")
