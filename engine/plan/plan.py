"""The frozen :class:`Plan`: the only contract between the planner and the runtime.

A plan holds the :class:`Workload` it was made for, the device, the chosen :class:`Settings` and
every stage's prediction. ``Plan.from_json(plan.to_json()) == plan`` exactly; the format is in
``docs/plan-format.md``. Torch-free.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..device.spec import DeviceSpec, format_bytes
from ..errors import InvalidArgument, PlanMismatch
from .settings import GenerationMode, Settings
from .stages import STAGE_NAMES

SCHEMA = 2  # bumped when a key changes meaning


def spec_digest(spec) -> str:
    """A short identity of a model spec: architecture, schedule and defaults (not its file path)."""
    plain = dataclasses.replace(spec, source="") if dataclasses.is_dataclass(spec) else spec
    return hashlib.sha256(repr(plain).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Workload:
    """What one generation asks for; a plan runs only the workload it was made for."""

    config: str
    config_digest: str
    height: int
    width: int
    frames: int
    steps: int = 50
    mode: GenerationMode = GenerationMode.I2V
    guidance: bool = True  # classifier-free guidance on (scale != 1)

    def __post_init__(self):
        object.__setattr__(self, "mode", GenerationMode.parse(self.mode, "mode"))

    @classmethod
    def for_spec(cls, spec, height: int, width: int, frames: int, **kw) -> Workload:
        return cls(spec.name, spec_digest(spec), height, width, frames, **kw)

    @property
    def used_frames(self) -> int:
        """Frames whose latents condition the run: 1 (I2V) or the first and last (interp, loop)."""
        return 1 if self.mode is GenerationMode.I2V else 2

    def encoded_frames(self, settings: Settings) -> int:
        return self.frames if settings.encode_all_frames else self.used_frames

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mode": str(self.mode)}

    def mismatch(self, other: Workload, device_kind: str, run_device_kind: str) -> str | None:
        """Why a run of ``other`` on ``run_device_kind`` cannot use a plan for this, or None."""
        if (self.config, self.config_digest) != (other.config, other.config_digest):
            return f"config {self.config!r} (the model is {other.config!r})"
        if (self.height, self.width) != (other.height, other.width):
            return f"{self.height}x{self.width} (the run asks for {other.height}x{other.width})"
        if self.frames != other.frames:
            return f"{self.frames} frames (the run asks for {other.frames})"
        if self.mode is not other.mode:
            return f"mode {self.mode} (the run asks for {other.mode})"
        if device_kind != run_device_kind:
            return f"a {device_kind} device (the run is on {run_device_kind})"
        return None


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
    calibration: float = 1.0  # measured/predicted time factor applied from earlier runs (1: none)
    calls: int = 1  # model calls the stage makes (UNet calls of the denoise, VAE calls of a chunked mode)
    # of time_s: the calls' fixed cost (calls * per-call seconds): the time model's own (a measured
    # VAE time model's per-call overhead; 0 for a roofline) until runs measured it on this device
    fixed_s: float = 0.0
    # time_s is from a time model measured on this device (the VAE's, timed by the device's first
    # calibrating run or ``engine probe --calibrate``), not a roofline: no lower bound, and runs
    # do not rescale it
    time_measured: bool = False

    @property
    def time_is(self) -> str:
        """``measured`` from a time model measured on this device; ``calibrated`` once runs on this
        device corrected it; else a roofline ``lower_bound``."""
        if self.time_measured:
            return "measured"
        return "calibrated" if self.calibration != 1.0 else "lower_bound"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "peak_bytes": int(self.peak_bytes),
                "allocated_bytes": int(self.allocated_bytes), "time_s": float(self.time_s),
                "time_is": self.time_is, "calibration": float(self.calibration),
                "calls": int(self.calls), "fixed_s": float(self.fixed_s), "time_measured": self.time_measured,
                "terms": {k: int(v) for k, v in self.terms.items()}, "note": self.note}


@dataclass(frozen=True)
class Rejected:
    """A candidate the planner did not choose, and why."""

    settings: Settings
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.to_dict(), "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    """A complete, explained execution plan for one generation."""

    workload: Workload
    device: DeviceSpec
    budget_bytes: int
    reserve_bytes: int
    settings: Settings
    stages: tuple[StagePlan, ...]
    forced: tuple[str, ...] = ()
    rejected: tuple[Rejected, ...] = ()
    planning_ms: float = 0.0
    assumptions: tuple[str, ...] = ()

    # -- what was planned --------------------------------------------------------------------
    @property
    def config(self) -> str:
        return self.workload.config

    @property
    def height(self) -> int:
        return self.workload.height

    @property
    def width(self) -> int:
        return self.workload.width

    @property
    def frames(self) -> int:
        return self.workload.frames

    @property
    def peak_bytes(self) -> int:
        return max((s.peak_bytes for s in self.stages), default=0)

    @property
    def time_s(self) -> float:
        return sum(s.time_s for s in self.stages)

    @property
    def _calibrated(self) -> bool:
        return all(s.time_is != "lower_bound" for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.name == name:
                return s
        raise InvalidArgument(f"`stage` {name!r} is not in this plan; it has "
                              f"{', '.join(s.name for s in self.stages)}.")

    def check_runs(self, workload: Workload, device_kind: str, argument: str = "plan") -> None:
        """Raise :class:`PlanMismatch` unless this plan was made for ``workload`` on ``device_kind``."""
        why = self.workload.mismatch(workload, self.device.kind, device_kind)
        if why:
            raise PlanMismatch(f"`{argument}` was made for {why}; make a new plan for this run "
                               "with make_plan(...).")

    # -- JSON ------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        device = {**self.device.as_dict(), "budget_bytes": int(self.budget_bytes),
                  "reserve_bytes": int(self.reserve_bytes)}
        return {"schema": SCHEMA, "workload": self.workload.to_dict(), **_flat_workload(self.workload),
                "device": device, "settings": self.settings.to_dict(), "forced": list(self.forced),
                "stages": [s.to_dict() for s in self.stages], "peak_bytes": int(self.peak_bytes),
                "time_s": float(self.time_s), "fits": self.fits, "planning_ms": float(self.planning_ms),
                "rejected": [r.to_dict() for r in self.rejected], "assumptions": list(self.assumptions)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if data.get("schema") != SCHEMA:
            raise InvalidArgument(f"`plan` has schema {data.get('schema')!r}, this engine reads {SCHEMA}; "
                                  "make the plan again with this version (engine plan --json).")
        device = dict(data["device"])
        budget, reserve = device.pop("budget_bytes"), device.pop("reserve_bytes")
        return cls(workload=Workload(**data["workload"]), device=DeviceSpec(**device),
                   budget_bytes=budget, reserve_bytes=reserve,
                   settings=Settings.from_mapping(data["settings"], argument="plan.settings"),
                   stages=tuple(StagePlan(**{k: v for k, v in s.items() if k != "time_is"})
                                for s in data["stages"]), forced=tuple(data["forced"]),
                   rejected=tuple(Rejected(Settings.from_mapping(r["settings"]), r["reason"])
                                  for r in data["rejected"]),
                   planning_ms=data["planning_ms"], assumptions=tuple(data["assumptions"]))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"`plan` is not JSON ({exc}); pass the output of `engine plan --json`.") from None
        return cls.from_dict(data)

    # -- for people --------------------------------------------------------------------------
    def explain(self) -> str:
        """A readable table: settings, per-stage memory and time, the verdict and the why."""
        d, w = self.device, self.workload
        lines = [f"plan for {w.config} at {w.height}x{w.width}x{w.frames}, {w.steps} steps on {d.name}",
                 f"  budget {format_bytes(self.budget_bytes)} = {format_bytes(d.total_bytes)} total "
                 f"- {format_bytes(self.reserve_bytes)} reserve",
                 "  settings: " + self.settings.describe()
                 + (f"  (forced: {', '.join(self.forced)})" if self.forced else ""),
                 f"  {'stage':<14}{'peak':>12}{'allocated':>12}{'time':>10}"]
        for s in self.stages:  # ">=": an uncalibrated roofline time is a lower bound
            bound = ">=" if s.time_is == "lower_bound" else "  "
            lines.append(f"  {s.name:<14}{format_bytes(s.peak_bytes):>12}{format_bytes(s.allocated_bytes):>12}"
                         f"{bound}{s.time_s:>8.2f}s" + (f"  {s.note}" if s.note else ""))
        for s in self.stages:
            if s.peak_bytes > self.budget_bytes:
                parts = " + ".join(f"{k} {format_bytes(v)}" for k, v in s.terms.items() if v)
                lines.append(f"  why: {s.name} needs {format_bytes(s.peak_bytes)} = {parts} "
                             f"> budget {format_bytes(self.budget_bytes)}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  peak {format_bytes(self.peak_bytes)} vs budget {format_bytes(self.budget_bytes)}: "
                     f"{verdict}; predicted time {'' if self._calibrated else '>= '}{self.time_s:.1f} s; "
                     f"planned in {self.planning_ms:.0f} ms")
        lines += [f"  rejected {r.settings.describe()}: {r.reason}" for r in self.rejected[:8]]
        lines += [f"  assumption: {a}" for a in self.assumptions]
        return "\n".join(lines)


def _flat_workload(w: Workload) -> dict[str, Any]:
    """The top-level ``config``/``height``/``width``/``frames`` keys tools read (ignored on load)."""
    return {"config": w.config, "height": w.height, "width": w.width, "frames": w.frames}


__all__ = ["Plan", "Rejected", "StagePlan", "Workload", "STAGE_NAMES", "spec_digest"]
