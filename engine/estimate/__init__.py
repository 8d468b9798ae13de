"""Estimation: trace a call on fake tensors, fit scaling laws, cache the fits.

Sub-packages by what they estimate: ``tracing`` (one call at one shape), ``laws`` (laws over
shapes and the fit cache), ``vae`` (the VAE under every autoencoding mode), ``unet`` (the UNet
step and its text/image encoders), ``timing`` (VAE seconds per mode, measured on the device).

The estimator reads modules without running them on real data: :func:`trace_call` gives the
peak live bytes by kind, FLOPs and bytes moved of one call at one shape; :func:`fit_scaling_law`
turns a few traces into a formula the planner evaluates in microseconds for any resolution,
frame count, chunk or tile size; :class:`FitCache` keeps the fits on disk keyed by
:func:`architecture_hash`.
"""
from __future__ import annotations

from .laws.cache import FitCache, architecture_hash, default_cache_dir
from .laws.scaling import ScalingLaw, fit_scaling_law
from .tracing.allocator import allocation_bytes, segment_overhead_bytes
from .tracing.measure import measure_cpu_peak_bytes, measure_cuda_peak_bytes
from .tracing.trace import MemKind, TraceResult, Tracer, trace_call

__all__ = [
    "FitCache",
    "MemKind",
    "ScalingLaw",
    "TraceResult",
    "Tracer",
    "allocation_bytes",
    "architecture_hash",
    "default_cache_dir",
    "fit_scaling_law",
    "measure_cpu_peak_bytes",
    "measure_cuda_peak_bytes",
    "segment_overhead_bytes",
    "trace_call",
]
