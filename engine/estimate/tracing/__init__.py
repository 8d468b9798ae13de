"""Fake-tensor tracing: peak live bytes by kind, FLOPs and bytes moved of one call at one shape.

``trace`` (the tracer), ``fake`` (meta modules to fake tensors), ``kernels`` (what real kernels
allocate that fakes do not show), ``allocator`` (segment rounding), ``measure`` (the real peaks the
tracer is checked against), ``log`` (the per-allocation trace log the UNet and encoder laws read).
"""
from __future__ import annotations

from .allocator import allocation_bytes, segment_overhead_bytes
from .measure import measure_cpu_peak_bytes, measure_cuda_peak_bytes
from .trace import MemKind, TraceResult, Tracer, trace_call

__all__ = ["MemKind", "TraceResult", "Tracer", "allocation_bytes", "measure_cpu_peak_bytes",
           "measure_cuda_peak_bytes", "segment_overhead_bytes", "trace_call"]
