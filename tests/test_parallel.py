"""Host-side helpers of fairgen.parallel."""

import numpy as np
import pytest

from fairgen import parallel


@pytest.mark.parametrize("n", [0, 1, 7, 10, 23])
def test_map_in_chunks_matches_one_call_and_keeps_one_shape(n):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n, 3)).astype(np.float32)
  y = rng.integers(0, 5, size=n).astype(np.int32)
  shapes = []

  def fn(a, b):
    shapes.append((a.shape, b.shape))
    return {"sum": a.sum(-1) + b, "pair": (a * 2, b[:, None])}

  out = parallel.map_in_chunks(fn, (x, y), chunk_size=10)
  np.testing.assert_allclose(out["sum"], x.sum(-1) + y, rtol=1e-6)
  np.testing.assert_array_equal(out["pair"][0], x * 2)
  np.testing.assert_array_equal(out["pair"][1], y[:, None])
  assert out["pair"][0].shape == (n, 3) and out["pair"][1].dtype == np.int32
  size = max(1, min(10, n))
  assert set(shapes) == {((size, 3), (size,))}  # Padded: one compiled shape.
  assert len(shapes) == max(1, -(-n // 10))


def test_map_in_chunks_rejects_a_bad_chunk_size():
  with pytest.raises(ValueError, match="chunk_size must be positive"):
    parallel.map_in_chunks(lambda a: a, (np.zeros(3),), chunk_size=0)


@pytest.mark.parametrize("shape,n,expected", [
    ((5, 5, 64, 128), 8, (None, None, None, "data")),  # The largest divisible dimension.
    ((3136, 1), 8, ("data",)),
    ((64, 64), 8, (None, "data")),  # Equal sizes: the last one.
    ((100,), 8, ()),  # Too small to be worth a collective.
    ((1001, 3), 8, ()),  # Nothing divides: replicated.
    ((6, 1024), 4, (None, "data")),
    ((5, 5, 64, 128), 1, ()),  # One device: nothing to shard.
])
def test_fsdp_rule_shards_the_largest_divisible_dimension(shape, n, expected):
  assert tuple(parallel.fsdp_spec(shape, n)) == expected
