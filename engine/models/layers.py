"""Small building blocks shared by the UNet, the VAE and the transformers."""
import math

import torch
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back, as LVDM's ``GroupNormSpecific`` does."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a freshly built module's parameters (residual branches start as identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps (DDPM/ADM convention)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
