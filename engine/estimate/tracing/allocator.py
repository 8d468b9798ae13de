"""A paper model of the CUDA caching allocator's rounding, kept apart from tensor-level bytes.

Tensor-level accounting (what ``torch.cuda.memory_stats()["active_bytes.all.peak"]`` measures)
rounds each allocation up to the allocator's 512-byte minimum block. Reserved memory adds segment
effects on top: small blocks (<= 1 MiB) are carved out of 2 MiB segments and large blocks are
rounded up to 2 MiB. Those segment effects are reported as a separate term so that the planner can
add or drop them knowingly instead of finding them baked into the peak.

Constants follow ``c10/cuda/CUDACachingAllocator.cpp`` (kMinBlockSize, kSmallSize, kSmallBuffer,
kRoundLarge).
"""
from __future__ import annotations

from typing import Iterable

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_SEGMENT = 2 << 20
LARGE_ROUND = 2 << 20

__all__ = ["MIN_BLOCK", "allocation_bytes", "segment_overhead_bytes"]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def allocation_bytes(nbytes: int, device_type: str) -> int:
    """Bytes one storage of ``nbytes`` occupies at tensor level on ``device_type``.

    Args:
        nbytes: the storage size in bytes.
        device_type: ``"cuda"`` applies the 512-byte block rounding; any other device counts
            bytes as they are (the CPU allocator does not round what it reports).
    """
    if device_type != "cuda":
        return nbytes
    # An empty CUDA tensor holds a null pointer: no block at all.
    return 0 if nbytes == 0 else _round_up(nbytes, MIN_BLOCK)


def segment_overhead_bytes(block_sizes: Iterable[int]) -> int:
    """Extra reserved bytes the segments holding ``block_sizes`` add on top of the blocks.

    This is a no-reuse approximation taken at one instant: small blocks are packed into 2 MiB
    segments, each large block gets its own segment rounded up to 2 MiB. It ignores cached free
    blocks and fragmentation from earlier frees, so real reserved memory can be higher.

    Args:
        block_sizes: 512-rounded block sizes (from :func:`allocation_bytes`) alive together.
    """
    small = 0
    overhead = 0
    for size in block_sizes:
        if size <= SMALL_SIZE:
            small += size
        else:
            overhead += _round_up(size, LARGE_ROUND) - size
    if small:
        overhead += _round_up(small, SMALL_SEGMENT) - small
    return overhead
