"""How the tiny VAE's speed per predicted second changes with the call's size on this CPU, and what
the decode's page faults cost.

Per size (64x64, 96x128, 128x128; 8 frames): the uncalibrated plan's predicted work of one encode
call (one frame) and one batched decode call (8 frames), and the measured median of 5 calls after a
warm-up. Then the decode again in two fresh processes, glibc's default allocator settings and with
``mallopt`` raising the mmap and trim thresholds (freed activations stay in the heap instead of
being unmapped and faulted in again): median time and minor page faults per call. It is what
``docs/runtime.md`` cites for why one calibrating run at one size mispredicts the VAE at another.
Writes ``benchmarks/results/vae_size_curve_cpu.json``.

    python benchmarks/vae_size_curve_cpu.py
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from report_rows import cpu_machine, utc_now  # noqa: E402  (same folder)

RESULTS = Path(__file__).resolve().parent / "results"
SIZES, FRAMES, REPEATS = ((64, 64), (96, 128), (128, 128)), 8, 5


def median_call_s(call) -> float:
    with torch.no_grad():
        call()
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _vae():
    from engine.config import load_spec
    from engine.models.autoencoder import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(load_spec("tiny").vae).eval()


def decode_faults(keep_freed: bool) -> list[dict]:
    """In this process: optionally raise glibc's thresholds, then time the decode per size."""
    if keep_freed:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD
    vae, rows = _vae(), []
    for h, w in SIZES:
        z = torch.randn(FRAMES, 4, h // 8, w // 8)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds = median_call_s(lambda: vae.decode(z))
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (REPEATS + 1)
        rows.append({"size": f"{h}x{w}x{FRAMES}", "decode_s": round(seconds, 4), "minor_faults_per_call": int(faults)})
    return rows


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--faults":
        print(json.dumps(decode_faults(sys.argv[2] == "keep")))
        return
    from engine.config import load_spec
    from engine.device import probe_cpu
    from engine.planner.search import make_plan

    os.environ["ENGINE_CACHE_DIR"] = tempfile.mkdtemp(prefix="engine-fits-")
    spec, cpu, vae, rows = load_spec("tiny"), probe_cpu(), _vae(), []
    for h, w in SIZES:
        plan = make_plan(spec, h, w, FRAMES, cpu, steps=1, force="ae_encode=batched,ae_decode=batched",
                         calibrate=False)
        image, z = torch.randn(1, 3, h, w), torch.randn(FRAMES, 4, h // 8, w // 8)
        row = {"size": f"{h}x{w}x{FRAMES}"}
        for name, call in (("vae_encode", lambda: vae.encode(image)), ("vae_decode", lambda: vae.decode(z))):
            stage = plan.stage(name)
            row[name] = {"predicted_work_s": round((stage.time_s - stage.fixed_s) / stage.calls, 5),
                         "measured_s": round(median_call_s(call), 4)}
        rows.append(row)
    growth = {name: {"predicted": round(rows[1][name]["predicted_work_s"] / rows[0][name]["predicted_work_s"], 2),
                     "measured": round(rows[1][name]["measured_s"] / rows[0][name]["measured_s"], 2)}
              for name in ("vae_encode", "vae_decode")}
    for row in rows:
        print(row)
    print(f"growth {rows[0]['size']} -> {rows[1]['size']}: {growth}")
    faults = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, __file__, "--faults", mode], capture_output=True, text=True, check=True)
        faults["default" if mode == "default" else "freed_memory_kept"] = json.loads(out.stdout.strip().splitlines()[-1])
        print(mode, faults[list(faults)[-1]])
    out = {"date": utc_now(), "machine": cpu_machine(),
           "sizes": rows, "growth_first_to_second": growth, "decode_page_faults": faults}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vae_size_curve_cpu.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
