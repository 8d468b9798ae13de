"""Per-stage memory and time for one candidate :class:`Settings` (pure Python over estimates).

Memory of a stage, as the driver would show it::

    peak_bytes = cuda_context + reserved
    reserved   = allocated + allocator rounding                       (cache emptied before the stage)
               = that + blocks earlier stages freed but kept cached  (cache kept)
    allocated  = resident weights + carried tensors + the stage's activation peak

Time of a stage: a roofline over the stage's FLOPs and bytes (device throughput and memory
bandwidth), plus host<->device weight transfers for offloaded components.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..plan.settings import Offload
from ..plan.stages import stage as stage_of

@dataclass(frozen=True)
class DeviceTerms:
    """Device overheads kept as separate, named terms (never folded into the estimates)."""

    cuda_context_bytes: int
    context_measured: bool


def resident_bytes(stage: str, weights: dict[str, int], offload: Offload, block_resident: int) -> int:
    """Weight bytes on the device while ``stage`` runs (its components from the stage table)."""
    if offload is Offload.NONE:
        return sum(weights.values())
    if offload is Offload.BLOCK and stage == "denoise":
        return block_resident
    return sum(weights[c] for c in stage_of(stage).components)


def transfer_bytes(stage: str, weights: dict[str, int], offload: Offload, unet_calls: int) -> int:
    """Host->device weight bytes a stage moves (model-level: once; block-level: every UNet call)."""
    if offload is Offload.NONE:
        return 0
    moved = sum(weights[c] for c in stage_of(stage).components)
    return moved * unet_calls if (offload is Offload.BLOCK and stage == "denoise") else moved


def roofline_seconds(flops: float, bytes_moved: float, flops_rate: float | None,
                     bandwidth: float | None) -> float:
    compute = flops / flops_rate if flops_rate else 0.0
    memory = bytes_moved / bandwidth if bandwidth else 0.0
    return max(compute, memory)


def reserved_after(allocated: int, previous_reserved: int, previous_live: int, empty_cache: bool) -> int:
    """The caching allocator's reserved memory at this stage's peak.

    ``allocated`` already includes the allocator's segment rounding (the estimators' named
    ``allocator`` term). Emptied before the stage: this stage's blocks alone. Kept: the blocks earlier stages
    freed stay reserved (``previous_reserved - previous_live``); this stage's activations have
    other shapes, so we assume none of them reuse those blocks: an upper bound on the growth a run
    shows when the cache is never released (e.g. a driver that spills instead of refusing).
    """
    if empty_cache:
        return allocated
    return max(0, previous_reserved - previous_live) + allocated
