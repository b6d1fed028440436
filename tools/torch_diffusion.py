"""fairgen's EDM U-Net and DiT in PyTorch, and EDM's training step, for ``bench_torch.py``.

The same networks as ``fairgen/models/unet.py`` and ``fairgen/models/dit.py`` build from the
same hyperparameters (``tests/test_benchmark.py`` checks that the parameter counts agree),
in NCHW:
- ``UNet``: Ho et al.'s DDPM U-Net as fairgen builds it (group norm with at least 4
  channels a group, swish, the time embedding added between the two 3x3 convolutions,
  single-head attention at the sides in ``attn_resolutions`` and in the middle, strided
  convolutions down, nearest-neighbour up);
- ``DiT``: patchify, fixed 2-D sine-cosine positions, a sinusoidal timestep embedding
  through a SiLU MLP, adaLN-Zero blocks (LayerNorm without affine, multi-head attention,
  a tanh-GELU MLP), the modulated final layer, unpatchify.
``edm_step`` is one update of EDM's loss (Karras et al. 2022: log-normal sigma, the EDM
preconditioning and weight, ``sigma_data`` 0.5) with Adam and the EMA, as
``fairgen/objectives/edm.py`` trains with ``denoising.train_step``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F


def _groups(c: int) -> int:
  """fairgen's group count: 32, or fewer so that every group has >= 4 channels."""
  return math.gcd(32, max(1, c // 4))


def _sinusoid(t: torch.Tensor, dim: int, denominator: int, cos_first: bool) -> torch.Tensor:
  half = dim // 2
  freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / denominator)
  args = t.float()[:, None] * freqs[None]
  parts = [torch.cos(args), torch.sin(args)] if cos_first else [torch.sin(args), torch.cos(args)]
  return F.pad(torch.cat(parts, -1), (0, dim % 2))


class ResBlock(nn.Module):
  def __init__(self, cin: int, cout: int, emb: int):
    super().__init__()
    self.norm1, self.norm2 = nn.GroupNorm(_groups(cin), cin), nn.GroupNorm(_groups(cout), cout)
    self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
    self.emb = nn.Linear(emb, cout)
    self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

  def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    h = self.conv1(F.silu(self.norm1(x))) + self.emb(F.silu(emb))[:, :, None, None]
    return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
  def __init__(self, c: int):
    super().__init__()
    self.norm = nn.GroupNorm(_groups(c), c)
    self.q, self.k, self.v, self.out = (nn.Linear(c, c) for _ in range(4))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    y = self.norm(x).flatten(2).transpose(1, 2)
    y = F.scaled_dot_product_attention(self.q(y)[:, None], self.k(y)[:, None], self.v(y)[:, None])
    return x + self.out(y[:, 0]).transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
  """fairgen's ``UNet`` (unconditional, no dropout) at ``size`` x ``size`` x ``channels``."""

  def __init__(self, channels: int, size: int, ch: int, ch_mult: Sequence[int],
               num_res_blocks: int, attn_resolutions: Sequence[int]):
    super().__init__()
    self.ch, self.attn = ch, set(attn_resolutions)
    self.temb = nn.Sequential(nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))
    self.conv_in = nn.Conv2d(channels, ch, 3, padding=1)
    self.down, skips, c, side = nn.ModuleList(), [ch], ch, size
    for level, mult in enumerate(ch_mult):
      for _ in range(num_res_blocks):
        self.down.append(self._block(c, ch * mult, side))
        c = ch * mult
        skips.append(c)
      if level != len(ch_mult) - 1:
        self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        skips.append(c)
        side = (side + 1) // 2
    self.mid = nn.ModuleList([ResBlock(c, c, 4 * ch), AttnBlock(c), ResBlock(c, c, 4 * ch)])
    self.up = nn.ModuleList()
    for level, mult in reversed(list(enumerate(ch_mult))):
      for _ in range(num_res_blocks + 1):
        self.up.append(self._block(c + skips.pop(), ch * mult, side))
        c = ch * mult
      if level != 0:
        side *= 2
        self.up.append(nn.Conv2d(c, c, 3, padding=1))
    self.norm_out, self.conv_out = nn.GroupNorm(_groups(c), c), nn.Conv2d(c, channels, 3, padding=1)

  def _block(self, cin: int, cout: int, side: int) -> nn.ModuleList:
    layers = [ResBlock(cin, cout, 4 * self.ch)]
    return nn.ModuleList(layers + ([AttnBlock(cout)] if side in self.attn else []))

  def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    emb = self.temb(_sinusoid(t, self.ch, self.ch // 2 - 1, cos_first=False))
    h = self.conv_in(x)
    skips = [h]
    for layer in self.down:
      h = layer(h) if isinstance(layer, nn.Conv2d) else _run(layer, h, emb)
      skips.append(h)
    h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
    for layer in self.up:
      if isinstance(layer, nn.Conv2d):
        side = skips[-1].shape[-2:]
        h = layer(F.interpolate(h, scale_factor=2, mode="nearest")[..., :side[0], :side[1]])
      else:
        h = _run(layer, torch.cat([h, skips.pop()], 1), emb)
    return self.conv_out(F.silu(self.norm_out(h)))


def _run(block: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
  """A residual block and its optional attention."""
  h = block[0](h, emb)
  return block[1](h) if len(block) > 1 else h


class DiTBlock(nn.Module):
  def __init__(self, hidden: int, heads: int, mlp_ratio: float):
    super().__init__()
    self.heads = heads
    self.mod = nn.Linear(hidden, 6 * hidden)
    self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
    width = int(hidden * mlp_ratio)
    self.fc1, self.fc2 = nn.Linear(hidden, width), nn.Linear(width, hidden)

  def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.mod(F.silu(c))[:, None].chunk(6, -1)
    h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale_a) + shift_a
    b, n, d = h.shape
    q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
    x = x + gate_a * self.proj(h)
    h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale_m) + shift_m
    return x + gate_m * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


def _sincos_positions(dim: int, grid: int) -> torch.Tensor:
  def one_d(d: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
    out = pos.reshape(-1, 1).double() * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], 1)
  h, w = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
  return torch.cat([one_d(dim // 2, w), one_d(dim // 2, h)], 1).float()


class DiT(nn.Module):
  """fairgen's ``DiT`` (unconditional) at ``size`` x ``size`` x ``channels``."""

  def __init__(self, channels: int, size: int, patch: int, hidden: int, depth: int,
               heads: int, mlp_ratio: float = 4.0):
    super().__init__()
    self.patch, self.channels = patch, channels
    self.embed = nn.Conv2d(channels, hidden, patch, stride=patch)
    self.register_buffer("pos", _sincos_positions(hidden, size // patch)[None])
    self.temb = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
    self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
    self.final_mod = nn.Linear(hidden, 2 * hidden)
    self.final = nn.Linear(hidden, patch * patch * channels)

  def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    b, _, height, width = x.shape
    h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
    c = self.temb(_sinusoid(t, 256, 128, cos_first=True))
    for block in self.blocks:
      h = block(h, c)
    shift, scale = self.final_mod(F.silu(c))[:, None].chunk(2, -1)
    h = self.final(F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale) + shift)
    p, g = self.patch, height // self.patch
    h = h.reshape(b, g, g, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
    return h.reshape(b, self.channels, height, width)


def edm_step(net: nn.Module, compiled: bool, batch: int, channels: int, size: int,
             sigma_data: float = 0.5, lr: float = 1e-3, ema_decay: float = 0.999
             ) -> Callable[[], float]:
  """One Adam update of EDM's weighted denoising loss and the EMA, on a fixed batch."""
  opt = torch.optim.Adam(net.parameters(), lr=lr, fused=True)
  ema = [p.detach().clone() for p in net.parameters()]
  fn = torch.compile(net) if compiled else net
  x = torch.rand(batch, channels, size, size) * 2 - 1

  def step() -> float:
    sigma = torch.exp(torch.randn(batch) * 1.2 - 1.2)[:, None, None, None]
    noisy = x + torch.randn_like(x) * sigma
    scale = sigma**2 + sigma_data**2
    c_skip, c_out = sigma_data**2 / scale, sigma * sigma_data / scale.sqrt()
    out = fn(noisy / scale.sqrt(), sigma.flatten().log() / 4)
    weight = scale / (sigma * sigma_data) ** 2
    loss = (weight * (c_skip * noisy + c_out * out - x) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, list(net.parameters()), 1.0 - ema_decay)
    return float(loss)

  return step
