"""Spatial and temporal transformers of the DynamiCrafter UNet (LVDM ``attention.py`` layout)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention_ops import attend
from .layers import zero_module

TEXT_CONTEXT_LEN = 77  # CLIP text tokens at the head of the context; image tokens follow


class CrossAttention(nn.Module):
    """Multi-head attention; with ``image_cross_attention`` a second, decoupled attention over the
    image tokens (``to_k_ip``/``to_v_ip``) is added to the text attention (IP-Adapter style)."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64,
                 image_cross_attention=False, image_scale_learnable=False):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.backend = "sdpa"  # execution policy, set from outside (engine.runtime.attention)
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        self.image_cross_attention = image_cross_attention
        self.image_scale_learnable = image_scale_learnable
        if image_cross_attention:
            self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner, bias=False)
            if image_scale_learnable:
                self.alpha = nn.Parameter(torch.tensor(0.0))

    def forward(self, x, context=None):
        q = self.to_q(x)
        if context is None:  # self-attention
            return self.to_out(attend(q, self.to_k(x), self.to_v(x), self.heads, self.backend))
        text = context[:, :TEXT_CONTEXT_LEN]
        out = attend(q, self.to_k(text), self.to_v(text), self.heads, self.backend)
        if self.image_cross_attention:
            image = context[:, TEXT_CONTEXT_LEN:]
            out_ip = attend(q, self.to_k_ip(image), self.to_v_ip(image), self.heads, self.backend)
            if self.image_scale_learnable:
                out_ip = out_ip * (torch.tanh(self.alpha) + 1)
            out = out + out_ip
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """x += attn1(LN x); x += attn2(LN x, context); x += FF(LN x)."""

    def __init__(self, dim, heads, dim_head, context_dim=None, image_cross_attention=False,
                 image_scale_learnable=False):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head,
                                    image_cross_attention, image_scale_learnable)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Attention over the h*w tokens of each frame; input ``[(b t), c, h, w]``."""

    def __init__(self, channels, heads, dim_head, context_dim, image_cross_attention=False,
                 image_scale_learnable=False):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(
            inner, heads, dim_head, context_dim, image_cross_attention, image_scale_learnable)])
        self.proj_out = zero_module(nn.Linear(inner, channels))

    def forward(self, x, context=None):
        _, _, h, w = x.shape
        x_in = x
        x = rearrange(self.norm(x), "b c h w -> b (h w) c").contiguous()
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        x = self.proj_out(x)
        return rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous() + x_in


class TemporalTransformer(nn.Module):
    """Self-attention along time at every pixel; input ``[b, c, t, h, w]``.

    Both attentions of the block are temporal self-attention (``temporal_selfatt_only``). The
    ``init_attn`` instance projects with 1x1 Conv1d (``use_linear=False``), the others with Linear.
    """

    def __init__(self, channels, heads, dim_head, use_linear=True):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        proj = (lambda i, o: nn.Linear(i, o)) if use_linear else (lambda i, o: nn.Conv1d(i, o, 1))
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner, heads, dim_head)])
        self.proj_out = zero_module(proj(inner, channels))

    def forward(self, x):
        b, _, t, h, w = x.shape
        x_in = x
        x = rearrange(self.norm(x), "b c t h w -> (b h w) c t").contiguous()
        if not self.use_linear:
            x = self.proj_in(x)
        x = rearrange(x, "n c t -> n t c").contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x)
        if self.use_linear:
            x = self.proj_out(x)
            x = rearrange(x, "(b h w) t c -> b c t h w", b=b, h=h, w=w).contiguous()
        else:
            x = self.proj_out(rearrange(x, "n t c -> n c t").contiguous())
            x = rearrange(x, "(b h w) c t -> b c t h w", b=b, h=h, w=w).contiguous()
        return x + x_in
