"""Online calibration on this CPU: after one calibrating run, how close is each stage's predicted
time for a run at another size to what it measures? Target: within 25 %.

Tiny config, random weights, this machine's probed CPU, a private calibration store. Prints, per
stage, the uncalibrated prediction, the calibrated one, the measurement, and the error against the
target; writes ``benchmarks/results/calibration_cpu.json``.

    python benchmarks/calibration_cpu.py
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CALIBRATE_AT, CHECK_AT, FRAMES, STEPS = (64, 64), (96, 128), 8, 6
TARGET = 0.25


def main() -> None:
    os.environ["ENGINE_CALIBRATION_DIR"] = tempfile.mkdtemp(prefix="engine-calibration-")
    from engine.config import load_spec
    from engine.device import probe_cpu
    from engine.device.host import cpu_name
    from engine.pipeline.generate import generate
    from engine.pipeline.image_io import EXAMPLE_IMAGE
    from engine.pipeline.loading import load_model
    from engine.pipeline.options import GenerateOptions
    from engine.planner.search import make_plan

    spec, cpu, model = load_spec("tiny"), probe_cpu(), load_model("tiny", None, seed=0)
    opts = GenerateOptions(image=str(EXAMPLE_IMAGE), prompt="a lake")

    def planned_run(size, calibrate=True):
        plan = make_plan(spec, *size, FRAMES, cpu, steps=STEPS, calibrate=calibrate)
        return plan, generate(model, opts, plan, progress=False)

    planned_run(CALIBRATE_AT, calibrate=False)  # warm-up: one-off first-call costs
    os.environ["ENGINE_CALIBRATION_DIR"] = tempfile.mkdtemp(prefix="engine-calibration-")
    planned_run(CALIBRATE_AT)  # the calibrating run
    bare = make_plan(spec, *CHECK_AT, FRAMES, cpu, steps=STEPS, calibrate=False)
    plan, result = planned_run(CHECK_AT)
    rows = []
    for predicted, uncalibrated, measured in zip(plan.stages, bare.stages, result.stages):
        error = predicted.time_s / measured.time_s - 1
        rows.append({"stage": predicted.name, "uncalibrated_s": round(uncalibrated.time_s, 4),
                     "calibrated_s": round(predicted.time_s, 4), "measured_s": round(measured.time_s, 4),
                     "error": round(error, 3), "within_target": abs(error) <= TARGET})
        print(f"{predicted.name:<13} uncalibrated {uncalibrated.time_s:8.3f} s  calibrated {predicted.time_s:8.3f} s"
              f"  measured {measured.time_s:8.3f} s  error {error:+7.1%}  (target +-{TARGET:.0%})")
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__},
           "calibrated_at": f"{CALIBRATE_AT[0]}x{CALIBRATE_AT[1]}x{FRAMES}",
           "checked_at": f"{CHECK_AT[0]}x{CHECK_AT[1]}x{FRAMES}", "steps": STEPS, "target": TARGET, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "calibration_cpu.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
