"""``probe_device()``: what this machine offers, as a :class:`DeviceSpec` plus host facts.

Measurements (matmul FLOP/s, host->device bytes/s) take a second or two and are cached per device
in the engine cache directory, so later runs read them back.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

import psutil
import torch

from .host import cpu_name
from .spec import DeviceSpec

log = logging.getLogger(__name__)


def host_memory() -> dict:
    vm = psutil.virtual_memory()
    return {"total_bytes": int(vm.total), "available_bytes": int(vm.available)}


def _nvml_facts(index: int) -> dict | None:
    """Name, total and free memory from NVML; None when there is no NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        return {"name": name.decode() if isinstance(name, bytes) else name,
                "total_bytes": int(mem.total), "free_bytes": int(mem.free),
                "driver": str(pynvml.nvmlSystemGetDriverVersion())}
    except Exception as exc:  # no library, no driver, no device: all mean "no NVIDIA GPU here"
        log.info("NVML unavailable: %s", exc)
        return None


def measure_matmul_flops(device: str, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Dense matmul throughput in FLOP/s (best of ``repeats`` after a warm-up)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def measure_link_bandwidth(device: str, mib: int = 256) -> float:
    """Pinned host -> device copy bandwidth in bytes/s."""
    host = torch.empty(mib * 2 ** 20, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device=device)
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * host.numel() / (time.perf_counter() - t0)


def measure_context_bytes(index: int, used_before: int) -> int:
    """Device memory this process holds beyond the caching allocator's reservation after CUDA,
    cuBLAS and a first kernel are initialised: the CUDA context term of the planner."""
    import pynvml

    a = torch.ones(256, 256, device=f"cuda:{index}")
    (a @ a).sum().item()
    torch.cuda.synchronize(index)
    used_after = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used
    return max(0, int(used_after - used_before - torch.cuda.memory_reserved(index)))


def _cached_measurements(key: str, measure) -> dict:
    """Measurements of this device, taken once and kept in the engine's cache directory."""
    from ..estimate.laws.cache import FitCache

    cache = FitCache()
    fit = cache.get_fit(f"device-{key}")
    values = fit.sections.get("measurements") if fit is not None else None
    if values is None:
        values = measure()
        cache.put_fit(f"device-{key}", measurements=values)
    return values


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def probe_device(index: int = 0, measure: bool = True) -> DeviceSpec:
    """The GPU at ``index`` when an NVIDIA driver and CUDA are present, otherwise the CPU."""
    nvml = _nvml_facts(index)
    if nvml is not None and torch.cuda.is_available():
        return _probe_cuda(index, nvml, measure)
    return probe_cpu(measure)


def probe_for(device: str | torch.device, argument: str = "device", max_memory: int | None = None) -> DeviceSpec:
    """The probed spec of the device a run will use (``cpu``, ``cuda`` or ``cuda:N``), capped at
    ``max_memory`` bytes when given (the cap is then the device: its total and free memory); a CUDA
    device this machine does not have is refused in one sentence naming ``argument``."""
    device = torch.device(device)
    spec = probe_device(device.index or 0) if device.type == "cuda" else probe_cpu()
    if device.type == "cuda" and spec.kind != "cuda":
        raise ValueError(f"`{argument}` {str(device)!r} is not available here (no CUDA device found); "
                         "use cpu.")
    return capped(spec, max_memory)


def capped(spec: DeviceSpec, max_memory: int | None) -> DeviceSpec:
    """``spec`` as a run limited to ``max_memory`` bytes sees it (None: unchanged)."""
    if max_memory is None:
        return spec
    free = max_memory if spec.free_bytes is None else min(spec.free_bytes, max_memory)
    return replace(spec, total_bytes=min(spec.total_bytes, max_memory), free_bytes=free)


def _probe_cuda(index: int, nvml: dict, measure: bool) -> DeviceSpec:
    dev = f"cuda:{index}"
    props = torch.cuda.get_device_properties(index)
    from ..runtime.attention import xformers_kernels_work

    spec = DeviceSpec(name=nvml["name"], kind="cuda", total_bytes=nvml["total_bytes"],
                      free_bytes=nvml["free_bytes"], bf16=torch.cuda.is_bf16_supported(),
                      compute_capability=f"{props.major}.{props.minor}", source="probe",
                      xformers=xformers_kernels_work(dev))
    if measure:
        used_before = nvml["total_bytes"] - nvml["free_bytes"]  # read before this process's context
        m = _cached_measurements(_slug(f"{nvml['name']}-{nvml['driver']}"), lambda: {
            "context_bytes": measure_context_bytes(index, used_before),
            "fp16_flops": measure_matmul_flops(dev, torch.float16, 4096),
            "fp32_flops": measure_matmul_flops(dev, torch.float32, 4096),
            "link_bandwidth": measure_link_bandwidth(dev)})
        spec = replace(spec, **m)
    return spec


def probe_cpu(measure: bool = True) -> DeviceSpec:
    """The host CPU as a device: RAM (available) and its measured fp32 matmul rate."""
    mem = host_memory()
    spec = DeviceSpec(name=cpu_name(), kind="cpu", total_bytes=mem["total_bytes"],
                      free_bytes=mem["available_bytes"], bf16=False, source="probe")
    if measure:
        key = _slug(f"cpu-{spec.name}-{os.cpu_count()}-{torch.__version__}")
        m = _cached_measurements(key, lambda: {"fp32_flops": measure_matmul_flops("cpu", torch.float32, 1024)})
        spec = replace(spec, **m)
    return spec
