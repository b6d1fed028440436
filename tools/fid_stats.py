r"""Writes FID reference statistics (mu, sigma) of a dataset split's backbone features.

The experiment config says which data (``data`` section) and which backbone and
preprocessing (``eval.backbone``, ``eval.inception_weights``, ``eval.resize``,
``eval.quantize``, or ``eval.backbone_dir`` for the classifier). Images stream through the
backbone ``eval.batch_size`` at a time, so memory is bounded by a chunk, not by --num.

  python tools/fid_stats.py --config=experiments/dcgan_mnist.py --out=/tmp/mnist_5k_test.npz
  python tools/fid_stats.py --config=experiments/sngan_cifar10.py --split=train --num=50000 \
      --config.eval.backbone=inception_v3 --out=/tmp/cifar10_train_inception.npz

The ``.npz`` has pytorch-fid's layout (float64 ``mu``, ``sigma``) plus ``num_samples`` and
``provenance`` (JSON: backbone, weights digest, preprocessing, dataset, split, count, seed).
Use it with ``--config.eval.reference_stats=FILE``; published pytorch-fid files work too.
"""

from __future__ import annotations

import json
import resource
import time

from absl import app
from absl import flags

from fairgen import cli
from fairgen import main as fairgen_main

_OUT = flags.DEFINE_string("out", None, "Output .npz (local or gs://).")
_SPLIT = flags.DEFINE_string("split", None, "Dataset split (default: data.eval_split).")
_NUM = flags.DEFINE_integer("num", 0, "Images to summarise, in a seeded random order "
                            "(eval.seed); 0: the whole split.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")


def _plain(options) -> dict:
  return options.to_dict() if hasattr(options, "to_dict") else dict(options)


def main(argv: list[str]) -> None:
  """Computes and writes the statistics; prints a JSON summary (time, peak memory)."""
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _OUT.value:
    cli.fail("--out is required.")
  if _NUM.value < 0:
    cli.fail(f"--num must be >= 0, got {_NUM.value}.")
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fairgen import config as config_lib  # pylint: disable=g-import-not-at-top
  from fairgen import data, storage  # pylint: disable=g-import-not-at-top
  from fairgen.classifiers import backbones  # pylint: disable=g-import-not-at-top
  from fairgen.evaluation import context, reference_stats, runner  # pylint: disable=g-import-not-at-top
  from fairgen.metrics import quality  # pylint: disable=g-import-not-at-top

  config = fairgen_main.CONFIG.value
  try:
    out = storage.normalize(_OUT.value)
    if storage.exists(out) and not _OVERWRITE.value:
      cli.fail(f"{out} exists; pass --overwrite to replace it.")
    runner.validate(config.eval)
    split = _SPLIT.value or config.data.eval_split
    start = time.perf_counter()
    source = data.load(config.data, split)
    n = len(source) if _NUM.value == 0 else min(_NUM.value, len(source))
    order = np.random.default_rng(config.eval.seed).permutation(len(source))[:n]
    backbone = context.RealData(config).backbone
    stats = quality.FeatureStats()
    for i in range(0, n, config.eval.batch_size):
      stats.update(backbone.features(source.get(order[i:i + config.eval.batch_size])["image"]))
    provenance = {"backbone": backbone.describe(), "dataset": config.data.name,
                  "options": _plain(config.data.get("options") or {}), "split": split,
                  "num_samples": n, "seed": config.eval.seed}
    digest = reference_stats.save(out, stats.mean(), stats.cov(), n, provenance)
  except (config_lib.ConfigError, data.DataError, storage.StorageError,
          backbones.BackboneNotFoundError, ValueError) as e:
    cli.fail(str(e))
  print(json.dumps({"out": out, "sha256": digest, "num_samples": n, "split": split,
                    "seconds": round(time.perf_counter() - start, 1),
                    "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                          / 1024, 1),
                    "backbone": backbone.describe()}, sort_keys=True))


if __name__ == "__main__":
  app.run(main, flags_parser=fairgen_main.parse_flags)
