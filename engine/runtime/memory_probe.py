"""Peak allocator bytes of one call, on CPU (profiler memory records) or CUDA (allocator stats).

How the CPU figure is measured: ``torch.profiler`` with ``profile_memory=True`` receives a
record for every allocation and free made by PyTorch's CPU allocator (c10), including op
temporaries that never become Python tensors. We sort those records by time, take the running
sum of their signed sizes and report its maximum, i.e. the peak of bytes allocated DURING the
call above what was allocated before it (tensors freed during the call count negatively, so
the peak can be smaller than the bytes the call allocated).

Known limitations: memory obtained outside the c10 allocator (oneDNN scratchpads that use
their own malloc, Python objects, the profiler itself) is not counted; records from worker
threads are included when the profiler sees them. The profiler adds about a second of start-up
on first use and per-op overhead, so use it on small workloads (tests, calibration runs).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

__all__ = ["peak_cpu_allocated_bytes", "peak_cuda_allocated_bytes"]

_MEMORY_EVENT = "[memory]"


def peak_cpu_allocated_bytes(fn: Callable, *args, **kwargs) -> int:
    """Peak CPU-allocator bytes allocated by ``fn(*args, **kwargs)`` above the starting level.

    Args:
        fn: the call to measure; its result is discarded after the measurement (it still
            counts while ``fn`` runs).
        *args, **kwargs: passed to ``fn``.

    Returns:
        The peak in bytes (>= 0).

    Example:
        >>> peak_cpu_allocated_bytes(lambda: torch.empty(1024, 1024))
        4194304
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args, **kwargs)
        del result
    records = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
               if e.name() == _MEMORY_EVENT and e.device_type() == DeviceType.CPU]
    records.sort(key=lambda r: r[0])
    level = peak = 0
    for _, nbytes in records:
        level += nbytes
        peak = max(peak, level)
    return peak


def peak_cuda_allocated_bytes(fn: Callable, *args, device: torch.device | int | None = None,
                              **kwargs) -> int:
    """Peak CUDA-allocator bytes allocated by ``fn(*args, **kwargs)`` above the starting level.

    Args:
        fn: the call to measure (synchronised before the stats are read).
        *args, **kwargs: passed to ``fn``.
        device: CUDA device to read (default: the current one).
    """
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn(*args, **kwargs)
    torch.cuda.synchronize(device)
    del result
    return max(0, torch.cuda.max_memory_allocated(device) - start)
