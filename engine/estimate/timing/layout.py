"""How an autoencoding mode splits a run into VAE calls (see :mod:`engine.estimate.timing`).

Pure Python and torch-free (the tile grid is the runtime's own, :mod:`engine.runtime.grid`), so the
planner can use it without importing torch.
"""
from __future__ import annotations

import dataclasses

from ...runtime.grid import tile_grid


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
        mode: an :class:`~engine.plan.aemode.AEMode` (its ``frames_per_call``, ``tile`` and
            ``overlap``).
        frames: frames to encode or decode.
        height, width: frame size in PIXELS (the latent is ``height // downsample``).
        downsample: the VAE's spatial factor.
    """
    h, w = max(1, height // downsample), max(1, width // downsample)
    k = mode.frames_per_call(frames)
    chunks = tuple((size, n) for size, n in ((k, frames // k), (frames % k, 1)) if size and n)
    tiled, tiles, call_hw = False, 1, (h, w)
    grid = tile_grid(mode, h, w, downsample, "mode") if mode.tile is not None else None
    if grid is not None:
        spans_h, spans_w = grid
        tiled, tiles = True, len(spans_h) * len(spans_w)
        call_hw = (spans_h[0][1] - spans_h[0][0], spans_w[0][1] - spans_w[0][0])
    return CallLayout(chunks, tiles, call_hw, tiled, tiled or k < frames)

