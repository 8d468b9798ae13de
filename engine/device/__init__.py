"""The devices we plan for and run on: :class:`DeviceSpec` (torch-free, ``spec``), and probing this
machine (``probe``: nvidia-ml-py, torch, psutil, short micro-benchmarks). Imported lazily, so the
planner can read a ``DeviceSpec`` without importing torch."""
import importlib

_EXPORTS = {"probe_device": "probe", "probe_cpu": "probe", "probe_for": "probe", "capped": "probe", "host_memory": "probe",
            "DeviceSpec": "spec", "catalog_device": "spec", "vram_device": "spec"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
