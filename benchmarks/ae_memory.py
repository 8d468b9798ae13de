"""Real VAE encode/decode peaks vs. our graph-fitted predictions (and ComfyUI's SD-VAE constants).

    python benchmarks/ae_memory.py --quick          # < 5 min on 2 CPU cores
    python benchmarks/ae_memory.py                  # the full grid, as far as this machine allows
    python benchmarks/ae_memory.py --holdout        # fake-trace hold-out table of the laws only

Every row runs in a FRESH process (``python benchmarks/ae_memory.py --child ...``), so the
allocator and the resident-set baseline are clean. Two VAEs are measured: the tiny config's
(``engine/configs/tiny.yaml``) and the real-width one (``load_spec('512').vae``, random weights,
fp32).

What is compared (the honest pair): the predicted ``activation_bytes + workspace_bytes`` of
:class:`engine.estimate.vae.VAEMemoryModel` against the measured peak of NEW bytes during the call:

* CPU: the allocator-level peak from the profiler's memory records
  (:func:`engine.estimate.measure_cpu_peak_bytes`); the process peak RSS (``ru_maxrss``) and its
  rise over the RSS at the call's start are reported alongside (they include the profiler, the
  libraries' own buffers and glibc's caching, so they are context, not the target);
* CUDA (only where a GPU exists): ``max_memory_allocated`` / ``max_memory_reserved`` after
  ``reset_peak_memory_stats``, minus the allocation at the start.

The anchor: ComfyUI's SD-VAE estimate for the same call, ``2178 * h * w * 64 * dtype_bytes`` per
decoded frame (``h, w`` latent) and ``1767 * H * W * dtype_bytes`` per encoded frame, times the
frames in flight (ComfyUI batches all frames of a call: ``k`` here), on the tile's size when tiled.

Rows whose predicted allocation exceeds ``--ram-fraction`` of the available RAM, or whose
predicted time (FLOPs law / measured throughput) exceeds ``--max-row-seconds``, are skipped and
listed as such. The run ENDS with one line ``median_error=X max_error=Y`` (fractions, allocator
level, our predictions, measured rows). Results go to ``benchmarks/results/ae_memory_<device>``
``.json`` and ``.csv``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from report_rows import mib, print_memory_row  # noqa: E402  (same folder)

RESULTS = REPO_ROOT / "benchmarks" / "results"
CONFIGS = ("tiny", "512")
SIZES = ((256, 256), (320, 512), (576, 1024))
FRAMES = (1, 2, 4, 8, 16)
MODES = ("batched", "per-frame", "chunk:4", "tile:256x256")
DIRECTIONS = ("decode", "encode")
COMFY_DECODE, COMFY_ENCODE = 2178, 1767  # ComfyUI comfy/sd.py, SD/SDXL/Flux-style KL-f8 VAE

# The --quick subset: tiny and real-width at 256x256 and 320x512, several modes, both
# directions; real-width rows are few because one real-width 320x512 decode takes ~20 s here.
QUICK = (
    ("tiny", "decode", 256, 256, 4, "batched"), ("tiny", "decode", 256, 256, 4, "per-frame"),
    ("tiny", "decode", 256, 256, 4, "chunk:2"), ("tiny", "decode", 256, 256, 4, "tile:128x128"),
    ("tiny", "encode", 256, 256, 4, "batched"), ("tiny", "encode", 256, 256, 4, "per-frame"),
    ("tiny", "encode", 256, 256, 4, "chunk:2+tile:128x128"),
    ("tiny", "decode", 320, 512, 2, "tile:256x256"), ("tiny", "encode", 320, 512, 2, "chunk:1"),
    ("tiny", "decode", 320, 512, 3, "chunk:2"),
    ("512", "decode", 256, 256, 2, "batched"), ("512", "decode", 256, 256, 2, "per-frame"),
    ("512", "encode", 256, 256, 2, "batched"), ("512", "encode", 256, 256, 2, "per-frame"),
    ("512", "decode", 320, 512, 1, "batched"), ("512", "encode", 320, 512, 1, "tile:256x256"),
    # the brief's worst case: skipped on small machines (RAM) and slow ones (time)
    ("512", "decode", 576, 1024, 16, "batched"),
)


# ---------------------------------------------------------------- child: one real call
def vae_params(config: str):
    from engine.config import load_spec
    return load_spec(config).vae


def child(spec: dict) -> dict:
    """Build the VAE, warm up, then measure one call; returns the measurements."""
    import resource

    from engine.estimate import measure_cpu_peak_bytes
    from engine.models.autoencoder import AutoencoderKL
    from engine.runtime.autoencode import decode_frames, encode_frames

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    vae = AutoencoderKL(vae_params(spec["config"])).eval().to(device)
    f = vae.params.downsample_factor
    n, h, w = spec["frames"], spec["height"], spec["width"]
    if spec["direction"] == "decode":
        x = torch.randn(n, vae.params.embed_dim, h // f, w // f, device=device)
        small = torch.randn(1, vae.params.embed_dim, 8, 8, device=device)
        run = decode_frames
    else:
        x = torch.randn(n, vae.params.in_channels, h, w, device=device)
        small = torch.randn(1, vae.params.in_channels, 64, 64, device=device)
        run = encode_frames
    with torch.no_grad():
        # One-time lazies (oneDNN, the profiler's start-up) are not part of the call's cost.
        run(vae, small, "batched")
        if device.type == "cpu":
            measure_cpu_peak_bytes(lambda: run(vae, small, "batched"))
        out = {"rss_before": _rss_now(), "maxrss_before": _maxrss(resource)}
        start = time.perf_counter()
        if device.type == "cuda":
            out.update(_measure_cuda(lambda: run(vae, x, spec["mode"]), device))
        else:
            out["measured_bytes"] = measure_cpu_peak_bytes(lambda: run(vae, x, spec["mode"]))
        out["seconds"] = time.perf_counter() - start
    out["maxrss_after"] = _maxrss(resource)
    out["rss_delta"] = max(0, out["maxrss_after"] - out["rss_before"])
    return out


def _maxrss(resource) -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _rss_now() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _measure_cuda(fn, device) -> dict:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    start_reserved = torch.cuda.memory_reserved(device)
    result = fn()
    torch.cuda.synchronize(device)
    del result
    return {"measured_bytes": torch.cuda.max_memory_allocated(device) - start,
            "measured_reserved_bytes": torch.cuda.max_memory_reserved(device) - start_reserved}


# ---------------------------------------------------------------- parent: grid and table
def machine_info(device: str) -> dict:
    """Where the numbers came from."""
    from engine.device.host import cpu_name

    cpu = cpu_name()
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    return {"platform": platform.platform(), "cpu_model": cpu, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": name}


def available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil
    return int(psutil.virtual_memory().available)


def comfy_bytes(direction: str, height: int, width: int, frames_in_flight: int, f: int,
                dtype_bytes: int) -> int:
    """ComfyUI's SD-VAE memory estimate for one call of ``frames_in_flight`` frames."""
    if direction == "decode":
        return COMFY_DECODE * (height // f) * (width // f) * 64 * dtype_bytes * frames_in_flight
    return COMFY_ENCODE * height * width * dtype_bytes * frames_in_flight


def call_extent(model, direction: str, frames: int, height: int, width: int, mode: str):
    """Frames in flight and pixel size of ONE VAE call of the row (a tile when tiled)."""
    from engine.estimate.vae.shapes import classify_call
    from engine.plan.aemode import AEMode
    f = model.factor
    point = classify_call(frames, height // f, width // f, AEMode.parse(mode), f)
    th, tw = point.call_lat
    return point.features["k"], th * f, tw * f


def grid(quick: bool) -> list[tuple]:
    if quick:
        return list(QUICK)
    rows = []
    for config in CONFIGS:
        for (h, w) in SIZES:
            for n in FRAMES:
                for mode in MODES:
                    for direction in DIRECTIONS:
                        rows.append((config, direction, h, w, n, mode))
    return rows


def build_models(device: str, threads: int) -> dict:
    """One fitted memory model per config, for the children's thread count (oneDNN's choice
    of kernel for small convolutions depends on it)."""
    from engine.estimate.vae import VAEMemoryModel
    from engine.models.autoencoder import AutoencoderKL
    torch.set_num_threads(threads)
    models = {}
    for config in CONFIGS:
        with torch.device("meta"):
            vae = AutoencoderKL(vae_params(config))
        start = time.perf_counter()
        models[config] = (VAEMemoryModel.for_vae(vae, device_type=device), vae)
        sources = {v["source"] for v in models[config][0].report.values()}
        print(f"# {config}: memory model ready in {time.perf_counter() - start:.2f} s "
              f"({'/'.join(sorted(sources))})", flush=True)
    return models


def run_child(spec: dict, timeout: float, script: str | Path = __file__) -> dict:
    """Run ``script --child SPEC`` in a fresh process; its last JSON line, with a status."""
    cmd = [sys.executable, str(Path(script).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"status": f"error: timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"error: {tail[:200]}"}
    return {"status": "measured", **json.loads(lines[-1])}


def measure_row(row: tuple, models: dict, args, budget: dict) -> dict:
    """Predict, decide whether to skip, and measure one grid row in a fresh process."""
    config, direction, h, w, n, mode = row
    model, _ = models[config]
    pred = model.predict(direction, n, h, w, mode)
    flops = model.flops(direction, n, h, w, mode)
    k, th, tw = call_extent(model, direction, n, h, w, mode)
    comfy = comfy_bytes(direction, th, tw, k, model.factor, model.dtype.itemsize)
    out = {"config": config, "direction": direction, "size": f"{h}x{w}x{n}", "mode": mode,
           "predicted_bytes": pred.peak_new_bytes, "predicted_activation_bytes":
           pred.activation_bytes, "predicted_workspace_bytes": pred.workspace_bytes,
           "predicted_allocated_bytes": pred.allocated_bytes, "peak_phase": pred.peak_phase,
           "predicted_flops": flops, "comfy_bytes": comfy}
    limit = args.ram_fraction * available_ram()
    rate = budget.get(config, args.gflops * 1e9)
    if pred.allocated_bytes > limit:
        out["status"] = (f"skipped: predicted {pred.allocated_bytes / 2**30:.1f} GiB > "
                         f"{args.ram_fraction:.0%} of available RAM ({limit / 2**30:.1f} GiB)")
        return out
    if flops / rate > args.max_row_seconds:
        out["status"] = (f"skipped: predicted {flops / rate:.0f} s > --max-row-seconds "
                         f"{args.max_row_seconds:.0f}")
        return out
    spec = {"config": config, "direction": direction, "height": h, "width": w, "frames": n,
            "mode": mode, "threads": args.threads, "device": args.device}
    out.update(run_child(spec, timeout=max(120.0, 20 * flops / rate)))
    if out["status"] == "measured":
        real = out["measured_bytes"]
        out["rel_error"] = (pred.peak_new_bytes - real) / real
        out["comfy_rel_error"] = (comfy - real) / real
        if out["seconds"] > 1.0:  # a throughput sample for the time-based skips
            budget[config] = flops / out["seconds"]
    return out


def print_row(r: dict) -> None:
    extra = (f"  comfy {mib(r['comfy_bytes'])} MiB (err {r['comfy_rel_error']:+.3f})  rss+ "
             f"{mib(r['rss_delta'])} MiB  peak@{r['peak_phase']}" if r["status"] == "measured" else "")
    print_memory_row(f"{r['config']:>4} {r['direction']:6} {r['size']:>13} {r['mode']:22}", r, extra)


def write_results(rows: list[dict], info: dict, device: str, summary: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"ae_memory_{device}"
    with open(stem.with_suffix(".json"), "w", encoding="utf-8") as fh:
        json.dump({"machine": info, "summary": summary, "rows": rows}, fh, indent=1)
    fields = ["config", "direction", "size", "mode", "status", "predicted_bytes",
              "measured_bytes", "rel_error", "comfy_bytes", "comfy_rel_error",
              "predicted_activation_bytes", "predicted_workspace_bytes",
              "predicted_allocated_bytes", "measured_reserved_bytes", "rss_before",
              "maxrss_after", "rss_delta", "seconds", "predicted_flops", "peak_phase",
              *info]
    with open(stem.with_suffix(".csv"), "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**info, **row})


def holdout(device: str, threads: int) -> None:
    """Laws vs. direct fake traces at large shapes (no real runs): the fit's held-out error."""
    models = build_models(device, threads)
    shapes = [("decode", 16, 576, 1024, m) for m in MODES + ("chunk:2+tile:512x512",)]
    shapes += [("encode", 16, 576, 1024, m) for m in MODES + ("chunk:2+tile:512x512",)]
    shapes += [(d, 2, 1152, 2048, "batched") for d in DIRECTIONS]
    shapes += [(d, 16, 320, 512, "chunk:3") for d in DIRECTIONS]
    shapes += [(d, 3, 576, 1024, "chunk:2") for d in DIRECTIONS]  # one full chunk, one smaller
    for config, (model, _) in models.items():
        worst = 0.0
        for direction, n, h, w, mode in shapes:
            pred = model.predict(direction, n, h, w, mode)
            traced = model.trace(direction, n, h, w, mode)
            err = (pred.peak_new_bytes - traced.peak_new_bytes) / traced.peak_new_bytes
            flop_err = (model.flops(direction, n, h, w, mode) - traced.flops) / traced.flops
            worst = max(worst, abs(err))
            print(f"{config:>4} {direction:6} {h}x{w}x{n:<3} {mode:22} pred "
                  f"{pred.peak_new_bytes / 2**20:10.1f} MiB  traced "
                  f"{traced.peak_new_bytes / 2**20:10.1f} MiB  err {err:+.5f}  flops err "
                  f"{flop_err:+.1e}  peak@{pred.peak_phase}", flush=True)
        print(f"# {config}: max held-out error {worst:.5f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the < 5 min subset")
    parser.add_argument("--holdout", action="store_true", help="laws vs fake traces only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per child (1: considerate on shared machines)")
    parser.add_argument("--ram-fraction", type=float, default=0.4)
    parser.add_argument("--max-row-seconds", type=float, default=180.0)
    parser.add_argument("--gflops", type=float, default=20.0,
                        help="throughput guess before the first measured row")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.holdout:
        holdout(args.device, args.threads)
        return
    info = {**machine_info(args.device), "torch_threads": args.threads}
    models = build_models(args.device, args.threads)
    rows, budget = [], {}
    for row in grid(args.quick):
        rows.append(measure_row(row, models, args, budget))
        print_row(rows[-1])
    summary = summarize(rows)
    write_results(rows, info, args.device, summary)
    for config, part in summary["by_config"].items():
        print(f"# {config}: {part['measured']} measured; ours median |err| "
              f"{part['median_error']:.4f} max {part['max_error']:.4f}; ComfyUI constants "
              f"signed err {part['comfy_min_error']:+.3f}..{part['comfy_max_error']:+.3f}",
              flush=True)
    print(f"# {summary['measured']} measured, {summary['skipped']} skipped, {summary['errors']} "
          "errors", flush=True)
    print(f"median_error={summary['median_error']:.4f} max_error={summary['max_error']:.4f}")


def summarize(rows: list[dict]) -> dict:
    """Error statistics over the measured rows, overall and per config."""
    def stats(done: list[dict]) -> dict:
        ours = [abs(r["rel_error"]) for r in done] or [float("nan")]
        comfy = [r["comfy_rel_error"] for r in done] or [float("nan")]
        return {"measured": len(done), "median_error": statistics.median(ours),
                "max_error": max(ours), "comfy_median_abs_error":
                statistics.median(abs(c) for c in comfy),
                "comfy_min_error": min(comfy), "comfy_max_error": max(comfy)}
    done = [r for r in rows if r["status"] == "measured"]
    out = stats(done)
    out.update(skipped=sum(r["status"].startswith("skipped") for r in rows),
               errors=sum(r["status"].startswith("error") for r in rows),
               by_config={c: stats([r for r in done if r["config"] == c])
                          for c in dict.fromkeys(r["config"] for r in done)})
    return out


if __name__ == "__main__":
    main()
