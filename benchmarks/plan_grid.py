"""The chosen plan for every (config x catalogued card), next to DynamiCrafter's own execution.

Writes ``benchmarks/results/plan_grid.{json,csv,md}`` and measures planning time for the 1024
config: in a fresh process with an empty fit cache, in a fresh process with the cache on disk,
and warm (a second plan in the same process). Targets: 2 s cold, 200 ms warm (``planning_ms``).

Usage: ``python benchmarks/plan_grid.py``
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from engine.config import load_spec
from engine.device.spec import GIB, load_catalog
from engine.planner.search import make_plan

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("256", "512", "1024")
TIMING_SNIPPET = (
    "from engine.config import load_spec;from engine.device.spec import catalog_device;"
    "from engine.planner.search import make_plan;s=load_spec('1024');d=catalog_device('rtx-4090-laptop');"
    "a=make_plan(s,576,1024,16,d);b=make_plan(s,576,1024,16,d);print(a.planning_ms,b.planning_ms)")


def planning_times(cache_dir: str | None) -> tuple[float, float]:
    env = dict(os.environ, **({"ENGINE_CACHE_DIR": cache_dir} if cache_dir else {}))
    out = subprocess.run([sys.executable, "-c", TIMING_SNIPPET], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def grid_rows() -> list[dict]:
    rows = []
    for config in CONFIGS:
        spec = load_spec(config)
        h, w = spec.default_height_width
        for slug, device in load_catalog().items():
            ref = make_plan(spec, h, w, 16, device, force="reference")
            try:
                ours = make_plan(spec, h, w, 16, device)
                chosen = ours.settings.to_dict()
                ours_peak, ours_time, fits = ours.peak_bytes / GIB, ours.time_s, ours.fits
            except ValueError as exc:
                chosen, ours_peak, ours_time, fits = {"error": str(exc)}, float("nan"), float("nan"), False
            rows.append({"config": config, "size": f"{h}x{w}x16", "card": slug,
                         "budget_gib": round(ref.budget_bytes / GIB, 2), "fits": fits,
                         "peak_gib": round(ours_peak, 2), "time_s": round(ours_time, 1),
                         **{k: chosen.get(k, "") for k in ("precision", "cfg", "offload", "ae_encode", "ae_decode")},
                         "reference_peak_gib": round(ref.peak_bytes / GIB, 2),
                         "reference_fits": ref.fits, "reference_time_s": round(ref.time_s, 1)})
    return rows


def write(rows: list[dict], timings: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "python": platform.python_version()},
            "note": "memory and time are predictions for catalogue cards (datasheet throughput, "
                    "CUDA context assumed 0.5 GiB); no card was measured for this table",
            "planning_ms_1024": timings}
    (RESULTS / "plan_grid.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    with open(RESULTS / "plan_grid.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (RESULTS / "plan_grid.md").write_text(f"# Plan grid ({meta['date']})\n\n{meta['note']}\n\n"
                                          + "\n".join(lines) + "\n")


def main() -> None:
    with tempfile.TemporaryDirectory() as empty:
        cold_empty = planning_times(empty)
    cold_disk = planning_times(None)
    timings = {"fresh_process_empty_cache_ms": round(cold_empty[0], 1),
               "fresh_process_cache_on_disk_ms": round(cold_disk[0], 1),
               "warm_ms": round(cold_disk[1], 1), "target_cold_ms": 2000, "target_warm_ms": 200}
    rows = grid_rows()
    write(rows, timings)
    for r in rows:
        print(f"{r['config']:>5} {r['card']:<16} fits={str(r['fits']):<5} peak={r['peak_gib']:>6} GiB "
              f"{r['precision']:<5} cfg={r['cfg']:<10} offload={r['offload']:<6} dec={r['ae_decode']:<10} "
              f"| reference {r['reference_peak_gib']:>6} GiB fits={r['reference_fits']}")
    print(json.dumps(timings))


if __name__ == "__main__":
    main()
