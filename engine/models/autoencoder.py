"""KL-f8 autoencoder (LDM ``AutoencoderKL``), state-dict compatible with DynamiCrafter's
``first_stage_model``. Pure module: chunking and tiling attach from ``engine.runtime.autoencode``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .params import VAEParams


def _norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels=None):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head full self-attention over all h*w positions (1x1 conv projections)."""

    def __init__(self, channels):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, c, h * w).permute(0, 2, 1)
        k = self.k(y).reshape(b, c, h * w)
        v = self.v(y).reshape(b, c, h * w)
        weights = torch.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=2)
        out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels):
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(channels), AttnBlock(channels), ResnetBlock(channels)
    return mid


class Encoder(nn.Module):
    def __init__(self, p: VAEParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        in_mult = (1,) + tuple(p.ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(p.ch_mult):
            level = nn.Module()
            chans = [p.ch * in_mult[i]] + [p.ch * mult] * p.num_res_blocks
            level.block = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(chans, chans[1:]))
            level.attn = nn.ModuleList()
            if i != len(p.ch_mult) - 1:
                level.downsample = Downsample(p.ch * mult)
            self.down.append(level)
        top = p.ch * p.ch_mult[-1]
        self.mid = _mid(top)
        self.norm_out = _norm(top)
        self.conv_out = nn.Conv2d(top, 2 * p.z_channels if p.double_z else p.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: VAEParams):
        super().__init__()
        top = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, top, 3, padding=1)
        self.mid = _mid(top)
        self.up = nn.ModuleList()
        ch = top
        for i in reversed(range(len(p.ch_mult))):
            level, out = nn.Module(), p.ch * p.ch_mult[i]
            chans = [ch] + [out] * (p.num_res_blocks + 1)
            level.block = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(chans, chans[1:]))
            level.attn = nn.ModuleList()
            if i != 0:
                level.upsample = Upsample(out)
            ch = out
            self.up.insert(0, level)  # stored low-to-high resolution index, run high-to-low
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, p.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)); logvar clamped to [-30, 20] as in LDM."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, noise: torch.Tensor | None = None, generator: torch.Generator | None = None):
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                                device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def mode(self):
        return self.mean


class AutoencoderKL(nn.Module):
    """``encode(x) -> DiagonalGaussian`` over latents, ``decode(z) -> image`` in [-1, 1]."""

    _no_split_modules = ("ResnetBlock", "AttnBlock")

    def __init__(self, p: VAEParams = VAEParams()):
        super().__init__()
        self.params = p
        self.encoder = Encoder(p)
        self.decoder = Decoder(p)
        self.quant_conv = nn.Conv2d(2 * p.z_channels, 2 * p.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(p.embed_dim, p.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))
