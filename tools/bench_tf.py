"""TensorFlow reference speeds for fairgen's DCGAN and MLP VAE steps, on CPU.

The same two models and iterations as ``tools/bench_torch.py``, in TensorFlow 2 with Keras:
- the seeds' DCGAN, which is the TensorFlow DCGAN tutorial's MNIST model (width 1.0, latent
  100, batch 128, BatchNorm momentum 0.99 / eps 1e-3, LeakyReLU 0.3, dropout 0.3 in D): one
  iteration is one discriminator step on detached fakes, then one generator step on fresh
  latents, each with its own Adam (lr 2e-4, betas 0.5/0.999) and non-saturating
  sigmoid-cross-entropy losses;
- the MLP VAE 784-512-256-32 with a Bernoulli likelihood on binarized pixels (batch 128,
  Adam lr 1e-3), one reparameterised sample per example.

Inputs are fixed random tensors, as in ``bench_torch.py``. Modes:
- ``graph``: the iteration is one ``tf.function`` (TF's graph executor, TF's own kernels:
  what the DCGAN tutorial runs);
- ``xla``: the same ``tf.function(jit_compile=True)``, compiled by XLA;
- ``eager``: plain TF eager execution.

TensorFlow is a benchmark-only tool here, not a fairgen dependency: install it in an
environment of its own (fairgen's stays as setup.cfg makes it) and point
``benchmark.py --compare --tf_python`` at it:
  python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu==2.21.0
  /tmp/tfvenv/bin/python tools/bench_tf.py --model dcgan --rounds 5 --iters 5
  /tmp/tfvenv/bin/python tools/bench_tf.py --model vae --rounds 5 --iters 200

Output: one JSON object: {"model", "batch", "tf_version", "keras_version", "rounds",
"iters", "compile_warmup_s": {mode: seconds of the first (tracing/compiling) iterations},
"it_per_s": {mode: {"median", "min", "max"}}, "others_cpu_share": {mode: median share of
all cores that other processes used during that mode's rounds}, "it_per_s_quiet": {mode:
the stats over quiet rounds only, or null}, "loadavg", "fastest": mode}.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from cpu_load import parse_peer_args, peer_parser, time_peer  # tools/, beside this script

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before TensorFlow starts.
import tensorflow as tf  # noqa: E402  pylint: disable=g-import-not-at-top
import keras  # noqa: E402  pylint: disable=g-import-not-at-top
from keras import layers  # noqa: E402  pylint: disable=g-import-not-at-top

LATENT = 100
MODES = ("graph", "xla", "eager")


def make_generator() -> keras.Model:
  """The DCGAN tutorial's generator: Dense -> BN -> LReLU -> 3 ConvT (the last with tanh)."""
  return keras.Sequential([
      keras.Input((LATENT,)),
      layers.Dense(7 * 7 * 256, use_bias=False), layers.BatchNormalization(),
      layers.LeakyReLU(0.3), layers.Reshape((7, 7, 256)),
      layers.Conv2DTranspose(128, 5, strides=1, padding="same", use_bias=False),
      layers.BatchNormalization(), layers.LeakyReLU(0.3),
      layers.Conv2DTranspose(64, 5, strides=2, padding="same", use_bias=False),
      layers.BatchNormalization(), layers.LeakyReLU(0.3),
      layers.Conv2DTranspose(1, 5, strides=2, padding="same", use_bias=False,
                             activation="tanh")])


def make_discriminator() -> keras.Model:
  """The tutorial's discriminator: 2 x (Conv stride 2 -> LReLU -> Dropout 0.3) -> Dense 1."""
  return keras.Sequential([
      keras.Input((28, 28, 1)),
      layers.Conv2D(64, 5, strides=2, padding="same"), layers.LeakyReLU(0.3),
      layers.Dropout(0.3),
      layers.Conv2D(128, 5, strides=2, padding="same"), layers.LeakyReLU(0.3),
      layers.Dropout(0.3), layers.Flatten(), layers.Dense(1)])


def _adam(lr: float, b1: float, variables) -> keras.optimizers.Optimizer:
  opt = keras.optimizers.Adam(lr, beta_1=b1, beta_2=0.999)
  opt.build(variables)  # Its slots exist before the first traced call.
  return opt


def _wrap(fn: Callable[[], tf.Tensor], mode: str) -> Callable[[], float]:
  if mode != "eager":
    fn = tf.function(fn, jit_compile=(mode == "xla"))
  return lambda: float(fn())  # float(): wait for the iteration's result.


def make_dcgan_step(mode: str, batch: int) -> Callable[[], float]:
  """One D step + one G step of the DCGAN, as a closure over fixed random reals."""
  g, d = make_generator(), make_discriminator()
  g_opt = _adam(2e-4, 0.5, g.trainable_variables)
  d_opt = _adam(2e-4, 0.5, d.trainable_variables)
  reals = tf.random.uniform((batch, 28, 28, 1), -1.0, 1.0, seed=0)
  bce = lambda logits, label: tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
      labels=tf.fill(tf.shape(logits), label), logits=logits))

  def step() -> tf.Tensor:
    fake = tf.stop_gradient(g(tf.random.normal((batch, LATENT)), training=True))
    with tf.GradientTape() as tape:
      d_loss = (bce(d(reals, training=True), 1.0) + bce(d(fake, training=True), 0.0))
    d_opt.apply_gradients(zip(tape.gradient(d_loss, d.trainable_variables),
                              d.trainable_variables))
    with tf.GradientTape() as tape:
      g_loss = bce(d(g(tf.random.normal((batch, LATENT)), training=True), training=True), 1.0)
    g_opt.apply_gradients(zip(tape.gradient(g_loss, g.trainable_variables),
                              g.trainable_variables))
    return g_loss

  return step


def make_vae_step(mode: str, batch: int) -> Callable[[], float]:
  """One Adam step of the MLP VAE's negative ELBO on a fixed random batch."""
  del mode
  dense = lambda n, act=None: layers.Dense(n, activation=act)
  encoder = keras.Sequential([keras.Input((784,)), dense(512, "relu"), dense(256, "relu"),
                              dense(64)])
  decoder = keras.Sequential([keras.Input((32,)), dense(256, "relu"), dense(512, "relu"),
                              dense(784)])
  variables = encoder.trainable_variables + decoder.trainable_variables
  opt = _adam(1e-3, 0.9, variables)
  x = tf.reshape(tf.random.uniform((batch, 28, 28, 1), -1.0, 1.0, seed=0), (batch, 784))
  target = tf.cast(x > 0, tf.float32)

  def step() -> tf.Tensor:
    with tf.GradientTape() as tape:
      mean, logvar = tf.split(encoder(x), 2, axis=-1)
      z = mean + tf.exp(0.5 * logvar) * tf.random.normal(tf.shape(mean))
      recon = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(
          labels=target, logits=decoder(z)), -1)
      kl = 0.5 * tf.reduce_sum(tf.exp(logvar) + mean**2 - 1.0 - logvar, -1)
      loss = tf.reduce_mean(recon + kl)
    opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  return step


def main(argv=None) -> None:
  """Times the modes in interleaved rounds and prints the JSON summary."""
  p = peer_parser(__doc__.splitlines()[0], MODES, "graph,xla")
  args = parse_peer_args(p, argv, MODES)
  tf.random.set_seed(0)
  make = make_dcgan_step if args.model == "dcgan" else make_vae_step
  steps = {mode: _wrap(make(mode, args.batch), mode) for mode in args.modes}
  print(json.dumps({"model": args.model, "batch": args.batch, "tf_version": tf.__version__,
                    "keras_version": keras.__version__, **time_peer(steps, args, "bench_tf")}))


if __name__ == "__main__":
  main()
