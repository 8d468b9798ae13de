"""Real memory measurements that the tracer's estimates are checked against.

On CPU there are no allocator statistics, so the peak is rebuilt from the profiler's memory
events: every allocation and free the PyTorch CPU allocator makes is an event with a signed size;
their running sum, in time order, is the bytes allocated since the call began. Its maximum is the
peak of NEW allocations, excluding weights and inputs that existed before, which is what
:attr:`engine.estimate.tracing.trace.TraceResult.peak_new_bytes` estimates.
"""
from __future__ import annotations

import gc
import logging
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

logger = logging.getLogger(__name__)

__all__ = ["measure_cpu_peak_bytes", "measure_cuda_peak_bytes"]


def _memory_events(prof: profile) -> list[tuple[int, int]]:
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        raise RuntimeError("the profiler kept no kineto results; run with a torch build that has "
                           "kineto (the default wheels do) to measure CPU memory.")
    events = [(e.start_ns(), e.nbytes()) for e in results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e[0])
    return events


def measure_cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Run ``fn()`` for real on CPU and return the peak of bytes it allocated on top of the start.

    Pre-existing weights and inputs are excluded; the return value of ``fn`` is counted while it
    lives (it is dropped after profiling). Garbage is collected first so that frees of earlier
    garbage do not hide allocations.

    Args:
        fn: a zero-argument callable, e.g. ``lambda: model(x)``.
    """
    if not callable(fn):
        raise TypeError(f"`fn` must be a zero-argument callable, got {type(fn).__name__}; wrap "
                        "the call in a lambda.")
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                 record_shapes=False) as prof:
        out = fn()
    del out
    current = peak = 0
    for _, nbytes in _memory_events(prof):
        current += nbytes
        peak = max(peak, current)
    logger.debug("measured CPU peak of new allocations: %d bytes", peak)
    return peak


def measure_cuda_peak_bytes(fn: Callable[[], Any], device: str | torch.device = "cuda") -> int:
    """Run ``fn()`` on a CUDA device; return ``active_bytes.all.peak`` minus the active bytes at start.

    Args:
        fn: a zero-argument callable; it should already have run once (cuBLAS warm-up).
        device: the CUDA device to read statistics from.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("`measure_cuda_peak_bytes` needs a CUDA device; use "
                           "`measure_cpu_peak_bytes` on CPU.")
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_stats(device)["active_bytes.all.current"]
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.memory_stats(device)["active_bytes.all.peak"]
    del out
    return peak - start
