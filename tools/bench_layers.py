"""Times naive vs fast strided (transposed) convs on the DCGAN shapes.

For each layer shape and variant, times the jitted forward pass, the gradient
with respect to the input and the gradient with respect to the parameters
(median of ``--repeats`` calls after one warm-up call). Prints a table and a
final JSON line.

Usage:
  python tools/bench_layers.py --batch 128 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fairgen.models import fast_conv as layers

# (name, kind, in_hw, cin, cout, kernel, stride, variants)
SHAPES = [
    ('convT 7->14 128->64 k5 s2', 'transpose', 7, 128, 64, 5, 2,
     ('naive', 'fast')),
    ('convT 14->28 64->1 k5 s2', 'transpose', 14, 64, 1, 5, 2,
     ('naive', 'fast')),
    ('convT 7->7 256->128 k5 s1', 'transpose', 7, 256, 128, 5, 1, ('naive',)),
    ('conv 28->14 1->64 k5 s2', 'conv', 28, 1, 64, 5, 2, ('naive', 'fast')),
    ('conv 14->7 64->128 k5 s2', 'conv', 14, 64, 128, 5, 2, ('naive', 'fast')),
]


def _time(fn: Callable[..., Any], args: tuple[Any, ...], repeats: int) -> float:
  """Median wall time in ms of ``fn(*args)`` after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def bench_one(kind: str, hw: int, cin: int, cout: int, k: int, s: int,
              fast: bool, batch: int, repeats: int) -> dict[str, float]:
  """Times forward, input-gradient and weight-gradient of one layer."""
  factory = layers.conv_transpose if kind == 'transpose' else layers.conv
  module = factory(cout, k, s, fast=fast)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, hw, hw, cin)), jnp.float32)
  params = jax.jit(module.init)(jax.random.key(0), x)

  def loss(p, inp):
    return jnp.sum(module.apply(p, inp) ** 2)

  fwd = jax.jit(module.apply)
  grad_x = jax.jit(jax.grad(loss, argnums=1))
  grad_w = jax.jit(jax.grad(loss, argnums=0))
  return {
      'forward_ms': _time(fwd, (params, x), repeats),
      'grad_input_ms': _time(grad_x, (params, x), repeats),
      'grad_weight_ms': _time(grad_w, (params, x), repeats),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()

  results = []
  header = (f'{"layer":<28} {"variant":<7} {"fwd ms":>9} {"dx ms":>9} '
            f'{"dW ms":>9}')
  print(f'backend={jax.default_backend()} batch={args.batch} '
        f'repeats={args.repeats}')
  print(header)
  print('-' * len(header))
  for name, kind, hw, cin, cout, k, s, variants in SHAPES:
    for variant in variants:
      r = bench_one(kind, hw, cin, cout, k, s, variant == 'fast', args.batch,
                    args.repeats)
      print(f'{name:<28} {variant:<7} {r["forward_ms"]:>9.2f} '
            f'{r["grad_input_ms"]:>9.2f} {r["grad_weight_ms"]:>9.2f}',
            flush=True)
      results.append({'layer': name, 'variant': variant,
                      **{key: round(v, 3) for key, v in r.items()}})
  print(json.dumps({'backend': jax.default_backend(), 'batch': args.batch,
                    'repeats': args.repeats, 'results': results}))


if __name__ == '__main__':
  main()
