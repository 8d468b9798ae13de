"""What the planner knows about a device: memory, throughput, link; from a probe, the catalogue
(``engine/configs/gpus.yaml``, package data) or a bare ``--vram`` size. Pure Python: nothing here
touches CUDA."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from importlib.resources import files
from typing import TYPE_CHECKING

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
        raise ValueError(f"`{argument}` {text!r} is not a size; write it like 8GiB, 8G, 12GB or 6144MiB.")
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


def catalog_device(slug: str) -> DeviceSpec:
    cat = load_catalog()
    if slug not in cat:
        raise ValueError(f"`--gpu` {slug!r} is not in the catalogue; run `engine gpus` to list the "
                         f"slugs (e.g. {', '.join(list(cat)[:3])}), or pass `--vram SIZE`.")
    return cat[slug]


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
