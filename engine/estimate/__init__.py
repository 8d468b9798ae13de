"""Estimation: trace a call on fake tensors, fit scaling laws, cache the fits.

Sub-packages by what they estimate: ``tracing`` (one call at one shape), ``laws`` (laws over
shapes and the fit cache), ``vae`` (the VAE under every autoencoding mode), ``unet`` (the UNet
step and its text/image encoders), ``timing`` (VAE seconds per mode, measured on the device).

The estimator reads modules without running them on real data: :func:`trace_call` gives the
peak live bytes by kind, FLOPs and bytes moved of one call at one shape; :func:`fit_scaling_law`
turns a few traces into a formula the planner evaluates in microseconds for any resolution,
frame count, chunk or tile size; :class:`FitCache` keeps the fits on disk keyed by
:func:`architecture_hash`.

Imported lazily: the planner reads cached laws through :mod:`engine.estimate.laws` (and the
torch-free parts of ``unet`` and ``vae``) without importing torch or the tracer.
"""
import importlib

_EXPORTS = {
    "FitCache": "laws.cache", "architecture_hash": "laws.cache", "default_cache_dir": "laws.cache",
    "ScalingLaw": "laws.scaling", "fit_scaling_law": "laws.scaling",
    "allocation_bytes": "tracing.allocator", "segment_overhead_bytes": "tracing.allocator",
    "measure_cpu_peak_bytes": "tracing.measure", "measure_cuda_peak_bytes": "tracing.measure",
    "MemKind": "tracing.trace", "TraceResult": "tracing.trace", "Tracer": "tracing.trace",
    "trace_call": "tracing.trace",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
