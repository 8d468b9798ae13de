"""Tile geometry and feathered blending for spatially tiled autoencoding.

All geometry is computed in LATENT units and scaled by the VAE's downsample factor on the
pixel side, so encode tiles (pixel input, latent output) and decode tiles (latent input,
pixel output) share one grid and every pixel tile edge lands on a latent boundary.

Blending: each tile's output is weighted by a separable raised-cosine ramp across the part
it shares with its neighbour (weight 1 in its interior and at image borders), the per-axis
ramps are normalised so the weights of overlapping tiles sum to exactly 1, and the weighted
tile is accumulated in place into the destination. Because the weights are normalised before
accumulation, no separate full-size weight buffer is kept (ComfyUI keeps one and divides at
the end; the result is the same).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .grid import Span, axis_spans  # noqa: F401 (axis_spans: the runtime's name for it)


def _ramp(length: int, scale: int) -> torch.Tensor:
    """Raised-cosine rise over ``length * scale`` samples, strictly inside (0, 1)."""
    n = length * scale
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return 0.5 - 0.5 * torch.cos(math.pi * t)


def axis_weights(spans: list[Span], scale: int) -> list[torch.Tensor]:
    """Per-tile 1-D blend weights at ``scale`` x the span resolution, normalised to sum to 1.

    Args:
        spans: output of :func:`axis_spans` (latent units).
        scale: samples per latent unit on the side being blended (1 for latents, the
            downsample factor for pixels).
    """
    size = spans[-1][1] * scale
    raw = []
    for i, (start, end) in enumerate(spans):
        w = torch.ones((end - start) * scale, dtype=torch.float64)
        if i > 0 and spans[i - 1][1] > start:  # rise across the overlap with the previous tile
            rise = _ramp(spans[i - 1][1] - start, scale)
            w[: rise.numel()] = rise
        if i + 1 < len(spans) and spans[i + 1][0] < end:  # fall across the next overlap
            fall = _ramp(end - spans[i + 1][0], scale).flip(0)
            w[-fall.numel():] = torch.minimum(w[-fall.numel():], fall)
        raw.append(w)
    total = torch.zeros(size, dtype=torch.float64)
    for (start, end), w in zip(spans, raw):
        total[start * scale: end * scale] += w
    return [w / total[s * scale: e * scale] for (s, e), w in zip(spans, raw)]


def blend_tiles(fn: Callable[[torch.Tensor], torch.Tensor], src: torch.Tensor,
                dst: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                spans_h: list[Span], spans_w: list[Span], src_scale: int, dst_scale: int
                ) -> torch.Tensor:
    """Run ``fn`` on every tile of ``src`` and accumulate the blended results into ``dst``.

    ``dst`` is overwritten. It may live on another device or dtype than ``fn``'s output (e.g.
    a CPU buffer for a GPU decode); each tile is moved once and freed before the next.

    Args:
        fn: maps a ``src`` tile ``[n, c, th*src_scale, tw*src_scale]`` to
            ``[n, c', th*dst_scale, tw*dst_scale]``.
        src: full input, spatial size = grid extent x ``src_scale``.
        dst: preallocated output (spatial size = grid extent x ``dst_scale``), or a function
            that receives the first tile's output and returns the buffer, so callers need not
            know the output channels or dtype in advance.
        spans_h, spans_w: tile grid in latent units (:func:`axis_spans`).
        src_scale, dst_scale: samples per latent unit on the input / output side.

    Returns:
        ``dst``.
    """
    wh, ww = axis_weights(spans_h, dst_scale), axis_weights(spans_w, dst_scale)
    for index, ((y0, y1), wy) in enumerate(zip(spans_h, wh)):
        for jndex, ((x0, x1), wx) in enumerate(zip(spans_w, ww)):
            tile = fn(src[..., y0 * src_scale: y1 * src_scale, x0 * src_scale: x1 * src_scale])
            if index == 0 and jndex == 0:
                dst = dst(tile) if callable(dst) else dst
                dst.zero_()
            tile = tile.to(dst.device, dst.dtype)
            weight = (wy[:, None] * wx[None, :]).to(dst.device, dst.dtype)
            region = dst[..., y0 * dst_scale: y1 * dst_scale, x0 * dst_scale: x1 * dst_scale]
            region.addcmul_(tile, weight)
            del tile  # free this tile before the next one is computed
    return dst


def psnr(reference: torch.Tensor, estimate: torch.Tensor, peak: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; ``peak`` defaults to the reference's value range
    (2.0 for images in [-1, 1]), so random-weight VAEs with odd output scales compare fairly."""
    ref, est = reference.double(), estimate.double()
    if peak is None:
        peak = float(ref.max() - ref.min())
    mse = float(torch.mean((ref - est) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(peak * peak / mse)
