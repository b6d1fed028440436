"""Generation from a train state: batched and sharded, and the ``--mode=sample`` outputs.

``sample`` mode writes, under ``WORKDIR/sample/step_NNNNNN/``: ``grid.png``, an interpolation
grid (``interpolation.png``: each row walks a straight line between two latents), for
iterative samplers (DDPM) ``trajectory.png`` (one row per sample: the noise, the
intermediate steps, the sample), and for conditional models ``per_class.png`` (one row per
class). Each image set is also saved as an
``.npz`` (``images`` in [-1, 1], plus ``latents`` and ``labels``) for further use. For a DP
run, ``privacy.json`` records the mechanism and the epsilon the sampled weights spent, and
each ``.npz`` carries ``epsilon`` and ``delta``.
"""

from __future__ import annotations

import functools
import io
import os
from typing import Any, Iterator

import jax
import numpy as np
from absl import logging

from fairgen import experiment
from fairgen import logs
from fairgen import parallel
from fairgen import storage
from fairgen.config import ConfigError


def decode_images(exp: experiment.Experiment, state: Any,
                  latents: np.ndarray | jax.Array, labels: np.ndarray | jax.Array,
                  batch_size: int = 256, decode: Any = None) -> np.ndarray:
  """Decodes latents to images on the mesh, in batches split over the data axis.

  Batches are padded to a multiple of the data-axis size, so one shape is compiled.
  ``decode``: a jitted ``(state, latents, labels)`` function in place of the objective's
  ``decode`` (e.g. its sampler's trajectory).

  Raises:
    ValueError: for a conditional model's label outside ``[0, num_classes)``.
  """
  n_dev = exp.mesh.shape[parallel.DATA_AXIS]
  batch = max(n_dev, (batch_size // n_dev) * n_dev)
  latents, labels = np.asarray(latents, np.float32), np.asarray(labels, np.int32)
  classes = exp.objective.num_classes
  if classes and len(labels) and (labels.min() < 0 or labels.max() >= classes):
    # Under jit an embedding lookup past the table gives NaN (or a clamped row), not an error.
    raise ValueError(f"Conditional labels must be in [0, {classes}), got "
                     f"[{labels.min()}, {labels.max()}].")
  decode = decode or exp.sharded_decode
  sharding = parallel.data_sharding(exp.mesh)
  out = []
  for start in range(0, len(latents), batch):
    z, y = latents[start:start + batch], labels[start:start + batch]
    pad = batch - len(z) if len(latents) > batch else (-len(z)) % n_dev
    z = np.concatenate([z, np.zeros((pad,) + z.shape[1:], z.dtype)])
    y = np.concatenate([y, np.zeros((pad,), y.dtype)])
    images = decode(state, jax.device_put(z, sharding), jax.device_put(y, sharding))
    out.append(parallel.to_host(images)[:len(z) - pad])
  return np.concatenate(out)


def grid_scale(spec: Any) -> int:
  """How much to enlarge small images in PNG grids (8x8 digits become 56x56)."""
  return max(1, 56 // spec.image_shape[0])


def prior_labels(num: int, num_classes: int, probs: Any = None, seed: int = 0) -> np.ndarray:
  """Labels for ``num`` samples of a conditional model (zeros for unconditional ones).

  Without ``probs``: the classes in turn (0, 1, ..., 0, 1, ...). With ``probs``: exact
  quotas (largest remainder of ``num * probs``) in a seeded random order, so the labels
  follow the distribution without sampling noise.
  """
  if num_classes <= 0:
    return np.zeros(num, np.int32)
  if probs is None:
    return (np.arange(num) % num_classes).astype(np.int32)
  p = np.asarray(probs, np.float64)
  if p.shape != (num_classes,) or np.any(p < 0) or p.sum() <= 0:
    raise ValueError(f"probs must be {num_classes} non-negative weights, got {probs}.")
  exact = num * p / p.sum()
  counts = np.floor(exact).astype(np.int64)
  counts[np.argsort(-(exact - counts), kind="stable")[:num - counts.sum()]] += 1
  labels = np.repeat(np.arange(num_classes, dtype=np.int32), counts)
  return np.random.default_rng(seed).permutation(labels)


def _prior(exp: experiment.Experiment, rng: jax.Array, num: int, labels: np.ndarray | None,
           truncation: float) -> tuple[np.ndarray, np.ndarray]:
  latents = np.asarray(exp.objective.sample_latents(rng, num, truncation))
  if labels is None:
    labels = prior_labels(num, exp.objective.num_classes, exp.objective.label_probs)
  return latents, np.asarray(labels)


def generate_images(exp: experiment.Experiment, state: Any, rng: jax.Array, num: int,
                    labels: np.ndarray | None = None, truncation: float = 0.0,
                    batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """``num`` samples (and their latents) from prior latents drawn with ``rng``."""
  latents, labels = _prior(exp, rng, num, labels, truncation)
  return decode_images(exp, state, latents, labels, batch_size), latents


def iterate_images(exp: experiment.Experiment, state: Any, rng: jax.Array, num: int,
                   truncation: float = 0.0, batch_size: int = 256) -> Iterator[np.ndarray]:
  """``generate_images``'s samples, ``batch_size`` at a time: the same images in the same
  order, without holding them all (only the latents are drawn up front)."""
  latents, labels = _prior(exp, rng, num, None, truncation)
  for start in range(0, num, batch_size):
    z, y = latents[start:start + batch_size], labels[start:start + batch_size]
    m = len(z)
    if m < batch_size < num:  # One compiled shape, as generate_images pads its last batch.
      z = np.concatenate([z, np.zeros((batch_size - m,) + z.shape[1:], z.dtype)])
      y = np.concatenate([y, np.zeros((batch_size - m,), y.dtype)])
    yield decode_images(exp, state, z, y, batch_size)[:m]


def interpolation_latents(rng: jax.Array, rows: int, steps: int, dim: int,
                          truncation: float = 0.0) -> np.ndarray:
  """``rows`` straight-line walks of ``steps`` points between pairs of prior latents."""
  k1, k2 = jax.random.split(rng)
  draw = (functools.partial(jax.random.truncated_normal, lower=-truncation, upper=truncation)
          if truncation > 0 else jax.random.normal)
  a, b = np.asarray(draw(k1, shape=(rows, 1, dim))), np.asarray(draw(k2, shape=(rows, 1, dim)))
  t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[None, :, None]
  return ((1 - t) * a + t * b).reshape(rows * steps, dim).astype(np.float32)


def _save(out_dir: str, name: str, images: np.ndarray, latents: np.ndarray,
          labels: np.ndarray, ncols: int, scale: int, extra: dict[str, Any]) -> list[str]:
  """One grid as PNG and .npz (with ``extra`` arrays); returns their paths.

  Process 0 writes: every process holds the same images.
  """
  png, npz = (os.path.join(out_dir, f"{name}.{ext}") for ext in ("png", "npz"))
  if jax.process_index() == 0:
    logs.save_image_grid(images, png, ncols=ncols, scale=scale)
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images, latents=latents, labels=labels, **extra)
    storage.write_atomic(npz, buf.getvalue())
  return [png, npz]


def write_samples(exp: experiment.Experiment, state: Any, step: int, out_dir: str, num: int,
                  seed: int, truncation: float = 0.0, interpolation_steps: int = 8) -> list[str]:
  """Writes the sample, interpolation and per-class grids; returns the files written.

  Every process of a multi-process job generates (the sharded decode needs them all);
  process 0 writes.
  """
  storage.makedirs(out_dir)
  rng = jax.random.key(seed)
  k_grid, k_interp, k_class = jax.random.split(rng, 3)
  if not exp.makes_images:
    raise ConfigError(
        f"--mode=sample needs an objective that generates images; "
        f"{exp.config.objective.name!r} does not.")
  scale = grid_scale(exp.spec)
  ncols = int(np.ceil(np.sqrt(num)))
  extra, files = {}, []
  release = exp.write_privacy_release(out_dir, step)  # What the sampled weights spent.
  if release is not None:
    record = release["record"]
    extra = {"epsilon": np.float64(record["epsilon"]), "delta": np.float64(record["delta"])}
    files.append(release["path"])
    logging.info("Samples of step %d: epsilon %.4g at delta %g.", step, record["epsilon"],
                 record["delta"])

  labels = prior_labels(num, exp.objective.num_classes, exp.objective.label_probs)
  images, latents = generate_images(exp, state, k_grid, num, labels, truncation=truncation)
  files += _save(out_dir, "grid", images, latents, labels, ncols, scale, extra)

  rows = max(1, min(8, num // interpolation_steps))
  z = interpolation_latents(k_interp, rows, interpolation_steps, exp.objective.latent_dim,
                            truncation)
  y = np.repeat(prior_labels(rows, exp.objective.num_classes), interpolation_steps)
  files += _save(out_dir, "interpolation", decode_images(exp, state, z, y), z, y,
                 interpolation_steps, scale, extra)

  if exp.objective.trajectory is not None:  # An iterative sampler's steps, one row each.
    rows = min(8, num)
    z, y = latents[:rows], labels[:rows]
    frames = decode_images(exp, state, z, y, decode=exp.sharded_trajectory)
    files += _save(out_dir, "trajectory", frames.reshape((-1,) + frames.shape[2:]), z, y,
                   frames.shape[1], scale, extra)

  if exp.objective.num_classes:
    c, per = exp.objective.num_classes, max(1, min(10, num // exp.objective.num_classes))
    y = np.repeat(np.arange(c, dtype=np.int32), per)
    images, z = generate_images(exp, state, k_class, len(y), labels=y, truncation=truncation)
    files += _save(out_dir, "per_class", images, z, y, per, scale, extra)
  files.sort()
  if jax.process_index() == 0:
    logging.info("Step %d samples in %s: %s", step, out_dir,
                 ", ".join(os.path.basename(f) for f in files))
  return files
