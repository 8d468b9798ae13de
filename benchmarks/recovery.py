"""What a mid-run out-of-memory costs: run time with one fault injected in each stage, over the
unconstrained run's time, on this CPU (tiny config, random weights).

The fault is raised by the enforced budget users get (both runs carry the budget's tracker) (``generate(max_memory=MemoryBudget(...))``,
see ``engine/runtime/budget.py``), in the middle of the stage: denoising at half its steps, the
decode after its first chunk. Each configuration runs ``--repeats`` times; the fastest run counts.
Writes ``benchmarks/results/recovery_cpu.json``.

    python benchmarks/recovery.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from report_rows import cpu_machine, utc_now  # noqa: E402  (same folder)

from engine.pipeline.generate import generate
from engine.pipeline.image_io import EXAMPLE_IMAGE
from engine.pipeline.loading import load_model
from engine.pipeline.options import GenerateOptions
from engine.runtime.budget import MemoryBudget

RESULTS = Path(__file__).resolve().parent / "results"
OPTS = dict(image=str(EXAMPLE_IMAGE), prompt="a lake", height=64, width=96, frames=8, steps=6)
SETTINGS = {"cfg": "batched", "ae_encode": "batched", "ae_decode": "chunk:4"}
FAULTS = (("text_encode", None), ("image_encode", None), ("vae_encode", None),
          ("denoise", OPTS["steps"] // 2), ("vae_decode", 1))


def timed(model, fault=None) -> tuple[float, object]:
    # the CPU budget's tracker costs time on every op: the unconstrained run carries it too (with a
    # cap nothing reaches), so the ratio is the fault's cost alone
    budget = MemoryBudget(1 << 50, "cpu")
    if fault is not None:
        budget.inject(*fault)
    start = time.perf_counter()
    result = generate(model, GenerateOptions(**OPTS), settings=SETTINGS, max_memory=budget, progress=False)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model("tiny", None, seed=0)
    timed(model)  # warm-up: first calls pay one-off costs
    base = min(timed(model)[0] for _ in range(args.repeats))
    rows = []
    for stage, step in FAULTS:
        runs = [timed(model, (stage, step)) for _ in range(args.repeats)]
        seconds, result = min(runs, key=lambda r: r[0])
        rows.append({"stage": stage, "fault_at": step, "seconds": round(seconds, 3),
                     "ratio_to_unconstrained": round(seconds / base, 3),
                     "adjustments": [a.changes() for a in result.adjustments],
                     "denoise_steps_run": result.denoise_steps, "unet_calls": result.unet_calls})
        print(f"{stage:<13} fault at {str(step):<5} {seconds:7.2f} s  x{seconds / base:5.2f} of the unconstrained "
              f"{base:.2f} s; steps run {result.denoise_steps}/{OPTS['steps']}; "
              f"changes {rows[-1]['adjustments']}")
    out = {"date": utc_now(), "machine": cpu_machine(),
           "workload": {**OPTS, "image": "bundled example", "config": "tiny", "settings": SETTINGS},
           "unconstrained_s": round(base, 3), "repeats": args.repeats, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recovery_cpu.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
