"""The frozen :class:`Plan` the runtime reads, with a JSON and a human explanation.

JSON contract (documented in ``docs/plan-format.md``): ``device`` {name, total_bytes, budget_bytes,
...}, ``settings`` {dtype, attention, cfg, offload, ae_encode, ae_decode}, ``stages`` [{name,
peak_bytes, allocated_bytes, time_s}], top-level ``peak_bytes``, ``time_s``, ``fits``,
``planning_ms``, ``rejected`` [{settings, reason}].
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from ..device.spec import DeviceSpec, format_bytes

STAGE_ORDER = ("text_encode", "image_encode", "vae_encode", "denoise", "vae_decode")


@dataclass(frozen=True)
class StagePlan:
    """One stage's prediction. ``peak_bytes`` is device memory in use as the driver would show it
    (context + the caching allocator's reserved memory); ``allocated_bytes`` the tensor-level peak."""

    name: str
    peak_bytes: int
    allocated_bytes: int
    time_s: float
    terms: Mapping[str, int] = field(default_factory=dict)  # named parts of peak_bytes
    note: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "peak_bytes": int(self.peak_bytes),
                "allocated_bytes": int(self.allocated_bytes), "time_s": round(self.time_s, 6),
                "terms": {k: int(v) for k, v in self.terms.items()}, "note": self.note}


@dataclass(frozen=True)
class Plan:
    """A complete, explained execution plan for one generation."""

    config: str
    height: int
    width: int
    frames: int
    device: DeviceSpec
    budget_bytes: int
    reserve_bytes: int
    settings: Mapping[str, str]
    stages: tuple[StagePlan, ...]
    forced: tuple[str, ...] = ()
    rejected: tuple[Mapping[str, object], ...] = ()
    planning_ms: float = 0.0
    assumptions: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))

    @property
    def peak_bytes(self) -> int:
        return max((s.peak_bytes for s in self.stages), default=0)

    @property
    def time_s(self) -> float:
        return sum(s.time_s for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"`stage` {name!r} is not in this plan; it has {', '.join(s.name for s in self.stages)}.")

    def as_dict(self) -> dict:
        dev = self.device
        return {
            "config": self.config, "height": self.height, "width": self.width, "frames": self.frames,
            "device": {"name": dev.name, "total_bytes": int(dev.total_bytes),
                       "budget_bytes": int(self.budget_bytes), "reserve_bytes": int(self.reserve_bytes),
                       "source": dev.source, "slug": dev.slug},
            "settings": dict(self.settings), "forced": list(self.forced),
            "stages": [s.as_dict() for s in self.stages],
            "peak_bytes": int(self.peak_bytes), "time_s": round(self.time_s, 6), "fits": self.fits,
            "planning_ms": round(self.planning_ms, 3),
            "rejected": [dict(r) for r in self.rejected], "assumptions": list(self.assumptions),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def explain(self) -> str:
        """A readable table: settings, per-stage memory and time, the verdict and the why."""
        d = self.device
        lines = [f"plan for {self.config} at {self.height}x{self.width}x{self.frames} on {d.name}",
                 f"  budget {format_bytes(self.budget_bytes)} = {format_bytes(d.total_bytes)} total "
                 f"- {format_bytes(self.reserve_bytes)} reserve",
                 "  settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items())
                 + (f"  (forced: {', '.join(self.forced)})" if self.forced else ""),
                 f"  {'stage':<14}{'peak':>12}{'allocated':>12}{'time':>10}"]
        for s in self.stages:
            lines.append(f"  {s.name:<14}{format_bytes(s.peak_bytes):>12}{format_bytes(s.allocated_bytes):>12}"
                         f"{s.time_s:>9.2f}s" + (f"  {s.note}" if s.note else ""))
        verdict = "fits" if self.fits else "DOES NOT FIT"
        for s in self.stages:
            if s.peak_bytes > self.budget_bytes:
                parts = " + ".join(f"{k} {format_bytes(v)}" for k, v in s.terms.items() if v)
                lines.append(f"  why: {s.name} needs {format_bytes(s.peak_bytes)} = {parts} "
                             f"> budget {format_bytes(self.budget_bytes)}")
        lines.append(f"  peak {format_bytes(self.peak_bytes)} vs budget {format_bytes(self.budget_bytes)}: "
                     f"{verdict}; predicted time {self.time_s:.1f} s; planned in {self.planning_ms:.0f} ms")
        for r in self.rejected[:8]:
            lines.append(f"  rejected {r['settings']}: {r['reason']}")
        for a in self.assumptions:
            lines.append(f"  assumption: {a}")
        return "\n".join(lines)
