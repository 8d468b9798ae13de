"""What to run instead when a stage runs out of memory: the next, smaller setting for that stage.

Each stage has a ladder of settings that need less memory and give the same result (fp32: within
the tolerances of ``docs/autoencoding.md``; precision is never changed mid-run):

* ``denoise``: CFG batched -> sequential; naive attention -> SDPA; offload none -> model -> block
  (on an accelerator; on the CPU weights live in the same memory wherever they are); SDPA ->
  query-chunked SDPA (1024 tokens).
* ``vae_encode`` / ``vae_decode``: batched -> half the frames per call -> ... -> per-frame ->
  per-frame with 256-, then 128-pixel tiles.
* ``text_encode`` / ``image_encode``: offload none -> model (accelerator only).

A run re-plans at most :data:`MAX_REPLANS` times; every re-plan is an :class:`Adjustment` the
caller gets back. With the plan's predictions (:func:`choose_rung` is given a predictor) one re-plan
may skip rungs: it takes the first rung whose predicted peak, raised by what the failed stage was
measured to need beyond its prediction, fits the memory available now.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from ..errors import EngineError
from ..device.spec import format_bytes
from ..plan.aemode import AEMode
from ..plan.settings import Attention, CFGMode, Offload, Settings
from ..plan.stages import stage as stage_of

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
        key = stage_of(stage).ae_setting
        mode = smaller_mode(getattr(s, key), frames)
        return None if mode is None else replace(s, **{key: mode})
    if accelerator and s.offload is Offload.NONE:
        return replace(s, offload=Offload.MODEL)
    return None


def ladder(stage: str, s: Settings, *, accelerator: bool, frames: int) -> Iterator[Settings]:
    """Every rung below ``s`` for ``stage``, largest first (each one includes the rungs above it)."""
    while (s := next_settings(stage, s, accelerator=accelerator, frames=frames)) is not None:
        yield s


Predictor = Callable[[str, Settings], int]  # (stage, settings) -> the plan's predicted peak bytes


def choose_rung(stage: str, s: Settings, *, accelerator: bool, frames: int, available: int,
                need: int = 0, predict: Predictor | None = None) -> tuple[Settings | None, str]:
    """The settings to continue ``stage`` with, and why (empty without predictions).

    Without ``predict``: one rung down. With it: the first rung whose predicted peak, scaled by
    ``need / predicted`` for the current settings when the stage was measured to need more than
    predicted (the measurement is a floor, never a discount), fits ``available``; the smallest
    rung when none is predicted to fit. None when nothing is left below ``s``.
    """
    rungs = list(ladder(stage, s, accelerator=accelerator, frames=frames))
    if not rungs or predict is None:
        return (rungs[0] if rungs else None), ""
    predicted = predict(stage, s)
    scale = max(1.0, need / predicted) if predicted > 0 else 1.0
    measured = (f"; it was measured needing {format_bytes(need)}, {scale:.2f}x the predicted "
                f"{format_bytes(predicted)}, so every prediction is scaled by that" if scale > 1 else "")
    for rung in rungs:
        if (after := int(predict(stage, rung) * scale)) <= available:
            return rung, (f"{measured}; the new settings are predicted at {format_bytes(after)} "
                          f"within the {format_bytes(available)} available")
    return rungs[-1], f"{measured}; no setting is predicted to fit {format_bytes(available)}: the smallest"
