"""The models' parameter dataclasses: torch-free, so a spec is read and planned without torch.

The model modules (:mod:`engine.models.unet`, :mod:`engine.models.autoencoder`,
:mod:`engine.models.resampler`) build from these and re-export them under their old names.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ResamplerParams", "UNetParams", "VAEParams"]


@dataclass(frozen=True)
class UNetParams:
    in_channels: int = 8
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple = (1, 2, 4, 4)
    num_head_channels: int = 64
    context_dim: int = 1024
    temporal_length: int = 16
    addition_attention: bool = True
    image_cross_attention: bool = True
    image_cross_attention_scale_learnable: bool = False
    temporal_conv: bool = True
    temporal_attention: bool = True
    fs_condition: bool = True
    default_fs: int = 10


@dataclass(frozen=True)
class VAEParams:
    embed_dim: int = 4
    z_channels: int = 4
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    double_z: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class ResamplerParams:
    dim: int = 1024
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16
    embedding_dim: int = 1280
    output_dim: int = 1024
    ff_mult: int = 4
    video_length: int | None = 16
