"""Trains the small classifier backbone that FID, Inception Score and class proportions use.

Loads the dataset's train and test splits, trains ``fairgen.models.classifier.Classifier``
(see ``fairgen.classifiers.fit.train_classifier``), saves it as an Orbax checkpoint plus
``backbone.json`` and prints the held-out accuracy, the output path and a final JSON line.
The defaults reach about 98.5% test accuracy on mnist_5k in about a minute on two CPU cores.

Usage (from the repository root):
  python tools/train_classifier.py --dataset=mnist_5k
  python tools/train_classifier.py --dataset=digits --out=/tmp/classifier_digits --overwrite
  # The attribute classifier of the fairness metrics and the penalty, on balanced data:
  python tools/train_classifier.py --dataset=biased_mnist --label=attr \
      --option attribute=digit_group --option subset=balanced
  # Trained by DP-SGD at epsilon 1 (delta 1e-5), Poisson batches of 64 on average:
  python tools/train_classifier.py --dataset=mnist_5k --dp_target_epsilon=1 \
      --dp_expected_batch_size=64 --batch_size=96 --out=/tmp/classifier_dp
"""

from __future__ import annotations

import argparse
import ast
import json
import time

from fairgen import cli
from fairgen import data
from fairgen import privacy
from fairgen.config import ConfigError
from fairgen import storage
from fairgen.classifiers import backbones
from fairgen.classifiers import fit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses the command line."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--dataset", required=True,
                      help=f"A fairgen dataset: {', '.join(data.DATASETS.names())}.")
  parser.add_argument("--out", default=None,
                      help="Output directory (default: $FAIRGEN_CACHE/classifier_<dataset>_"
                           "<label>, the cache defaulting to ~/.cache/fairgen).")
  parser.add_argument("--label", default="label",
                      help="The key to predict: label, or attr where the dataset has one.")
  parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="A dataset option (repeatable), e.g. attribute=color or "
                           "subset=balanced; values are Python literals or strings.")
  parser.add_argument("--num_classes", type=int, default=None,
                      help="Classes of --label (default: the dataset's, for --label=label).")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=2e-3, help="Peak Adam learning rate.")
  parser.add_argument("--width", type=int, default=32,
                      help="Channels of the first layers (cnn) or of the first stage (resnet).")
  parser.add_argument("--arch", default="cnn", choices=backbones.ARCHITECTURES,
                      help="cnn: the small convolutional classifier; resnet: a ResNet-18-style "
                           "one (e.g. CelebA attributes, as in Choi et al. 2020).")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_augment", dest="augment", action="store_false",
                      help="Disable random translations of the training images.")
  parser.add_argument("--overwrite", action="store_true",
                      help="Replace a classifier already saved in --out.")
  parser.add_argument("--log_every", type=int, default=200)
  dp = parser.add_argument_group("DP-SGD", "Train by DP-SGD (fairgen.privacy) when "
                                 "--dp_target_epsilon or --dp_noise_multiplier is given; "
                                 "--batch_size is then the padded Poisson batch.")
  for key, default in privacy.DEFAULTS.items():
    if key not in ("sampling", "accountant", "ghost_clipping"):
      dp.add_argument(f"--dp_{key}", type=type(default), default=None,
                      help=f"privacy.{key} (default {default}).")
  dp.add_argument("--dp_accountant", default=None, choices=privacy.ACCOUNTANTS)
  dp.add_argument("--dp_ghost_clipping", action="store_true", default=None,
                  help="Dense layers by ghost clipping (the same update, less memory).")
  return parser.parse_args(argv)


def privacy_section(args: argparse.Namespace) -> dict | None:
  """The ``--dp_*`` flags as a privacy section (None: no DP)."""
  given = {k: getattr(args, f"dp_{k}") for k in privacy.DEFAULTS
           if getattr(args, f"dp_{k}", None) is not None}
  if not given:
    return None
  if "target_epsilon" not in given and "noise_multiplier" not in given:
    cli.fail("DP-SGD needs --dp_target_epsilon or --dp_noise_multiplier.")
  return given


def parse_options(items: list[str]) -> dict:
  """``['key=value', ...]`` -> dict; values are Python literals where they parse as one."""
  options = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      cli.fail(f"--option needs KEY=VALUE, got {item!r}.")
    try:
      options[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[key] = value
  return options


def main(argv: list[str] | None = None) -> dict:
  """Trains, saves and reports; returns the JSON summary."""
  args = parse_args(argv)
  data_config = {"name": args.dataset, "options": parse_options(args.option)}
  out = args.out or backbones.default_classifier_dir(data.cache_tag(data_config), args.label)
  try:
    out = storage.normalize(out)  # A local directory or gs://BUCKET/DIR.
  except storage.StorageError as e:
    cli.fail(f"--out={e}")
  # Fail before training, not after, when the result could not be saved.
  if storage.listdir(out) and not args.overwrite:
    cli.fail(f"{out} is not empty; pass --overwrite to replace it.")
  dp = privacy_section(args)
  if dp is not None:
    try:  # The checks that need no data, before anything loads.
      privacy.check_section(dp, args.batch_size, prefix="--dp_")
    except ConfigError as e:
      cli.fail(str(e))
  train = data.load(data_config, "train")
  test = data.load(data_config, "test")
  if args.num_classes is None and args.label == "attr":
    args.num_classes = train.spec.num_groups or None
  print(f"Training a classifier on {args.dataset} ({len(train)} train / {len(test)} test, "
        f"label {args.label!r}) for {args.steps} steps.", flush=True)
  start = time.perf_counter()
  try:
    params, info = fit.train_classifier(
        train, test, label_key=args.label, num_classes=args.num_classes, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, width=args.width, seed=args.seed,
        augment=args.augment, log_every=args.log_every, arch=args.arch, privacy=dp)
  except ConfigError as e:
    cli.fail(str(e))
  seconds = time.perf_counter() - start
  backbones.save_classifier(out, params, info, overwrite=args.overwrite)
  print(f"Held-out accuracy on {args.dataset} test: {info['test_accuracy']:.4f}")
  if "privacy" in info:
    print(f"DP-SGD: epsilon {info['privacy']['epsilon']:.4g} at delta "
          f"{info['privacy']['delta']:g} (noise multiplier "
          f"{info['privacy']['noise_multiplier']:.4g})")
  print(f"Saved the classifier backbone to {out}")
  summary = {"dataset": args.dataset, "options": data_config["options"], "label": args.label,
             "out": out, "test_accuracy": info["test_accuracy"], "steps": args.steps,
             "train_seconds": info["train_seconds"], "total_seconds": round(seconds, 2),
             "privacy": info.get("privacy")}
  print(json.dumps(summary, sort_keys=True))
  return summary


if __name__ == "__main__":
  main()
