"""How much this machine's speed drifts between identical runs, and whether a reference kernel tracks it.

Ten identical tiny runs at 64x64x8 (6 DDIM steps, random weights, probed CPU, private caches),
back to back. Per run: each denoising step's seconds, the stage times, the minimal UNet call a
calibrating run times (``call_s``), and a fixed matmul + convolution timed (best of 3) just before
and after the run. Prints the spread (coefficient of variation) of the denoise time alone and
divided by the reference kernel's time. Writes ``benchmarks/results/speed_drift_cpu.json``; it is
what ``docs/runtime.md`` cites for why one run's calibration carries that run's speed.

    python benchmarks/speed_drift_cpu.py
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from report_rows import cpu_machine, utc_now  # noqa: E402  (same folder)

RESULTS = Path(__file__).resolve().parent / "results"
RUNS, SIZE, FRAMES, STEPS = 10, (64, 64), 8, 6


def reference_s(a: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """Best of 3 of four 384x384 matmuls and 3x3 convolutions (64 channels, 32x32)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(4):
            a @ a
            torch.nn.functional.conv2d(x, w, padding=1)
        best = min(best, time.perf_counter() - start)
    return best


def cv(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.mean(values)


def main() -> None:
    os.environ["ENGINE_CACHE_DIR"] = tempfile.mkdtemp(prefix="engine-fits-")
    os.environ["ENGINE_CALIBRATION_DIR"] = tempfile.mkdtemp(prefix="engine-calibration-")
    from engine.config import load_spec
    from engine.device import probe_cpu
    from engine.pipeline.generate import generate
    from engine.pipeline.image_io import EXAMPLE_IMAGE
    from engine.pipeline.loading import load_model
    from engine.pipeline.options import GenerateOptions
    from engine.planner.search import make_plan

    spec, cpu, model = load_spec("tiny"), probe_cpu(), load_model("tiny", None, seed=0)
    opts = GenerateOptions(image=str(EXAMPLE_IMAGE), prompt="a lake")
    plan = make_plan(spec, *SIZE, FRAMES, cpu, steps=STEPS, calibrate=False)
    generate(model, opts, plan, progress=False)  # warm-up: one-off first-call costs
    a, x, w = torch.randn(384, 384), torch.randn(1, 64, 32, 32), torch.randn(64, 64, 3, 3)
    rows = []
    for _ in range(RUNS):
        stamps: list[float] = []
        before = reference_s(a, x, w)
        result = generate(model, opts, plan, progress=False,
                          callback_on_step_end=lambda i, t, lat: stamps.append(time.perf_counter()) and False)
        after = reference_s(a, x, w)
        stages = {s.name: s for s in result.stages}
        rows.append({"reference_before_s": before, "reference_after_s": after,
                     "step_s": [b - a_ for a_, b in zip(stamps, stamps[1:])],
                     "stage_s": {n: s.time_s for n, s in stages.items()},
                     "denoise_call_s": stages["denoise"].call_s})
    denoise = [r["stage_s"]["denoise"] for r in rows]
    normalised = [d / ((r["reference_before_s"] + r["reference_after_s"]) / 2) for d, r in zip(denoise, rows)]
    summary = {"denoise_cv": cv(denoise), "denoise_over_reference_cv": cv(normalised),
               "step_ms_range_per_run": [[round(min(r["step_s"]) * 1e3), round(max(r["step_s"]) * 1e3)] for r in rows],
               "denoise_call_ms_range": [round(min(r["denoise_call_s"] for r in rows) * 1e3, 1),
                                         round(max(r["denoise_call_s"] for r in rows) * 1e3, 1)]}
    for r in rows:
        print(f"reference {r['reference_before_s'] * 1e3:5.1f} {r['reference_after_s'] * 1e3:5.1f} ms  "
              f"denoise {r['stage_s']['denoise']:.3f} s  steps {[round(s * 1e3) for s in r['step_s']]} ms  "
              f"minimal call {r['denoise_call_s'] * 1e3:.1f} ms")
    print(f"spread of the denoise time {summary['denoise_cv']:.1%}, divided by the reference kernel "
          f"{summary['denoise_over_reference_cv']:.1%}")
    out = {"date": utc_now(), "machine": cpu_machine(load_average=os.getloadavg()),
           "size": f"{SIZE[0]}x{SIZE[1]}x{FRAMES}", "steps": STEPS, "runs": RUNS, "summary": summary, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed_drift_cpu.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
