"""Where the tiles of a tiled VAE call fall: pure integer arithmetic, no torch.

The runtime tiles with these spans (:mod:`engine.runtime.tiling`, :mod:`engine.runtime.autoencode`)
and the VAE memory laws classify calls with the same rule, so a warm plan needs no torch.
"""
from __future__ import annotations

import math

from ..plan.aemode import AEMode

Span = tuple[int, int]


def axis_spans(size: int, tile: int, overlap: int) -> list[Span]:
    """Split ``[0, size)`` into tiles of length ``tile`` overlapping by at least ``overlap``.

    Tiles all have full length (the last is not truncated, which would give it too little
    context); their starts are spread evenly, so the actual overlaps are >= ``overlap`` and
    nearly equal. A tile at least as large as ``size`` gives one span, i.e. no tiling.

    Args:
        size: extent of the axis (latent units).
        tile: tile length (latent units), >= 1.
        overlap: minimum overlap between neighbours, ``0 <= overlap < tile``.
    """
    if tile >= size:
        return [(0, size)]
    stride = tile - overlap
    count = math.ceil((size - tile) / stride) + 1
    starts = [round(i * (size - tile) / (count - 1)) for i in range(count)]
    return [(s, s + tile) for s in starts]


def tile_grid(mode: AEMode, h: int, w: int, f: int, argument: str):
    """Latent-unit tile grid for a latent of size ``h x w``; ``None`` when one tile covers it."""
    th, tw = mode.tile
    if th % f or tw % f or (mode.overlap or 0) % f:
        raise ValueError(f"`{argument}` tile {th}x{tw} / overlap {mode.overlap} must be multiples "
                         f"of the VAE downsample factor {f}; round them to multiples of {f}.")
    th, tw = th // f, tw // f
    if th >= h and tw >= w:
        return None  # one tile covers the image: run the exact untiled call
    ov_h = mode.overlap // f if mode.overlap is not None else th // 4
    ov_w = mode.overlap // f if mode.overlap is not None else tw // 4
    return axis_spans(h, th, min(ov_h, th - 1)), axis_spans(w, tw, min(ov_w, tw - 1))
