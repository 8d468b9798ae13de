"""Predicted vs measured stage times on this machine (the planner's time model, calibrated by
`engine probe`'s CPU matmul measurement), for the tiny config and the real-width 256 config.

Writes ``benchmarks/results/time_model_cpu.json``. Usage: ``python benchmarks/time_model_cpu.py``
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from report_rows import cpu_machine, utc_now  # noqa: E402  (same folder)

from engine.config import load_spec
from engine.device import probe_device
from engine.pipeline.generate import generate
from engine.pipeline.image_io import EXAMPLE_IMAGE
from engine.pipeline.loading import load_model
from engine.pipeline.options import GenerateOptions
from engine.planner.search import make_plan

RESULTS = Path(__file__).resolve().parent / "results"
CASES = (("tiny", 128, 128, 16, 10), ("256", 256, 256, 4, 2))


def run_case(config, h, w, frames, steps, device) -> dict:
    spec = load_spec(config)
    plan = make_plan(spec, h, w, frames, device, steps=steps, calibrate=False)
    model = load_model(config, None, seed=0)
    opts = GenerateOptions(image=str(EXAMPLE_IMAGE), prompt="a lake", height=h, width=w,
                           frames=frames, steps=steps)
    generate(model, GenerateOptions(**{**opts.__dict__, "steps": 1}), progress=False,
             settings=plan.settings)  # warm-up
    measured = generate(model, opts, plan, progress=False).timings
    rows = []
    for stage in plan.stages:  # the run reports the plan's stages, by the same names
        predicted, got = stage.time_s, measured[stage.name]
        rows.append({"stage": stage.name, "predicted_s": round(predicted, 4), "measured_s": round(got, 4),
                     "ratio": round(got / predicted, 3) if predicted else None})
    return {"config": config, "size": f"{h}x{w}x{frames}", "steps": steps,
            "settings": plan.settings.to_dict(), "rows": rows}


def main() -> None:
    torch.manual_seed(0)
    # private caches: the probe measures this machine now (a rate cached while other work ran
    # would scale every prediction), and no correction an earlier run stored applies
    os.environ["ENGINE_CACHE_DIR"] = tempfile.mkdtemp(prefix="engine-fits-")
    os.environ["ENGINE_CALIBRATION_DIR"] = tempfile.mkdtemp(prefix="engine-calibration-")
    device = probe_device()
    cases = [run_case(*c, device) for c in CASES]
    out = {"date": utc_now(), "machine": cpu_machine(measured_fp32_flops=device.fp32_flops),
           "note": "time model = roofline over traced FLOPs/bytes at the probe's measured matmul rate; "
                   "ratio = measured / predicted", "cases": cases}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "time_model_cpu.json").write_text(json.dumps(out, indent=1))
    for c in cases:
        for r in c["rows"]:
            print(f"{c['config']:>5} {c['size']:<12} {r['stage']:<13} predicted {r['predicted_s']:>8.3f} s "
                  f"measured {r['measured_s']:>8.3f} s  ratio {r['ratio']}")


if __name__ == "__main__":
    main()
