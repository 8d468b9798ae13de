"""How an autoencoding mode splits a run into VAE calls (see :mod:`engine.estimate.timing`).

Pure Python and torch-free, so the planner can use it without importing torch.
"""
from __future__ import annotations

import dataclasses
import math


def _axis_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Same spans as :func:`engine.runtime.tiling.axis_spans` (kept torch-free for planning)."""
    if tile >= size:
        return [(0, size)]
    stride = tile - overlap
    count = math.ceil((size - tile) / stride) + 1
    return [(s, s + tile) for s in (round(i * (size - tile) / (count - 1)) for i in range(count))]


@dataclasses.dataclass(frozen=True)
class CallLayout:
    """How a mode splits one autoencoding run into VAE calls.

    Attributes:
        chunks: ``(frames per call, number of such chunks)`` pairs (the last chunk may be short).
        tiles: tiles per frame (1 when untiled).
        call_hw: latent ``(height, width)`` one call sees.
        tiled: whether tiles are blended (a tile covering the frame is the untiled call).
        copied: whether each chunk is copied into an output buffer (any chunking or tiling).
    """

    chunks: tuple[tuple[int, int], ...]
    tiles: int
    call_hw: tuple[int, int]
    tiled: bool
    copied: bool

    @property
    def calls(self) -> int:
        """Number of VAE calls."""
        return self.tiles * sum(n for _, n in self.chunks)


def call_layout(mode, frames: int, height: int, width: int, downsample: int = 8) -> CallLayout:
    """The VAE calls :func:`engine.runtime.autoencode.decode_frames` makes for ``mode``.

    Args:
        mode: an :class:`~engine.plan.aemode.AEMode` (anything with ``chunk``, ``tile``,
            ``overlap``).
        frames: frames to encode or decode.
        height, width: frame size in PIXELS (the latent is ``height // downsample``).
        downsample: the VAE's spatial factor.
    """
    h, w = max(1, height // downsample), max(1, width // downsample)
    k = min(mode.chunk or frames, frames)
    chunks = tuple((size, n) for size, n in ((k, frames // k), (frames % k, 1)) if size and n)
    tiled, tiles, call_hw = False, 1, (h, w)
    if mode.tile is not None:
        th, tw = mode.tile
        f = downsample
        if th % f or tw % f or (mode.overlap or 0) % f:
            raise ValueError(f"`mode` tile {th}x{tw} / overlap {mode.overlap} must be multiples of "
                             f"the VAE downsample factor {f}; round them to multiples of {f}.")
        th, tw = th // f, tw // f
        if not (th >= h and tw >= w):
            ov_h = mode.overlap // f if mode.overlap is not None else th // 4
            ov_w = mode.overlap // f if mode.overlap is not None else tw // 4
            spans_h = _axis_spans(h, th, min(ov_h, th - 1))
            spans_w = _axis_spans(w, tw, min(ov_w, tw - 1))
            tiled, tiles = True, len(spans_h) * len(spans_w)
            call_hw = (spans_h[0][1] - spans_h[0][0], spans_w[0][1] - spans_w[0][0])
    return CallLayout(chunks, tiles, call_hw, tiled, tiled or k < frames)

