"""Times reading CelebA attributes with and without decoding the images.

Writes a prepared array_record CelebA of ``--records`` synthetic records (9 KB JPEGs of
CelebA's 218x178 size, ``fairgen/data/tfds_fakes.py``), then reads two attributes of every
record three ways, ``--repeats`` times each (median):

- ``decode``: ``records[i]['attributes']``, TFDS's default path: every JPEG is decoded.
- ``skip_decoding``: TFDS deserializes each record with ``tfds.decode.SkipDecoding`` on
  the image (it stays bytes).
- ``fairgen``: ``tfds_datasets.celeb_a_attributes``, which parses only the requested keys.

``--mock`` times ``celeb_a_attributes`` under ``tfds.testing.mock_data`` too: its records
are generated arrays, so that number says nothing about JPEG decoding. The times per
record are extrapolated linearly to CelebA's 162,770 training records. Prints a table
and a final JSON line.

Usage:
  python tools/bench_tfds_attributes.py --records 5000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np

from fairgen.data import tfds_datasets
from fairgen.data import tfds_fakes

CELEB_A_TRAIN = 162_770
NAMES = ("Black_Hair", "Male")


def _median_seconds(fn, repeats: int) -> tuple[float, np.ndarray]:
  times, out = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--records", type=int, default=5000)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--data_dir", default=None,
                      help="Where to write the records (default: a temporary folder).")
  parser.add_argument("--mock", action="store_true",
                      help="Also time celeb_a_attributes under tfds.testing.mock_data.")
  args = parser.parse_args()
  import tensorflow_datasets as tfds

  data_dir = args.data_dir or tempfile.mkdtemp(prefix="fairgen_celeb_a_")
  start = time.perf_counter()
  tfds_fakes.write_celeb_a(data_dir, {"train": args.records})
  print(f"wrote {args.records} records to {data_dir} in {time.perf_counter() - start:.1f} s")
  records = tfds.data_source("celeb_a", split="train", data_dir=data_dir, download=False)
  stored, features = records.data_source, records.dataset_info.features
  skip = {"image": tfds.decode.SkipDecoding()}
  n = len(records)

  def decode():
    return np.asarray([[bool(records[i]["attributes"][a]) for a in NAMES]
                       for i in range(n)], np.int32)

  def skip_decoding():
    rows = [features.deserialize_example_np(stored[i], decoders=skip)["attributes"]
            for i in range(n)]
    return np.asarray([[bool(r[a]) for a in NAMES] for r in rows], np.int32)

  def fairgen():
    return tfds_datasets.celeb_a_attributes("train", data_dir, NAMES)

  results = {}
  reference = None
  for name, fn in (("fairgen", fairgen), ("skip_decoding", skip_decoding),
                   ("decode", decode)):
    seconds, out = _median_seconds(fn, args.repeats)
    if reference is None:
      reference = out
    assert np.array_equal(out, reference), f"{name} read other values"
    results[name] = seconds
  if args.mock:
    with tfds.testing.mock_data(num_examples=args.records):
      results["fairgen_under_mock_data"], _ = _median_seconds(fairgen, args.repeats)
  print(f"{'path':<26}{'total s':>9}{'us/record':>11}{'x vs decode':>13}"
        f"{'162,770 (extrapolated) s':>27}")
  for name, seconds in results.items():
    per = seconds / n
    print(f"{name:<26}{seconds:>9.3f}{per * 1e6:>11.1f}{results['decode'] / seconds:>13.1f}"
          f"{per * CELEB_A_TRAIN:>27.1f}")
  print(json.dumps({"records": n, "repeats": args.repeats, "seconds": results,
                    "us_per_record": {k: v / n * 1e6 for k, v in results.items()},
                    "extrapolated_162770_s": {k: v / n * CELEB_A_TRAIN
                                              for k, v in results.items()}}))


if __name__ == "__main__":
  main()
