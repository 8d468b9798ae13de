"""Online calibration: what runs measured against what their plans predicted, per device and model.

Every run made from a plan records, per stage, measured / predicted time (and allocated peak
where the device measures one) in a small JSON store in the user cache directory, keyed by the
device and the model spec. The next plan for the same device and model corrects its stage
predictions by those ratios and names the correction in its assumptions. Memory is only ever
corrected upwards (a plan that under-predicted once keeps the margin). Torch-free.

Time has two parts that scale differently: a fixed cost per model call (dispatch, kernel launches,
Python: the same at any size) and the work the roofline predicts. One run at one size cannot tell
them apart, so the run also times its own calls shrunk to the smallest input (one guided step,
one VAE call each way: ``StageRecord.call_s`` per model call); the correction is then
``time = ratio * (model - model_fixed) + calls * call_s``, with ``ratio`` from what the run
measured beyond its calls' fixed cost, for other call counts too. ``model_fixed``
(``StagePlan.fixed_s`` before calibration) is the per-call part the time model itself predicts (a
measured VAE time model has one, a roofline none): the measured ``call_s`` takes its place, so the
fixed cost is counted once.

How much slower than its time model a device runs a call depends on the call's size (larger calls
fill the cores or the GPU better; on the CPU, activations past the caches or the allocator's
mmap threshold cost more), so the ratio is kept per size: per predicted work of one call (the
time model's seconds per call before correction), up to ``_MAX_POINTS`` sizes. A plan takes the
ratio of the nearest measured size beyond the measured range and interpolates between sizes
(log-log); runs at the same size (within ``_SAME_SIZE``) refine that size's ratio.

A stage whose time model was itself measured on this device (the VAE's, after ``engine probe
--calibrate``: a ladder of calls at many sizes, each the fastest of several) keeps that time: one
run's single VAE call is a noisier measurement of the same thing (on this project's CPU the
measured model was within 17 % of the next run and a run's correction moved it up to 52 % off).
Its memory is still corrected.

``engine probe`` shows the corrections; ``engine probe --reset-calibration`` drops them.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path


log = logging.getLogger(__name__)

_SMOOTHING = 0.5  # weight of the newest run in the running (geometric) mean of ratios
_MIN_SCALED = 0.05  # a stage is never all fixed cost: noise in the minimal call cannot zero its ratio
_MAX_POINTS = 8  # sizes whose ratio a stage keeps (the oldest is dropped)
_SAME_SIZE = 0.1  # calls whose predicted work differs by less than this are the same size


def calibration_dir() -> Path:
    """``$ENGINE_CALIBRATION_DIR``, else ``calibration/`` in the fit cache's directory."""
    if os.environ.get("ENGINE_CALIBRATION_DIR"):
        return Path(os.environ["ENGINE_CALIBRATION_DIR"]).expanduser()
    from ..estimate.laws.cache import default_cache_dir  # torch-free, like the warm plan

    return default_cache_dir() / "calibration"


def device_key(device) -> str:
    """Which device a correction belongs to: its kind and name (a probed card, this CPU)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{device.kind}-{device.name}")
    return safe[:120]


@dataclass(frozen=True)
class Correction:
    """Measured / predicted ratios of one stage, and how many runs they come from."""

    time: float = 1.0  # the running mean over every run (what a store without ``points`` has)
    memory: float = 1.0
    runs: int = 0
    call_s: float = 0.0  # fixed seconds per model call, measured by a minimal call (0: not measured)
    # (predicted seconds of one call's work, time ratio measured at that size), newest last
    points: tuple[tuple[float, float], ...] = ()

    def __post_init__(self):  # read back from JSON as lists; a damaged store raises ValueError
        points = tuple((float(x), float(r)) for x, r in self.points)
        if any(not (x > 0 and r > 0) for x, r in points):
            raise ValueError(f"calibration points must be positive, not {points}")
        object.__setattr__(self, "points", points)

    def time_at(self, work_s: float) -> float:
        """The time ratio for calls of ``work_s`` predicted seconds each: the measured size's,
        interpolated (log-log) between measured sizes, the nearest one's beyond them."""
        if not self.points or work_s <= 0:
            return self.time
        ordered = sorted(self.points)
        if work_s <= ordered[0][0]:
            return ordered[0][1]
        for (x0, r0), (x1, r1) in zip(ordered, ordered[1:]):
            if work_s <= x1:
                f = math.log(work_s / x0) / math.log(x1 / x0)
                return math.exp((1 - f) * math.log(r0) + f * math.log(r1))
        return ordered[-1][1]

    def with_point(self, work_s: float, ratio: float, weight: float) -> tuple[tuple[float, float], ...]:
        """``points`` with a run at ``work_s`` folded in: the nearest measured size, when within
        ``_SAME_SIZE``, keeps its size and has its ratio refined by the running mean (the newest
        weighted ``weight``); otherwise the size is added (the oldest dropped past
        ``_MAX_POINTS``). A store from before sizes were kept seeds it with its running mean."""
        points = list(self.points)
        # 1.0 is the default: runs whose time model was measured on the device leave it (they
        # record memory only), so only a ratio an older store measured seeds the first size
        if not points and self.runs and self.time != 1.0:
            ratio = _blend(self.time, ratio, weight)
        nearest = min(points, key=lambda p: abs(math.log(p[0] / work_s)), default=None)
        if nearest is not None and abs(nearest[0] / work_s - 1) <= _SAME_SIZE:
            points[points.index(nearest)] = (nearest[0], _blend(nearest[1], ratio, weight))
            return tuple(points)
        return tuple(points[-(_MAX_POINTS - 1):] + [(work_s, ratio)])

    @classmethod
    def from_dict(cls, data: dict) -> Correction:
        """A stored correction; fields another version wrote and this one lacks are left out."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def time_text(self) -> str:
        """``x<ratio> + <call_s> ms/call``: the roofline factor (its range over the measured sizes)
        and the measured per-call cost."""
        ratios = [r for _, r in self.points] or [self.time]
        factor = f"x{min(ratios):.2f}" + (f"-{max(ratios):.2f}" if max(ratios) > min(ratios) * 1.005 else "")
        return factor + (f" + {self.call_s * 1e3:.1f} ms/call" if self.call_s else "")


class CalibrationStore:
    """Corrections for one (device, model spec), read and written as one JSON file."""

    def __init__(self, device, spec_digest: str, root: Path | None = None):
        self.path = (root or calibration_dir()) / device_key(device) / f"{spec_digest}.json"
        self.stages = self._read()

    def _read(self) -> dict[str, Correction]:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        stages = {}
        for name, c in raw.get("stages", {}).items() if isinstance(raw, dict) else ():
            try:
                stages[name] = Correction.from_dict(c)
            except (TypeError, ValueError):  # a damaged entry: that stage is uncalibrated again
                log.warning("calibration of %s in %s is unreadable; ignored", name, self.path)
        return stages

    def correction(self, stage: str) -> Correction | None:
        return self.stages.get(stage)

    def record(self, plan, records) -> None:
        """Fold one run's measured stages into the store (``records``: the run's StageRecords)."""
        for rec in records:
            predicted = plan.stage(rec.name)
            base = _uncorrected(predicted)
            if base["time_s"] <= 0 or rec.time_s <= 0:
                continue
            old = self.stages.get(rec.name, Correction())
            weight = 1.0 if old.runs == 0 else _SMOOTHING
            # a run whose minimal call went unmeasured keeps what earlier runs measured
            measured_call = getattr(rec, "call_s", None)
            call_s = old.call_s if not measured_call else _blend_linear(old.call_s, measured_call, weight)
            # what the run spent beyond its calls' fixed cost is the part the time model scales
            fixed = predicted.calls * call_s if call_s else predicted.fixed_s
            scaled = max(rec.time_s - fixed, _MIN_SCALED * rec.time_s)
            time_ratio = scaled / base["time_s"]
            memory_ratio = (rec.peak_bytes / base["allocated_bytes"]
                            if rec.peak_bytes and base["allocated_bytes"] else old.memory)
            memory = _blend(old.memory, memory_ratio, weight)
            if predicted.time_measured:  # its time model is this device's own: only memory is learnt
                self.stages[rec.name] = replace(old, memory=memory, runs=old.runs + 1)
                continue
            points = old.with_point(base["time_s"] / max(1, predicted.calls), time_ratio, _SMOOTHING)
            self.stages[rec.name] = Correction(_blend(old.time, time_ratio, weight), memory, old.runs + 1,
                                               call_s, points)
        self._write()

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"stages": {k: vars(c) for k, c in self.stages.items()}}, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only cache: calibration is an improvement, not a need
            log.warning("calibration not saved (%s); plans stay uncalibrated", exc)

    def reset(self) -> bool:
        self.stages = {}
        try:
            self.path.unlink()
            return True
        except FileNotFoundError:
            return False


def _blend(old: float, new: float, weight: float) -> float:
    return math.exp((1 - weight) * math.log(old) + weight * math.log(new))


def _blend_linear(old: float, new: float, weight: float) -> float:
    return (1 - weight) * old + weight * new


def _uncorrected(stage) -> dict:
    """The prediction before calibration, its calls' fixed cost left out (a plan keeps the
    factor, the fixed part and the added bytes)."""
    return {"time_s": (stage.time_s - stage.fixed_s) / stage.calibration,
            "allocated_bytes": stage.allocated_bytes - stage.terms.get("calibration", 0)}


def corrected(stage, correction: Correction | None):
    """``stage`` (a StagePlan) with ``correction`` applied: the time beyond its calls' fixed cost
    scaled, and the fixed cost the runs measured put in place of the time model's own (kept
    where none was measured); memory only raised."""
    if correction is None:
        return stage
    extra = max(0, int(stage.allocated_bytes * (correction.memory - 1.0)))
    terms = {**stage.terms, "calibration": extra} if extra else stage.terms
    if stage.time_measured:  # measured on this device already: one run's noise would only add to it
        return replace(stage, allocated_bytes=stage.allocated_bytes + extra, peak_bytes=stage.peak_bytes + extra,
                       terms=terms)
    fixed = stage.calls * correction.call_s if correction.call_s else stage.fixed_s
    work = stage.time_s - stage.fixed_s
    ratio = correction.time_at(work / max(1, stage.calls))
    return replace(stage, time_s=work * ratio + fixed,
                   calibration=ratio, fixed_s=fixed, allocated_bytes=stage.allocated_bytes + extra,
                   peak_bytes=stage.peak_bytes + extra, terms=terms)


def reset_all(device=None) -> int:
    """Drop every stored correction (of ``device`` only, when given); returns the files removed."""
    root = calibration_dir()
    folders = [root / device_key(device)] if device is not None else [p for p in root.glob("*") if p.is_dir()]
    removed = 0
    for folder in folders:
        for f in folder.glob("*.json"):
            f.unlink()
            removed += 1
    return removed
