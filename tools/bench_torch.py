"""PyTorch reference speeds for fairgen's DCGAN, MLP VAE and EDM steps, on CPU.

The same two models as ``tools/benchmark.py`` times in fairgen, built in PyTorch:
- the seeds' DCGAN (the TensorFlow DCGAN tutorial's MNIST model, width 1.0, latent 100,
  batch 128): one iteration is one discriminator step then one generator step, Adam
  (lr 2e-4, betas 0.5/0.999) on each, non-saturating BCE-with-logits losses, dropout 0.3
  in D, BatchNorm (momentum 0.01, eps 1e-3 as Keras' 0.99/1e-3) in G;
- the MLP VAE 784-512-256-32 with a Bernoulli likelihood on binarized pixels (batch 128,
  Adam lr 1e-3), one reparameterised sample per example;
- ``edm_unet`` and ``dit_s``: EDM's training step (``torch_diffusion.edm_step``) on
  edm_mnist.py's U-Net and on DiT-S/2, 32x32x3 images (``--batch 64`` as the issue times
  them; ``benchmark.py --compare`` passes it).

Inputs are fixed random tensors (the data pipeline is not timed; fairgen's input wait is
measured separately by ``tools/benchmark.py``). Modes:
- ``eager``: plain PyTorch;
- ``compile``: the modules wrapped in ``torch.compile`` (losses and optimizer eager).
Adam is the fused CPU kernel (``--adam fused``, the fastest here) unless ``--adam default``.
``--channels_last`` also times eager and compile DCGANs with channels-last tensors.
To compare with fairgen, alternate this script's runs with ``tools/benchmark.py`` runs
(separate processes: JAX's and PyTorch's thread pools in one process slow PyTorch down
by more than 10x here).

Rounds interleave the modes (round 1: mode A, mode B, ...; round 2: ...), so that load from
other processes hits all modes alike. Each round times ``--iters`` iterations.

Usage (torch is a benchmark-only dependency, not a fairgen one):
  pip install torch==2.13.0
  python tools/bench_torch.py --model dcgan --rounds 5 --iters 5
  python tools/bench_torch.py --model vae --rounds 5 --iters 200

Output: one JSON object: {"model", "batch", "torch_version", "threads", "adam",
"rounds", "iters", "compile_warmup_s": {mode: seconds of the first (compiling) iterations},
"it_per_s": {mode: {"median", "min", "max"}}, "others_cpu_share": {mode: median share of
all cores that other processes used during that mode's rounds (0: a quiet machine)},
"it_per_s_quiet": {mode: the stats over quiet rounds only (others < 5%), or null},
"loadavg", "fastest": mode}.
"""

from __future__ import annotations

import json
from typing import Callable

import torch_diffusion  # tools/, beside this script
from cpu_load import parse_peer_args, peer_parser, time_peer  # tools/, beside this script

import torch
from torch import nn
from torch.nn import functional as F

LEAKY_SLOPE = 0.3
MODES = ("eager", "compile")


class Generator(nn.Module):
  """Dense -> BN -> LReLU -> ConvT 128 s1 -> BN -> LReLU -> ConvT 64 s2 -> ... -> tanh."""

  def __init__(self, latent_dim: int = 100):
    super().__init__()
    bn = lambda c: nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)
    self.dense = nn.Linear(latent_dim, 7 * 7 * 256, bias=False)
    self.bn0 = nn.BatchNorm1d(7 * 7 * 256, eps=1e-3, momentum=0.01)
    self.deconv0 = nn.ConvTranspose2d(256, 128, 5, stride=1, padding=2, bias=False)
    self.bn1 = bn(128)
    self.deconv1 = nn.ConvTranspose2d(128, 64, 5, stride=2, padding=2, output_padding=1,
                                      bias=False)
    self.bn2 = bn(64)
    self.deconv2 = nn.ConvTranspose2d(64, 1, 5, stride=2, padding=2, output_padding=1,
                                      bias=False)

  def forward(self, z: torch.Tensor) -> torch.Tensor:
    x = F.leaky_relu(self.bn0(self.dense(z)), LEAKY_SLOPE).view(-1, 256, 7, 7)
    x = F.leaky_relu(self.bn1(self.deconv0(x)), LEAKY_SLOPE)
    x = F.leaky_relu(self.bn2(self.deconv1(x)), LEAKY_SLOPE)
    return torch.tanh(self.deconv2(x))


class Discriminator(nn.Module):
  """Conv 64 s2 -> LReLU -> Dropout -> Conv 128 s2 -> LReLU -> Dropout -> Dense 1."""

  def __init__(self):
    super().__init__()
    self.conv0 = nn.Conv2d(1, 64, 5, stride=2, padding=2)
    self.conv1 = nn.Conv2d(64, 128, 5, stride=2, padding=2)
    self.dense = nn.Linear(7 * 7 * 128, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.dropout(F.leaky_relu(self.conv0(x), LEAKY_SLOPE), 0.3, self.training)
    x = F.dropout(F.leaky_relu(self.conv1(x), LEAKY_SLOPE), 0.3, self.training)
    return self.dense(x.flatten(1))[:, 0]


class VAE(nn.Module):
  """MLP VAE 784-512-256-(2x32), decoder 32-256-512-784, Bernoulli logits."""

  def __init__(self, hidden=(512, 256), latent_dim: int = 32):
    super().__init__()
    sizes = (784, *hidden)
    self.enc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
    self.stats = nn.Linear(hidden[-1], 2 * latent_dim)
    rev = (latent_dim, *reversed(hidden))
    self.dec = nn.ModuleList(nn.Linear(a, b) for a, b in zip(rev[:-1], rev[1:]))
    self.out = nn.Linear(hidden[0], 784)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """Per-example negative ELBO (one posterior sample)."""
    h = x.flatten(1)
    for layer in self.enc:
      h = F.relu(layer(h))
    mean, logvar = self.stats(h).chunk(2, dim=-1)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    for layer in self.dec:
      z = F.relu(layer(z))
    logits = self.out(z)
    target = (x.flatten(1) > 0).float()
    recon = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)
    kl = 0.5 * (logvar.exp() + mean**2 - 1.0 - logvar).sum(-1)
    return recon + kl


def _adam(params, lr: float, betas: tuple[float, float], kind: str) -> torch.optim.Adam:
  return torch.optim.Adam(params, lr=lr, betas=betas, fused=(kind == "fused") or None)


def make_dcgan_step(compiled: bool, channels_last: bool, adam: str,
                    batch: int) -> Callable[[], float]:
  """One D step + one G step of the DCGAN, as a closure over fixed random reals."""
  g, d = Generator(), Discriminator()
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  g, d = g.to(memory_format=fmt), d.to(memory_format=fmt)
  g_opt = _adam(g.parameters(), 2e-4, (0.5, 0.999), adam)
  d_opt = _adam(d.parameters(), 2e-4, (0.5, 0.999), adam)
  g_fn, d_fn = (torch.compile(g), torch.compile(d)) if compiled else (g, d)
  reals = (torch.rand(batch, 1, 28, 28) * 2 - 1).contiguous(memory_format=fmt)
  ones, zeros = torch.ones(batch), torch.zeros(batch)

  def step() -> float:
    fake = g_fn(torch.randn(batch, 100)).detach()
    d_loss = (F.binary_cross_entropy_with_logits(d_fn(reals), ones)
              + F.binary_cross_entropy_with_logits(d_fn(fake), zeros))
    d_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    d_opt.step()
    g_loss = F.binary_cross_entropy_with_logits(d_fn(g_fn(torch.randn(batch, 100))), ones)
    g_opt.zero_grad(set_to_none=True)
    g_loss.backward()
    g_opt.step()
    return float(g_loss)

  return step


def make_vae_step(compiled: bool, channels_last: bool, adam: str,
                  batch: int) -> Callable[[], float]:
  """One Adam step of the MLP VAE's negative ELBO on a fixed random batch."""
  del channels_last  # No convolutions.
  model = VAE()
  opt = _adam(model.parameters(), 1e-3, (0.9, 0.999), adam)
  fn = torch.compile(model) if compiled else model
  x = torch.rand(batch, 1, 28, 28) * 2 - 1

  def step() -> float:
    loss = fn(x).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss)

  return step


def network(name: str) -> nn.Module:
  """``torch_diffusion``'s network ``name`` at 32x32x3, as ``compare_peers.MODELS`` builds
  fairgen's: ``edm_unet`` (edm_mnist.py's U-Net, attention at 8x8) or ``dit_s`` (DiT-S/2)."""
  if name == "dit_s":
    return torch_diffusion.DiT(3, 32, patch=2, hidden=384, depth=12, heads=6)
  return torch_diffusion.UNet(3, 32, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1,
                              attn_resolutions=(8,))


def make_edm_step(name: str) -> Callable[[bool, bool, str, int], Callable[[], float]]:
  """``make_*_step`` for EDM's step on ``network(name)``."""
  def make(compiled: bool, channels_last: bool, adam: str, batch: int) -> Callable[[], float]:
    del channels_last, adam  # NCHW; fused Adam.
    return torch_diffusion.edm_step(network(name), compiled, batch, 3, 32)
  return make


MAKERS = {"dcgan": make_dcgan_step, "vae": make_vae_step, "edm_unet": make_edm_step("edm_unet"),
          "dit_s": make_edm_step("dit_s")}


def main(argv=None) -> None:
  """Times the modes in interleaved rounds and prints the JSON summary."""
  p = peer_parser(__doc__.splitlines()[0], MODES, "eager,compile")
  p.add_argument("--adam", choices=("fused", "default"), default="fused")
  p.add_argument("--channels_last", action="store_true",
                 help="also time channels-last variants (DCGAN)")
  args = parse_peer_args(p, argv, MODES)
  torch.manual_seed(0)
  make = MAKERS[args.model]
  steps = {}
  for mode in args.modes:
    variants = [False, True] if args.channels_last and args.model == "dcgan" else [False]
    for cl in variants:
      steps[mode + ("+channels_last" if cl else "")] = make(mode == "compile", cl, args.adam,
                                                             args.batch)
  print(json.dumps({"model": args.model, "batch": args.batch,
                    "torch_version": torch.__version__, "threads": torch.get_num_threads(),
                    "adam": args.adam, **time_peer(steps, args, "bench_torch")}))


if __name__ == "__main__":
  main()
