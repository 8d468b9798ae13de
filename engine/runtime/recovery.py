"""What to run instead when a stage runs out of memory: the next, smaller setting for that stage.

Each stage has a ladder of settings that need less memory and give the same result (fp32: within
the tolerances of ``docs/autoencoding.md``; precision is never changed mid-run):

* ``denoise``: CFG batched -> sequential; naive attention -> SDPA; offload none -> model -> block
  (on an accelerator; on the CPU weights live in the same memory wherever they are); SDPA ->
  query-chunked SDPA (1024 tokens).
* ``vae_encode`` / ``vae_decode``: batched -> half the frames per call -> ... -> per-frame ->
  per-frame with 256-, then 128-pixel tiles.
* ``text_encode`` / ``image_encode``: offload none -> model (accelerator only).

A run climbs down at most :data:`MAX_REPLANS` rungs in all; every step is an :class:`Adjustment`
the caller gets back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import EngineError
from ..plan.aemode import AEMode
from ..plan.settings import Attention, CFGMode, Offload, Settings

MAX_REPLANS = 3
_SMALLEST_TILE = 128


class OutOfMemory(EngineError):
    """A stage ran out of memory after every re-plan the runtime may make."""


@dataclass(frozen=True)
class Adjustment:
    """One change the runtime made mid-run, and why."""

    stage: str
    step: int | None
    old: Settings
    new: Settings
    reason: str
    measured: bool = False  # sized from a measurement before any trouble (not a re-plan)

    def changes(self) -> dict[str, tuple[str, str]]:
        old, new = self.old.to_dict(), self.new.to_dict()
        return {k: (str(old[k]), str(new[k])) for k in old if old[k] != new[k]}

    def describe_changes(self) -> str:
        """``cfg batched -> sequential, ...`` (or that the settings stayed, for a retry)."""
        return (", ".join(f"{k} {a} -> {b}" for k, (a, b) in self.changes().items())
                or "the same settings after freeing memory")

    def to_dict(self) -> dict:
        return {"stage": self.stage, "step": self.step, "old": self.old.to_dict(), "new": self.new.to_dict(),
                "changes": {k: list(v) for k, v in self.changes().items()}, "reason": self.reason,
                "measured": self.measured}


def smaller_mode(mode: AEMode, frames: int) -> AEMode | None:
    """The next autoencoding mode down, or None below 128-pixel per-frame tiles."""
    chunk = frames if mode.chunk is None else mode.chunk
    if chunk > 1:
        return replace(mode, chunk=max(1, math.ceil(chunk / 2)) if chunk > 2 else 1)
    if mode.tile is None:
        return AEMode(chunk=1, tile=(256, 256))
    if min(mode.tile) > _SMALLEST_TILE:
        side = max(_SMALLEST_TILE, min(mode.tile) // 2)
        return AEMode(chunk=1, tile=(side, side))
    return None


def _denoise_rung(s: Settings, accelerator: bool) -> Settings | None:
    if s.cfg is CFGMode.BATCHED:
        return replace(s, cfg=CFGMode.SEQUENTIAL)
    if Attention.NAIVE in (s.spatial_attention, s.temporal_attention):
        fused = {k: Attention.SDPA for k in ("spatial_attention", "temporal_attention")
                 if getattr(s, k) is Attention.NAIVE}
        return replace(s, **fused)
    if accelerator and s.offload is not Offload.BLOCK:
        return replace(s, offload=Offload.MODEL if s.offload is Offload.NONE else Offload.BLOCK)
    if Attention.CHUNKED not in (s.spatial_attention, s.temporal_attention) or s.attention_chunk > 1024:
        return replace(s, spatial_attention=Attention.CHUNKED, temporal_attention=Attention.CHUNKED,
                       attention_chunk=min(1024, s.attention_chunk))
    return None


def next_settings(stage: str, s: Settings, *, accelerator: bool, frames: int) -> Settings | None:
    """Settings that lower ``stage``'s memory by one rung, or None when nothing is left to try."""
    if stage == "denoise":
        return _denoise_rung(s, accelerator)
    if stage in ("vae_encode", "vae_decode"):
        key = "ae_encode" if stage == "vae_encode" else "ae_decode"
        mode = smaller_mode(getattr(s, key), frames)
        return None if mode is None else replace(s, **{key: mode})
    if accelerator and s.offload is Offload.NONE:
        return replace(s, offload=Offload.MODEL)
    return None
