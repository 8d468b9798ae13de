"""Choose how to run VAE encode or decode: the fastest predicted mode whose memory fits.

Pure Python over numbers: the memory model (``VAEMemoryModel`` from
:mod:`engine.estimate.vae`) and the time model (``AETimeModel`` from
:mod:`engine.estimate.timing`) are passed in and only their ``predict`` methods are called, so
the planner runs without a GPU and is tested with synthetic models.

Search space: frame chunks ``k`` in {all frames (batched), then halvings ``ceil(n / 2^i)`` down
to 1 (per-frame)} crossed with {no tile, square pixel tiles (768, 512, 384, 256, 192, 128) and
tiles of the frame's aspect ratio with the same areas, each only if smaller than the frame}.
A candidate fits when ``resident_bytes`` plus the memory model's reserved bytes (VAE weights,
input, activations, kernel workspace, allocator slack) is at most ``budget_bytes``. Among those
that fit, the minimum predicted time wins; candidates within 1 % of it count as tied, and ties
go to fewer, larger calls (larger ``k``, then no tile, then the larger tile), whose outputs are
exact (chunks) or closer to exact (larger tiles).

Example:
    >>> choice = plan_autoencoding("decode", 16, 320, 512, budget_bytes=6 << 30,
    ...                            resident_bytes=2 << 30, memory_model=mem, time_model=tm)
    >>> str(choice.mode), choice.time_s
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from ..plan.aemode import AEMode
from ..device.spec import format_bytes

logger = logging.getLogger(__name__)

__all__ = ["AEChoice", "DEFAULT_TILES", "InfeasibleBudget", "MemoryModel", "TIE_TOLERANCE",
           "TimeModel", "candidate_modes", "describe_mode", "force_mode", "plan_autoencoding"]

DEFAULT_TILES = (768, 512, 384, 256, 192, 128)
# Predicted times closer than this are within the time model's own error: prefer fewer calls.
TIE_TOLERANCE = 0.01
_DIRECTIONS = ("encode", "decode")


class StageMemory(Protocol):
    """What the planner reads from a memory prediction (``VAEStageMemory`` satisfies it)."""

    @property
    def allocated_bytes(self) -> int: ...

    @property
    def allocator_bytes(self) -> int: ...

    @property
    def activation_bytes(self) -> int: ...


class MemoryModel(Protocol):
    """Predicted memory of one encode/decode run (``VAEMemoryModel`` satisfies it)."""

    def predict(self, direction: str, frames: int, height: int, width: int,
                mode: Any) -> StageMemory: ...


class TimeModel(Protocol):
    """Predicted seconds of one encode/decode run (``AETimeModel`` satisfies it)."""

    def predict(self, direction: str, frames: int, height: int, width: int,
                mode: Any) -> float: ...


class InfeasibleBudget(ValueError):
    """No autoencoding mode fits the budget; ``need_bytes`` is the smallest predicted peak."""

    def __init__(self, message: str, *, need_bytes: int, budget_bytes: int, mode: str) -> None:
        super().__init__(message)
        self.need_bytes, self.budget_bytes, self.mode = need_bytes, budget_bytes, mode


@dataclasses.dataclass(frozen=True)
class AEChoice:
    """One autoencoding mode with its predicted memory and time (the planner's answer).

    Attributes:
        direction: ``"encode"`` or ``"decode"``.
        mode: the chosen (or forced) :class:`AEMode`.
        frames, height, width: the run it was planned for (pixels).
        peak_bytes: predicted device peak: ``resident_bytes`` + ``allocated_bytes`` +
            ``allocator_bytes``.
        allocated_bytes: the VAE stage's tensor bytes at its peak (weights, input,
            activations, workspace), as the memory model predicts them.
        allocator_bytes: allocator slack on top (CUDA segment rounding; 0 on CPU).
        activation_bytes: the activation part of ``allocated_bytes``.
        time_s: predicted seconds.
        budget_bytes, resident_bytes: what the choice was checked against.
        fits: ``peak_bytes <= budget_bytes``.
        forced: the mode was forced by the user, not chosen.
        calls: predicted number of VAE calls, when the time model reports it (else 0).
        overhead_s: the part of ``time_s`` the time model puts down to its calls' fixed cost
            (``calls * per_call_s``), when it reports it (else 0).
        flops: predicted FLOPs, when the memory model has a ``flops`` method (else 0).
        rejected: ``(mode string, reason)`` for every other candidate: over budget (predicted
            bytes vs budget) or slower (predicted seconds vs the choice).
    """

    direction: str
    mode: AEMode
    frames: int
    height: int
    width: int
    peak_bytes: int
    allocated_bytes: int
    allocator_bytes: int
    activation_bytes: int
    time_s: float
    budget_bytes: int
    resident_bytes: int
    fits: bool
    forced: bool = False
    calls: int = 0
    flops: float = 0.0
    rejected: tuple[tuple[str, str], ...] = ()
    overhead_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the mode as its string form)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["mode"] = str(self.mode)
        out["rejected"] = [list(r) for r in self.rejected]
        return out


# ---------------------------------------------------------------- formatting
def describe_mode(mode: AEMode) -> str:
    """Words for a mode: ``batched``, ``per-frame``, ``in chunks of 4 frames``, plus tiles."""
    words = ("batched" if mode.chunk is None else "per-frame" if mode.chunk == 1
             else f"in chunks of {mode.chunk} frames")
    if mode.tile is not None:
        words += f" with {mode.tile[0]}x{mode.tile[1]} tiles"
    return words


# ---------------------------------------------------------------- candidates
def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def candidate_modes(frames: int, height: int, width: int, *, downsample: int = 8,
                    tiles: Sequence[int] = DEFAULT_TILES) -> list[AEMode]:
    """Every chunk x tile combination the planner considers for one run.

    Args:
        frames: frames in the run.
        height, width: frame size in pixels.
        downsample: the VAE's spatial factor (tiles are multiples of it).
        tiles: square tile sizes in pixels; tiles of the frame's aspect ratio with the same
            areas are added; only tiles smaller than the frame on some axis are kept.

    Returns:
        Modes ordered from fewest calls (batched, untiled) to most.
    """
    chunks: list[int | None] = [None]
    for i in range(1, max(1, frames).bit_length() + 1):
        k = math.ceil(frames / 2 ** i)
        if k < frames and k not in chunks:
            chunks.append(k)
        if k == 1:
            break
    shapes: list[tuple[int, int] | None] = [None]
    ratio = math.sqrt(height / width)
    for size in sorted(set(tiles), reverse=True):
        for shape in ((size, size), (_round_to(size * ratio, downsample),
                                     _round_to(size / ratio, downsample))):
            if shape[0] % downsample or shape[1] % downsample:
                continue  # the runtime rejects tiles off the latent grid
            if (shape[0] < height or shape[1] < width) and shape not in shapes:
                shapes.append(shape)
    return [AEMode(chunk=k, tile=t) for k in chunks for t in shapes]


# ---------------------------------------------------------------- evaluation
def _evaluate(direction: str, frames: int, height: int, width: int, mode: AEMode, *,
              budget_bytes: int, resident_bytes: int, memory_model: MemoryModel,
              time_model: TimeModel, forced: bool = False) -> AEChoice:
    mem = memory_model.predict(direction, frames, height, width, mode)
    allocator = int(getattr(mem, "allocator_bytes", 0) or 0)
    peak = int(resident_bytes) + int(mem.allocated_bytes) + allocator
    calls, overhead = 0, 0.0
    breakdown = getattr(time_model, "breakdown", None)
    if callable(breakdown):  # AETimeModel: one call gives the time, the call count and their fixed cost
        parts = breakdown(direction, frames, height, width, mode)
        seconds, calls = float(parts["total"]), int(parts.get("calls", 0))
        overhead = float(parts.get("overhead", 0.0))
    else:
        seconds = float(time_model.predict(direction, frames, height, width, mode))
    flops_of = getattr(memory_model, "flops", None)
    flops = float(flops_of(direction, frames, height, width, mode)) if callable(flops_of) else 0.0
    return AEChoice(direction, mode, frames, height, width, peak, int(mem.allocated_bytes),
                    allocator, int(getattr(mem, "activation_bytes", 0) or 0), seconds,
                    int(budget_bytes), int(resident_bytes), peak <= budget_bytes, forced, calls,
                    flops, overhead_s=overhead)


def _preference(choice: AEChoice) -> tuple[int, float]:
    """Larger is preferred among ties: frames per call, then untiled, then tile area."""
    k = choice.mode.frames_per_call(choice.frames)
    tile = math.inf if choice.mode.tile is None else choice.mode.tile[0] * choice.mode.tile[1]
    return k, tile


def _check_run(direction: str, frames: int, height: int, width: int, downsample: int,
               budget_bytes: int) -> None:
    if direction not in _DIRECTIONS:
        raise ValueError(f"`direction` must be 'encode' or 'decode' (got {direction!r}).")
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"`frames` must be a positive int (got {frames!r}); pass the number of "
                         "frames to encode or decode.")
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < downsample or value % downsample:
            raise ValueError(f"`{name}` must be a positive multiple of the VAE downsample factor "
                             f"{downsample} (got {value!r}); round it to a multiple of "
                             f"{downsample}.")
    if budget_bytes < 0:
        raise ValueError(f"`budget_bytes` must be >= 0 (got {budget_bytes}); pass the device "
                         "memory left for this stage.")


def _parse_candidates(candidates: Iterable[AEMode | str], downsample: int) -> list[AEMode]:
    modes = []
    for item in candidates:
        mode = AEMode.parse(item, "candidates")
        if mode.tile is not None and (mode.tile[0] % downsample or mode.tile[1] % downsample
                                      or (mode.overlap or 0) % downsample):
            raise ValueError(f"`candidates` entry {str(mode)!r} has a tile or overlap off the "
                             f"latent grid; use multiples of {downsample} pixels.")
        if mode not in modes:
            modes.append(mode)
    if not modes:
        raise ValueError("`candidates` is empty; pass at least one mode or None for the "
                         "default search.")
    return modes


# ---------------------------------------------------------------- public verbs
def plan_autoencoding(direction: str, frames: int, height: int, width: int, *,
                      budget_bytes: int, resident_bytes: int, memory_model: MemoryModel,
                      time_model: TimeModel, downsample: int = 8,
                      candidates: Iterable[AEMode | str] | None = None,
                      argument: str = "--vram") -> AEChoice:
    """The fastest predicted autoencoding mode whose predicted peak fits ``budget_bytes``.

    Args:
        direction: ``"encode"`` or ``"decode"``.
        frames: frames in the run (batch and time folded together).
        height, width: frame size in pixels, multiples of ``downsample``.
        budget_bytes: device memory the stage may use in total (resident bytes included).
        resident_bytes: bytes already on the device during the stage that the memory model does
            NOT count (other models' weights, carried latents); the VAE's own weights and its
            input are counted by the memory model.
        memory_model: e.g. ``VAEMemoryModel.for_vae(vae, device_type="cuda", dtype=...)``.
        time_model: e.g. ``AETimeModel.calibrate(vae)`` or ``AETimeModel.from_flops(...)``.
        downsample: the VAE's spatial factor.
        candidates: modes (or strings) to choose from instead of :func:`candidate_modes`.
        argument: the user-facing name of the budget, quoted in the error message.

    Returns:
        An :class:`AEChoice` with ``fits=True``; ``rejected`` explains every other candidate.

    Raises:
        InfeasibleBudget: no candidate fits; the one-sentence message names the smallest
            predicted peak and the mode that reaches it.

    Example:
        >>> choice = plan_autoencoding("decode", 16, 320, 512, budget_bytes=4 << 30,
        ...                            resident_bytes=0, memory_model=mem, time_model=tm)
        >>> choice.as_dict()["mode"]
        'chunk:4'
    """
    _check_run(direction, frames, height, width, downsample, budget_bytes)
    modes = (candidate_modes(frames, height, width, downsample=downsample)
             if candidates is None else _parse_candidates(candidates, downsample))
    scored = [_evaluate(direction, frames, height, width, mode, budget_bytes=budget_bytes,
                        resident_bytes=resident_bytes, memory_model=memory_model,
                        time_model=time_model) for mode in modes]
    feasible = [c for c in scored if c.fits]
    if not feasible:
        raise _infeasible(scored, direction, budget_bytes, resident_bytes, argument)
    fastest = min(c.time_s for c in feasible)
    tied = [c for c in feasible if c.time_s <= fastest * (1.0 + TIE_TOLERANCE)]
    best = max(tied, key=_preference)
    rejected = tuple((str(c.mode), _reason(c, best)) for c in scored if c is not best)
    logger.debug("AE %s %dx%dx%d: %s, predicted %.3f s, peak %s of %s (%d candidates)",
                 direction, frames, height, width, best.mode, best.time_s,
                 format_bytes(best.peak_bytes), format_bytes(budget_bytes), len(scored))
    return dataclasses.replace(best, rejected=rejected)


def _reason(candidate: AEChoice, best: AEChoice) -> str:
    peak, budget = candidate.peak_bytes, candidate.budget_bytes
    if not candidate.fits:
        return (f"predicted peak {format_bytes(peak, budget)} > budget "
                f"{format_bytes(budget, peak)}")
    fits = f"fits ({format_bytes(peak)} <= {format_bytes(budget)})"
    if candidate.time_s <= best.time_s * (1.0 + TIE_TOLERANCE) + 1e-12:
        return (f"{fits}, predicted {candidate.time_s:.4g} s ties {best.time_s:.4g} s within "
                f"{TIE_TOLERANCE:.0%}; fewer, larger calls preferred")
    return f"{fits} but predicted {candidate.time_s:.4g} s > {best.time_s:.4g} s"


def _infeasible(scored: list[AEChoice], direction: str, budget_bytes: int, resident_bytes: int,
                argument: str) -> InfeasibleBudget:
    least = min(scored, key=lambda c: (c.peak_bytes, c.time_s))
    need = format_bytes(least.peak_bytes, budget_bytes)
    held = (f" ({format_bytes(resident_bytes)} of it already resident)"
            if resident_bytes > 0 else "")
    message = (f"`{argument}` {format_bytes(budget_bytes, least.peak_bytes)} is below the {need}"
               f"{held} that VAE {direction} needs even {describe_mode(least.mode)}; use a "
               "larger budget, a smaller resolution or fewer frames.")
    return InfeasibleBudget(message, need_bytes=least.peak_bytes, budget_bytes=budget_bytes,
                            mode=str(least.mode))


def force_mode(direction: str, frames: int, height: int, width: int, mode: AEMode | str, *,
               budget_bytes: int, resident_bytes: int, memory_model: MemoryModel,
               time_model: TimeModel, downsample: int = 8,
               argument: str | None = None) -> AEChoice:
    """Predict a user-forced mode (e.g. ``--force ae_decode=chunk:4``) without choosing.

    Unlike :func:`plan_autoencoding` nothing is raised when it does not fit: the returned
    :class:`AEChoice` has ``forced=True`` and ``fits`` says whether the predicted peak is within
    ``budget_bytes`` (the caller decides whether to run it anyway).

    Args:
        direction, frames, height, width, budget_bytes, resident_bytes, memory_model,
            time_model, downsample: as in :func:`plan_autoencoding`.
        mode: the forced :class:`AEMode` or its string.
        argument: name of the user-facing setting for error messages (default
            ``ae_decode``/``ae_encode``).

    Example:
        >>> force_mode("decode", 16, 320, 512, "batched", budget_bytes=4 << 30,
        ...            resident_bytes=0, memory_model=mem, time_model=tm).fits
        False
    """
    argument = argument or f"ae_{direction}"
    _check_run(direction, frames, height, width, downsample, budget_bytes)
    parsed = AEMode.parse(mode, argument)
    if parsed.tile is not None and (parsed.tile[0] % downsample or parsed.tile[1] % downsample
                                    or (parsed.overlap or 0) % downsample):
        raise ValueError(f"`{argument}` {str(parsed)!r} has a tile or overlap that is not a "
                         f"multiple of the VAE downsample factor {downsample}; round it to a "
                         f"multiple of {downsample} pixels.")
    choice = _evaluate(direction, frames, height, width, parsed, budget_bytes=budget_bytes,
                       resident_bytes=resident_bytes, memory_model=memory_model,
                       time_model=time_model, forced=True)
    if not choice.fits:
        logger.info("forced %s=%s is predicted to need %s, over the %s budget", argument,
                       parsed, format_bytes(choice.peak_bytes), format_bytes(budget_bytes))
    return choice
