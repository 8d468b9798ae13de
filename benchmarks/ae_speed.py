"""Does the autoencoding planner pick a fast mode? Measured times of every mode vs its choice.

    python benchmarks/ae_speed.py                 # ~6-10 min on a 2-core CPU
    python benchmarks/ae_speed.py --quick         # tiny VAE only, ~2 min

For the tiny VAE (``engine/configs/tiny.yaml``) and the real-width VAE (``load_spec('512').vae``,
random weights), at a few sizes, every candidate mode is run for real (one warm-up round, then the
median of ``--runs`` rounds; rounds interleave the modes so that load from other processes hits
them all alike). The time model is calibrated on this machine first (``AETimeModel.calibrate``,
into a fresh cache directory so the calibration time is real; a second call then loads it), the
memory side is ``VAEMemoryModel`` from ``engine/estimate/vae.py`` (or, if that module is absent,
a direct ``trace_call`` of ``decode_frames``/``encode_frames`` on fake tensors; the output says
which).

For each budget (the distinct predicted peaks of the candidate modes, so every mode is the
largest that fits once), the planner chooses among the same candidates, and we report
``measured time of its choice / fastest MEASURED time among the modes predicted to fit`` (target
<= 1.10). Per mode, measured and predicted seconds are printed. Results go to
``benchmarks/results/ae_speed_cpu.json`` with the machine's description.

Threads: ``--threads 1`` by default. With two OpenMP threads on two cores that other processes
also use, every parallel region waits for a descheduled thread and single ops stall for
milliseconds; measured calls then vary by 20x and no time model (nor any measurement) is
meaningful. The model is calibrated under the same thread setting it is evaluated under.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from engine.config import load_spec  # noqa: E402
from engine.estimate.laws.cache import FitCache  # noqa: E402
from engine.estimate.timing import AETimeModel, device_name  # noqa: E402
from engine.models.autoencoder import AutoencoderKL  # noqa: E402
from engine.planner.autoencode import force_mode, format_bytes, plan_autoencoding  # noqa: E402
from engine.plan.aemode import AEMode  # noqa: E402
from engine.runtime.autoencode import decode_frames, encode_frames  # noqa: E402

TARGET = 1.10
RESULTS = REPO_ROOT / "benchmarks" / "results" / "ae_speed_cpu.json"


def _grid(chunks, tiles):
    return [str(AEMode(chunk=k, tile=t)) for k in chunks for t in tiles]


# (vae, direction, frames, height, width, candidate modes)
CASES = [
    ("tiny", "decode", 4, 256, 256, _grid([None, 2, 1], [None, (192, 192), (128, 128)])),
    ("tiny", "decode", 4, 320, 512, _grid([None, 2, 1], [None, (256, 256), (128, 128)])),
    ("tiny", "encode", 4, 320, 512, _grid([None, 1], [None, (256, 256), (128, 128)])),
    ("512", "decode", 2, 128, 128, _grid([None, 1], [None, (96, 96), (64, 64)])),
    ("512", "encode", 2, 128, 128, _grid([None, 1], [None, (64, 64)])),
]


def machine_info() -> dict:
    """Where the numbers came from."""
    return {"platform": platform.platform(), "cpu": device_name("cpu").rsplit(" (", 1)[0],
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


class TraceMemory:
    """Fallback memory model: trace the runtime call itself on fake tensors (exact, slower)."""

    def __init__(self, vae):
        from engine.estimate.tracing.trace import trace_call

        self.vae, self.trace_call, self.memo = vae, trace_call, {}

    def predict(self, direction, frames, height, width, mode):
        key = (direction, frames, height, width, str(mode))
        if key not in self.memo:
            shape = ((frames, 4, height // 8, width // 8) if direction == "decode"
                     else (frames, 3, height, width))
            run = decode_frames if direction == "decode" else encode_frames
            with torch.no_grad():
                res = self.trace_call(lambda t: run(self.vae, t, mode),
                                      torch.empty(shape, device="meta"), device="cpu")
            self.memo[key] = type("Mem", (), {"allocated_bytes": res.peak_bytes,
                                              "allocator_bytes": 0,
                                              "activation_bytes": res.peak_new_bytes})()
        return self.memo[key]


def memory_model(vae, cache):
    """``VAEMemoryModel`` when ``engine/estimate/vae.py`` exists, else the trace fallback."""
    try:
        from engine.estimate.vae import VAEMemoryModel
    except ImportError:
        return TraceMemory(vae), "trace_call of decode_frames/encode_frames (fallback)"
    return (VAEMemoryModel.for_vae(vae, device_type="cpu", dtype=torch.float32, cache=cache),
            "VAEMemoryModel (engine/estimate/vae.py)")


def build(name: str, cache_dir: Path, budget_s: float) -> dict:
    """The VAE (random weights), its calibrated time model and its memory model."""
    torch.manual_seed(0)
    vae = AutoencoderKL(load_spec(name).vae).eval()
    cache = FitCache(cache_dir)
    start = time.perf_counter()
    tm = AETimeModel.calibrate(vae, budget_s=budget_s, cache=cache)
    calibration_s = time.perf_counter() - start
    start = time.perf_counter()
    again = AETimeModel.calibrate(vae, budget_s=budget_s, cache=cache)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    mem, mem_source = memory_model(vae, cache)
    mem_s = time.perf_counter() - start
    print(f"[{name}] calibrated in {calibration_s:.1f} s (reloaded from cache in "
          f"{load_s * 1e3:.1f} ms, identical={again == tm}); memory model ({mem_source}) in "
          f"{mem_s:.1f} s")
    for check in tm.meta.get("holdout", []):
        print(f"[{name}]   hold-out {check['mode']} x{check['frames']}: measured "
              f"{check['measured_s']:.3f} s, predicted {check['predicted_s']:.3f} s")
    return {"vae": vae, "tm": tm, "mem": mem, "mem_source": mem_source,
            "info": {"calibration_s": calibration_s, "cache_load_s": load_s,
                     "memory_model": mem_source, "memory_model_s": mem_s,
                     "time_model": tm.to_dict()}}


def measure(vae, direction: str, frames: int, height: int, width: int, modes: list[str],
            runs: int) -> dict[str, list[float]]:
    """Seconds per mode: round 0 warms every mode up, then ``runs`` interleaved rounds."""
    gen = torch.Generator().manual_seed(0)
    if direction == "decode":
        data = torch.randn(frames, 4, height // 8, width // 8, generator=gen)
        call = lambda mode: decode_frames(vae, data, mode)  # noqa: E731
    else:
        data = torch.rand(frames, 3, height, width, generator=gen) * 2 - 1
        call = lambda mode: encode_frames(vae, data, mode, sample=False)  # noqa: E731
    times: dict[str, list[float]] = {m: [] for m in modes}
    with torch.no_grad():
        for round_ in range(runs + 1):
            for mode in modes:
                start = time.perf_counter()
                out = call(mode)
                elapsed = time.perf_counter() - start
                del out
                if round_:
                    times[mode].append(elapsed)
    return times


def judge(case, models, times) -> dict:
    """Per budget: the planner's choice, its measured time and the fastest fitting measured."""
    _, direction, frames, height, width, modes = case
    tm, mem = models["tm"], models["mem"]
    median = {m: statistics.median(v) for m, v in times.items()}
    fastest_run = {m: min(v) for m, v in times.items()}
    peaks = {m: force_mode(direction, frames, height, width, m, budget_bytes=2 ** 62,
                           resident_bytes=0, memory_model=mem, time_model=tm).peak_bytes
             for m in modes}
    rows = []
    for budget in sorted(set(peaks.values())):
        choice = plan_autoencoding(direction, frames, height, width, budget_bytes=budget,
                                   resident_bytes=0, memory_model=mem, time_model=tm,
                                   candidates=modes)
        fitting = [m for m in modes if peaks[m] <= budget]
        best = min(fitting, key=median.get)
        chosen = str(choice.mode)
        rows.append({"budget_bytes": budget, "chosen": chosen, "chosen_measured_s": median[chosen],
                     "chosen_predicted_s": choice.time_s, "fastest_fitting": best,
                     "fastest_measured_s": median[best], "fitting": len(fitting),
                     "ratio": median[chosen] / median[best],
                     # the same with each mode's fastest run (less sensitive to other load)
                     "ratio_min_runs": fastest_run[chosen] / min(fastest_run[m] for m in fitting)})
    per_mode = {m: {"measured_median_s": median[m], "measured_runs_s": times[m],
                    "predicted_s": tm.predict(direction, frames, height, width, m),
                    "predicted_peak_bytes": peaks[m],
                    "extrapolated_p": tm.extrapolates(direction, frames, height, width, m)}
                for m in modes}
    return {"modes": per_mode, "budgets": rows, "worst_ratio": max(r["ratio"] for r in rows)}


def report(case, result) -> None:
    name, direction, frames, height, width, _ = case
    print(f"\n{name} {direction} {frames}x{height}x{width}")
    print(f"  {'mode':28s} {'measured s':>10s} {'predicted s':>11s} {'pred/meas':>9s} "
          f"{'pred. peak':>11s}")
    for mode, row in sorted(result["modes"].items(), key=lambda kv: kv[1]["measured_median_s"]):
        ratio = row["predicted_s"] / row["measured_median_s"]
        print(f"  {mode:28s} {row['measured_median_s']:10.3f} {row['predicted_s']:11.3f} "
              f"{ratio:9.2f} {format_bytes(row['predicted_peak_bytes']):>11s}")
    for row in result["budgets"]:
        print(f"  budget {format_bytes(row['budget_bytes']):>10s} ({row['fitting']} fit): chose "
              f"{row['chosen']} {row['chosen_measured_s']:.3f} s, fastest fitting "
              f"{row['fastest_fitting']} {row['fastest_measured_s']:.3f} s, "
              f"ratio {row['ratio']:.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3, help="timed rounds after the warm-up")
    parser.add_argument("--calibration-budget", type=float, default=20.0, help="seconds")
    parser.add_argument("--quick", action="store_true", help="tiny VAE only")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="fit cache (default: a fresh temporary directory)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="ae_speed_"))
    cases = [c for c in CASES if not args.quick or c[0] == "tiny"]
    models = {name: build(name, cache_dir, args.calibration_budget)
              for name in dict.fromkeys(c[0] for c in cases)}
    results = []
    for case in cases:
        name, direction, frames, height, width, modes = case
        times = measure(models[name]["vae"], direction, frames, height, width, modes, args.runs)
        result = judge(case, models[name], times)
        report(case, result)
        results.append({"vae": name, "direction": direction, "frames": frames,
                        "height": height, "width": width, **result})
    worst = max(r["worst_ratio"] for r in results)
    payload = {"machine": machine_info(), "target_ratio": TARGET, "runs": args.runs,
               "calibration_budget_s": args.calibration_budget,
               "models": {n: m["info"] for n, m in models.items()}, "cases": results,
               "worst_ratio": worst}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    shown = args.out.relative_to(REPO_ROOT) if args.out.is_relative_to(REPO_ROOT) else args.out
    print(f"\nwrote {shown}")
    print(f"worst_ratio={worst:.3f} target={TARGET:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
