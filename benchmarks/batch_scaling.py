"""Jobs per minute of ``engine batch`` in 1 and in 2 processes on this machine (tiny config, CPU).

The same jobs run three times into fresh folders: one plain process (torch's default threads), one
process with one thread, and ``accelerate launch --multi_gpu --num_processes 2 ... --device cpu``
(torchrun starts the two ranks with one thread each; they talk over gloo). Two figures per run: end
to end (the whole command: interpreter, imports, model build, planning, the jobs) and the jobs
phase alone (first job's start to last job's end, read from the manifest).

Writes ``benchmarks/results/batch_scaling.json``.
Usage: ``python benchmarks/batch_scaling.py [JOBS]`` (default 6)
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine.device.host import cpu_name
from engine.pipeline.image_io import EXAMPLE_IMAGE

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
JOB = {"height": 128, "width": 128, "frames": 8, "steps": 8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(processes: int, jobs: Path, out: Path) -> list[str]:
    batch = ["-m", "engine", "batch", str(jobs), "--out", str(out), "--device", "cpu", "--quiet"]
    if processes == 1:
        return [sys.executable, *batch]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *batch]


def _jobs_phase_s(out: Path) -> float:
    """First job start to last job end, from the manifest's finishing times and wall times."""
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    ends = [datetime.datetime.fromisoformat(r["finished_at"]).timestamp() for r in rows]
    starts = [end - r["wall_s"] for end, r in zip(ends, rows)]
    return max(ends) - min(starts)


def run(processes: int, jobs: Path, folder: Path, count: int, threads: int | None = None) -> dict:
    out = folder / f"out{processes}-{threads}"
    env = {**os.environ, "HF_HOME": str(folder), "PYTHONPATH": str(ROOT)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    done = subprocess.run(_command(processes, jobs, out), env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{processes}-process batch failed:\n{done.stderr[-3000:]}")
    phase = _jobs_phase_s(out)
    return {"processes": processes, "threads_per_process": threads or torch.get_num_threads(), "jobs": count, "command_s": round(wall, 2), "jobs_phase_s": round(phase, 2),
            "jobs_per_min_end_to_end": round(60 * count / wall, 2),
            "jobs_per_min_jobs_phase": round(60 * count / phase, 2), "load_avg_after": os.getloadavg()}


def main(count: int = 6) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        jobs = folder / "jobs.jsonl"
        jobs.write_text("".join(json.dumps({"id": f"j{i}", "image": str(EXAMPLE_IMAGE), "prompt": "a lake",
                                            "seed": i, **JOB}) + "\n" for i in range(count)))
        load_before = os.getloadavg()
        one = run(1, jobs, folder, count)
        one_thread = run(1, jobs, folder, count, threads=1)
        two = run(2, jobs, folder, count, threads=1)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu": cpu_name(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "load_avg_before": load_before},
        "workload": {"config": "tiny", **JOB, "jobs": count, "weights": "random"},
        "note": "1 process: torch's default threads, then one thread (OMP_NUM_THREADS=1); 2 processes: "
                "accelerate launch --multi_gpu (torchrun), --device cpu, one thread each, gloo. ratio_*: 2 "
                "processes over 1 process with default threads. The cores are shared with other work "
                "(load_avg), which penalises a 2-thread process most (its threads wait for each other).",
        "runs": [one, one_thread, two],
        "ratio_end_to_end": round(two["jobs_per_min_end_to_end"] / one["jobs_per_min_end_to_end"], 3),
        "ratio_jobs_phase": round(two["jobs_per_min_jobs_phase"] / one["jobs_per_min_jobs_phase"], 3),
        "ratio_jobs_phase_vs_one_thread": round(two["jobs_per_min_jobs_phase"]
                                                / one_thread["jobs_per_min_jobs_phase"], 3),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batch_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
