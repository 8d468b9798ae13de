"""Shapes and features of VAE calls as the memory laws see them (see :mod:`engine.estimate.vae`).

A call is classified into its family (``batched``, ``chunked`` or ``tiled``) and its features
(``n``, ``k``, ``hw``, ``thw``, ``tp``, ``T``) by the runtime's own chunk and tile rules.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ...plan.aemode import AEMode
from ...runtime.grid import tile_grid

if TYPE_CHECKING:
    from torch import nn

DIRECTIONS = ("decode", "encode")
FAMILIES = ("batched", "chunked", "tiled")


@dataclasses.dataclass(frozen=True)
class CallPoint:
    """One call as the laws see it: its family, features and latent size."""

    family: str
    features: dict
    lat: tuple[int, int]
    call_lat: tuple[int, int]  # latent size of one VAE call's input (the tile when tiled)


def classify_call(frames: int, lat_h: int, lat_w: int, mode: AEMode, f: int) -> CallPoint:
    """Family and features of a call, following the runtime's own chunk and tile rules."""
    n = frames
    k = mode.frames_per_call(n)
    hw = float(lat_h * lat_w)
    if mode.tile is not None:
        # The runtime's own grid rule, so both always agree.
        grid = tile_grid(mode, lat_h, lat_w, f, "mode")
        if grid is not None:
            spans_h, spans_w = grid
            th, tw = spans_h[0][1] - spans_h[0][0], spans_w[0][1] - spans_w[0][0]
            feats = dict(n=n, k=k, hw=hw, thw=float(th * tw), tp=float(th + tw),
                         T=len(spans_h) * len(spans_w))
            return CallPoint("tiled", feats, (lat_h, lat_w), (th, tw))
    family = "batched" if k >= n else "chunked"
    feats = dict(n=n, k=k, hw=hw, thw=hw, tp=float(lat_h + lat_w), T=1)
    return CallPoint(family, feats, (lat_h, lat_w), (lat_h, lat_w))


def fit_point(shape: tuple[int, ...], f: int) -> tuple[CallPoint, AEMode]:
    n, k, h, w, th, tw = shape
    mode = AEMode(chunk=k if k < n else None, tile=(th * f, tw * f) if th else None)
    return classify_call(n, h, w, mode, f), mode


def vae_channels(vae: nn.Module) -> tuple[int, int]:
    """(latent channels, image channels): ours (``params``), diffusers (``config``), else the
    convolutions the calls start with, else the KL-f8 defaults (4, 3)."""
    from torch import nn

    params = getattr(vae, "params", None) or getattr(vae, "config", None)
    latent = getattr(params, "embed_dim", None) or getattr(params, "latent_channels", None)
    image = getattr(params, "in_channels", None)
    if latent is None and isinstance(getattr(vae, "post_quant_conv", None), nn.Conv2d):
        latent = vae.post_quant_conv.in_channels
    conv_in = getattr(getattr(vae, "encoder", None), "conv_in", None)
    if image is None and isinstance(conv_in, nn.Conv2d):
        image = conv_in.in_channels
    return int(latent or 4), int(image or 3)


def input_shape(direction: str, n: int, lat: tuple[int, int], channels: tuple[int, int],
                 f: int) -> tuple[int, ...]:
    if direction == "decode":
        return (n, channels[0], lat[0], lat[1])
    return (n, channels[1], lat[0] * f, lat[1] * f)

