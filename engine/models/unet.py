"""DynamiCrafter's 3D UNet (LVDM ``openaimodel3d.UNetModel``), state-dict compatible.

Frames are folded into the batch (``[(b t), c, h, w]``) everywhere except inside the temporal
layers. Structure for the planner: ``input_blocks``, ``middle_block`` and ``output_blocks`` are the
offload units (``_block_modules``); a block is never split (``_no_split_modules``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .layers import GroupNorm32, timestep_embedding, zero_module
from .transformers import TEXT_CONTEXT_LEN, SpatialTransformer, TemporalTransformer
from .params import UNetParams

IMAGE_TOKENS_PER_FRAME = 16  # the Resampler emits 16 tokens per frame (hard-coded in DynamiCrafter)


class TemporalConvBlock(nn.Module):
    """Four GroupNorm-SiLU-Conv3d(3,1,1) layers along time with a residual (last conv zeroed)."""

    def __init__(self, channels):
        super().__init__()

        def layer(drop: bool):
            mods = [nn.GroupNorm(32, channels), nn.SiLU()] + ([nn.Dropout(0.0)] if drop else [])
            return nn.Sequential(*mods, nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))

        self.conv1, self.conv2, self.conv3, self.conv4 = layer(False), layer(True), layer(True), layer(True)
        zero_module(self.conv4[-1])

    def forward(self, x):
        return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))


class ResBlock(nn.Module):
    """GN-SiLU-conv, + embedding, GN-SiLU-conv, skip; then a temporal conv block on ``[b c t h w]``."""

    def __init__(self, channels, emb_channels, out_channels=None, temporal_conv=True):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(32, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))
        if temporal_conv:
            self.temopral_conv = TemporalConvBlock(out_channels)  # [sic]: the checkpoint's key name

    def forward(self, x, emb, batch_size):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        h = self.skip_connection(x) + self.out_layers(h)
        if hasattr(self, "temopral_conv"):
            h = rearrange(h, "(b t) c h w -> b c t h w", b=batch_size)
            h = rearrange(self.temopral_conv(h), "b c t h w -> (b t) c h w")
        return h


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNetStage(nn.Sequential):
    """A sequence of layers that routes embedding and context to the layers that take them."""

    def forward(self, x, emb, context, batch_size):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, batch_size)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, TemporalTransformer):
                x = rearrange(x, "(b t) c h w -> b c t h w", b=batch_size)
                x = rearrange(layer(x), "b c t h w -> (b t) c h w")
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """The DynamiCrafter 3D UNet. ``forward(x [b,c,t,h,w], timesteps [b], context, fs)``."""

    _block_modules = ("input_blocks", "middle_block", "output_blocks")
    _no_split_modules = ("UNetStage",)
    _keep_in_fp32_modules = ("GroupNorm32",)  # normalises in fp32 by design (LVDM GroupNormSpecific)

    def __init__(self, p: UNetParams):
        super().__init__()
        self.params = p
        ch0, emb_dim = p.model_channels, p.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if p.fs_condition:
            self.fps_embedding = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            zero_module(self.fps_embedding[-1])
        self.input_blocks = nn.ModuleList([UNetStage(nn.Conv2d(p.in_channels, ch0, 3, padding=1))])
        if p.addition_attention:
            self.init_attn = UNetStage(TemporalTransformer(ch0, 8, p.num_head_channels, use_linear=False))
        skip_channels, ch, ds = [ch0], ch0, 1
        for level, mult in enumerate(p.channel_mult):
            for _ in range(p.num_res_blocks):
                layers, ch = [self._resblock(ch, mult * ch0)], mult * ch0
                layers += self._attention_layers(ch, ds)
                self.input_blocks.append(UNetStage(*layers))
                skip_channels.append(ch)
            if level != len(p.channel_mult) - 1:
                self.input_blocks.append(UNetStage(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = UNetStage(self._resblock(ch, ch), *self._attention_layers(ch, None),
                                      self._resblock(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(p.channel_mult))):
            for i in range(p.num_res_blocks + 1):
                layers, ch = [self._resblock(ch + skip_channels.pop(), mult * ch0)], mult * ch0
                layers += self._attention_layers(ch, ds)
                if level and i == p.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(UNetStage(*layers))
        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch0, p.out_channels, 3, padding=1)))

    def _resblock(self, ch_in, ch_out):
        p = self.params
        return ResBlock(ch_in, p.model_channels * 4, ch_out, p.temporal_conv)

    def _attention_layers(self, ch, ds):
        """Spatial + temporal transformer at attention resolutions (``ds=None``: the middle block)."""
        p = self.params
        if ds is not None and ds not in p.attention_resolutions:
            return []
        heads = ch // p.num_head_channels
        layers = [SpatialTransformer(ch, heads, p.num_head_channels, p.context_dim,
                                     p.image_cross_attention, p.image_cross_attention_scale_learnable)]
        if p.temporal_attention:
            layers.append(TemporalTransformer(ch, heads, p.num_head_channels))
        return layers

    def _frame_context(self, context, t):
        """Per-frame context: text repeated, and 16 image tokens per frame when the layout is 77+16t."""
        if context.shape[1] == TEXT_CONTEXT_LEN + t * IMAGE_TOKENS_PER_FRAME:
            text = context[:, :TEXT_CONTEXT_LEN].repeat_interleave(t, dim=0)
            image = rearrange(context[:, TEXT_CONTEXT_LEN:], "b (t l) c -> (b t) l c", t=t)
            return torch.cat([text, image], dim=1)
        return context.repeat_interleave(t, dim=0)

    def _embedding(self, timesteps, fs, b, t, dtype):
        p = self.params
        emb = self.time_embed(timestep_embedding(timesteps, p.model_channels).type(dtype))
        if p.fs_condition:
            if fs is None:
                fs = torch.full((b,), p.default_fs, dtype=torch.long, device=timesteps.device)
            emb = emb + self.fps_embedding(timestep_embedding(fs, p.model_channels).type(dtype))
        return emb.repeat_interleave(t, dim=0)

    def forward(self, x, timesteps, context, fs=None, **_ignored):
        b, _, t, _, _ = x.shape
        emb = self._embedding(timesteps, fs, b, t, x.dtype)
        context = self._frame_context(context, t)
        h = rearrange(x, "b c t h w -> (b t) c h w")
        skips = []
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context, b)
            if i == 0 and self.params.addition_attention:
                h = self.init_attn(h, emb, context, b)
            skips.append(h)
        h = self.middle_block(h, emb, context, b)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, b)
        return rearrange(self.out(h), "(b t) c h w -> b c t h w", b=b)
