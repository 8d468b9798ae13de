"""Perceiver Resampler (IP-Adapter style): CLIP image tokens -> 16 context tokens per frame."""
from __future__ import annotations

import math

import torch
from torch import nn

from .params import ResamplerParams


class PerceiverAttention(nn.Module):
    """Latents attend to [image features, latents]; q and k both scaled by dim_head^-1/4."""

    def __init__(self, dim, dim_head, heads):
        super().__init__()
        inner = dim_head * heads
        self.dim_head, self.heads = dim_head, heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self._heads(self.to_q(latents))
        k, v = (self._heads(t) for t in self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1))
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))  # split between q and k: fp16-stable
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(b, n, -1)
        return self.to_out(out)


def _feed_forward(dim, mult):
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    def __init__(self, p: ResamplerParams = ResamplerParams()):
        super().__init__()
        self.params = p
        queries = p.num_queries * (p.video_length or 1)
        self.latents = nn.Parameter(torch.randn(1, queries, p.dim) / p.dim ** 0.5)
        self.proj_in = nn.Linear(p.embedding_dim, p.dim)
        self.proj_out = nn.Linear(p.dim, p.output_dim)
        self.norm_out = nn.LayerNorm(p.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(p.dim, p.dim_head, p.heads), _feed_forward(p.dim, p.ff_mult)])
            for _ in range(p.depth))

    def forward(self, x):
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
