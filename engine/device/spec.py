"""What the planner knows about a device: memory, throughput, link; from a probe, the catalogue
(``engine/configs/gpus.yaml``, package data) or a bare ``--vram`` size. Pure Python: nothing here
touches CUDA."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from importlib.resources import files
from typing import TYPE_CHECKING

from ..errors import InvalidArgument, WrongType

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

GIB = 2 ** 30
_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "m": 2 ** 20, "g": GIB, "t": 2 ** 40,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": GIB, "tib": 2 ** 40,
          "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12}


def parse_size(text: str | int | float, argument: str = "--vram") -> int:
    """'8GiB', '8G' (binary), '8GB' (decimal), '8192MiB', or a byte count -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidArgument(f"`{argument}` {text!r} is not a size; write it like 8GiB, 8G, 12GB or 6144MiB.")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float, other: float | None = None) -> str:
    """Bytes as GiB (MiB below 0.1 GiB); with ``other``, enough decimals that the two differ."""
    unit, name, start = (GIB, "GiB", 2) if abs(n) >= GIB / 10 else (2 ** 20, "MiB", 0)
    for digits in range(start, 7):
        text = f"{n / unit:.{digits}f} {name}"
        if other is None or text != f"{other / unit:.{digits}f} {name}":
            return text
    return f"{int(n)} bytes"


@dataclass(frozen=True)
class DeviceSpec:
    """A compute device as the planner sees it. ``source`` says where the numbers came from."""

    name: str
    kind: str                      # "cuda" or "cpu"
    total_bytes: int
    free_bytes: int | None = None  # measured free memory (probe only)
    bf16: bool = True
    compute_capability: str | None = None
    fp16_flops: float | None = None  # dense tensor throughput, FLOP/s
    fp32_flops: float | None = None
    mem_bandwidth: float | None = None   # bytes/s
    link_bandwidth: float | None = None  # host<->device bytes/s
    laptop: bool = False
    context_bytes: int | None = None  # CUDA context + library handles, measured by the probe
    xformers: bool = False         # xformers' kernels ran on this device (probe only)
    source: str = "catalog"        # "probe", "catalog", "vram", "cpu"
    slug: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def with_total(self, total_bytes: int, source: str) -> DeviceSpec:
        return replace(self, total_bytes=total_bytes, free_bytes=None, source=source)


def catalog_path() -> Traversable:
    """``gpus.yaml``, package data: found alike in a checkout, an editable or a wheel install."""
    return files("engine") / "configs" / "gpus.yaml"


@lru_cache(maxsize=1)
def load_catalog() -> dict[str, DeviceSpec]:
    """The catalogued cards by slug."""
    import yaml  # plain YAML, no interpolation: PyYAML imports in a quarter of omegaconf's time

    raw = yaml.safe_load(catalog_path().read_text(encoding="utf-8"))
    return {slug: DeviceSpec(
        name=e["name"], kind="cuda", total_bytes=int(e["memory_gib"] * GIB), bf16=bool(e["bf16"]),
        compute_capability=str(e["cc"]), fp16_flops=e["fp16_tflops"] * 1e12,
        mem_bandwidth=e["mem_gbps"] * 1e9, link_bandwidth=e["link_gbps"] * 1e9,
        laptop=bool(e.get("laptop", False)), source="catalog", slug=slug) for slug, e in raw.items()}


def catalog_device(slug: str, argument: str = "--gpu") -> DeviceSpec:
    """The catalogued card ``slug``; a typo is answered with the nearest slugs and names."""
    import difflib

    cat = load_catalog()
    if not isinstance(slug, str):
        raise WrongType(f"`{argument}` has type {type(slug).__name__}; pass a catalogue slug such as "
                        "'rtx-4090' (`engine gpus` lists them).")
    if slug in cat:
        return cat[slug]
    key = slug.strip().lower().replace(" ", "-").replace("_", "-").removeprefix("nvidia-").removeprefix("geforce-")
    if key in cat:
        return cat[key]
    names = {d.name.lower(): s for s, d in cat.items()}  # 'NVIDIA GeForce RTX 4090' finds rtx-4090 too
    near = [s for s in cat if key and s.startswith(key)]  # 'a100' -> both A100s
    near += difflib.get_close_matches(key, list(cat), n=3, cutoff=0.5)
    near += [names[n] for n in difflib.get_close_matches(slug.lower(), list(names), n=3, cutoff=0.6)]
    near = list(dict.fromkeys(near))[:3]
    hint = f" (nearest: {', '.join(near)})" if near else ""
    raise InvalidArgument(f"`{argument}` {slug!r} is not in the catalogue{hint}; run `engine gpus` to list "
                          "every slug, or pass `--vram SIZE` for any other card.")


def parse_device(device, argument: str = "device") -> str:
    """``'cpu'``, ``'cuda'``, ``'cuda:N'`` (or a ``torch.device`` of those) -> its canonical string.

    Torch-free, so a bad ``--device`` is answered before anything is planned or built; whether
    the CUDA device exists is checked where torch is imported anyway."""
    if hasattr(device, "type") and hasattr(device, "index") and not isinstance(device, str):
        device = device.type if device.index is None else f"{device.type}:{device.index}"
    if not isinstance(device, str):
        raise WrongType(f"`{argument}` has type {type(device).__name__}; pass 'cpu', 'cuda' or 'cuda:N' "
                        "(or a torch.device).")
    text = device.strip().lower()
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", text)
    if m and not (m.group(1) == "cpu" and m.group(2) not in (None, "0")):
        return "cpu" if m.group(1) == "cpu" else text
    kind = text.partition(":")[0]
    if kind in _TORCH_ONLY_KINDS:
        raise InvalidArgument(f"`{argument}` {device!r} is a device type this engine does not run on "
                              "(it plans and runs on CPUs and CUDA GPUs); use cpu, cuda or cuda:N.")
    raise InvalidArgument(f"`{argument}` {device!r} is not a device; use cpu, cuda or cuda:N (N: the "
                          "GPU's index, as nvidia-smi numbers them).")


# device types torch knows but the engine does not run on (told apart from typos in messages)
_TORCH_ONLY_KINDS = {"mps", "xpu", "xla", "hip", "ipu", "mkldnn", "opengl", "opencl", "ideep", "ve",
                     "fpga", "maia", "lazy", "vulkan", "meta", "hpu", "mtia", "privateuseone"}


def nearest_catalog_device(total_bytes: int) -> DeviceSpec:
    """The catalogued card whose memory is closest: lends its throughput to a ``--vram``-only plan."""
    return min(load_catalog().values(), key=lambda d: (abs(d.total_bytes - total_bytes), d.slug))


def vram_device(size: str | int, like: DeviceSpec | None = None) -> DeviceSpec:
    """A card known only by its memory size (throughput borrowed from ``like`` if given)."""
    total = parse_size(size)
    if total <= 0:
        raise ValueError(f"`--vram` {size!r} must be positive; write it like 8GiB.")
    if like is not None:
        return replace(like.with_total(total, "vram"), name=f"{format_bytes(total)} card (throughput of {like.slug})")
    return DeviceSpec(name=f"CUDA device with {format_bytes(total)}", kind="cuda", total_bytes=total,
                      source="vram")


def default_reserve(device: DeviceSpec, reserve: int | None = None) -> int:
    """Memory kept free for the desktop and other programs: max(1 GiB, 10 %) unless configured."""
    if reserve is not None:
        return reserve
    return max(GIB, device.total_bytes // 10)
