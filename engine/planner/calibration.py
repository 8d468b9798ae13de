"""Online calibration: what runs measured against what their plans predicted, per device and model.

Every run made from a plan records, per stage, measured / predicted time (and allocated peak
where the device measures one) in a small JSON store in the user cache directory, keyed by the
device and the model spec. The next plan for the same device and model corrects its stage
predictions by those ratios and names the correction in its assumptions. Memory is only ever
corrected upwards (a plan that under-predicted once keeps the margin). Torch-free.

Time has two parts that scale differently: a fixed cost per model call (dispatch, kernel launches,
Python: the same at any size) and the work the roofline predicts. One run at one size cannot tell
them apart, so the run also times one minimal call of the stage's model (``StageRecord.call_s``);
the correction is then ``time = ratio * (model - model_fixed) + calls * call_s``, with ``ratio``
from what the run measured beyond its calls' fixed cost, and it carries over to other sizes and
call counts. ``model_fixed`` (``StagePlan.fixed_s`` before calibration) is the per-call part the
time model itself predicts (a measured VAE time model has one, a roofline none): the measured
``call_s`` takes its place, so the fixed cost is counted once.

``engine probe`` shows the corrections; ``engine probe --reset-calibration`` drops them.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


log = logging.getLogger(__name__)

_SMOOTHING = 0.5  # weight of the newest run in the running (geometric) mean of ratios
_MIN_SCALED = 0.05  # a stage is never all fixed cost: noise in the minimal call cannot zero its ratio


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

    time: float = 1.0
    memory: float = 1.0
    runs: int = 0
    call_s: float = 0.0  # fixed seconds per model call, measured by a minimal call (0: not measured)

    def time_text(self) -> str:
        """``x<ratio> + <call_s> ms/call``: the roofline factor and the measured per-call cost."""
        return f"x{self.time:.2f}" + (f" + {self.call_s * 1e3:.1f} ms/call" if self.call_s else "")


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
        return {name: Correction(**c) for name, c in raw.get("stages", {}).items()}

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
            self.stages[rec.name] = Correction(_blend(old.time, time_ratio, weight),
                                               _blend(old.memory, memory_ratio, weight), old.runs + 1, call_s)
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
    from dataclasses import replace

    if correction is None:
        return stage
    extra = max(0, int(stage.allocated_bytes * (correction.memory - 1.0)))
    terms = {**stage.terms, "calibration": extra} if extra else stage.terms
    fixed = stage.calls * correction.call_s if correction.call_s else stage.fixed_s
    return replace(stage, time_s=(stage.time_s - stage.fixed_s) * correction.time + fixed,
                   calibration=correction.time, fixed_s=fixed, allocated_bytes=stage.allocated_bytes + extra,
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
