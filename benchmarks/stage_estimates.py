"""Held-out check and timings of the non-VAE stage estimates (``engine.estimate.unet``).

    python benchmarks/stage_estimates.py                 # all three configs, fresh fit cache
    python benchmarks/stage_estimates.py --configs 512   # one config

For every config at its default resolution and 16 frames, each stage family is fitted from its
two small-shape traces (cold, into a fresh cache directory, timed) and its estimate is compared
with a direct fake trace of the same call at the real shape (``trace_call``, the held-out check).
Then a fresh estimator on the warm cache is timed per estimate, and a planning sweep over the 1024
config (every precision, attention backend and CFG batch) is timed in a fresh Python process.
Writes ``benchmarks/results/stage_estimates.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from engine.config import load_spec  # noqa: E402
from engine.estimate import FitCache, trace_call  # noqa: E402
from engine.estimate.unet.modules import (attention_family, build_stage_modules,  # noqa: E402
                                          precision_of, sdpa_kernel, stage_call,
                                          use_attention)
from engine.estimate.tracing.log import emulated_autocast  # noqa: E402
from engine.estimate.unet.estimator import StageEstimator  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "stage_estimates.json"
# (precision, attention, CFG batches): the reference run first.
DENOISE_FAMILIES = [
    ("fp32-autocast", "xformers/naive", (1, 2)),
    ("fp32-autocast", "naive", (1, 2)),
    ("fp32-autocast", "sdpa", (1, 2)),
    ("fp16", "sdpa", (1, 2)),
    ("fp16", "naive", (1, 2)),
    ("fp16", "xformers", (1,)),
    ("fp16", "chunked:1024", (1,)),
]
CPU_FAMILIES = [("fp32", "sdpa", (1,)), ("fp32", "naive", (1,))]
ENCODER_PRECISIONS = ("fp32-autocast", "fp16")
_FIELDS = (("activation_bytes", "peak_new_bytes"), ("retained_bytes", "retained_bytes"),
           ("flops", "flops"), ("bytes_moved", "bytes_moved"))

SWEEP = """
import json, sys, time
t0 = time.perf_counter()
from engine.config import load_spec
from engine.estimate import FitCache
from engine.estimate.unet.estimator import StageEstimator
t1 = time.perf_counter()
families = json.loads(sys.argv[2])
est = StageEstimator(load_spec("1024"), "cuda", cache=FitCache(sys.argv[1]))
n = 0
for precision in ("fp32-autocast", "fp16", "bf16"):
    est.component_weight_bytes(precision)
    for stage in ("text_encode", "image_encode"):
        for b in (1, 2):
            est.estimate(stage, height=576, width=1024, precision=precision, cfg_batch=b); n += 1
for precision, attention, batches in families:
    for b in batches:
        est.estimate("denoise", height=576, width=1024, frames=16, precision=precision,
                     attention=attention, cfg_batch=b); n += 1
t2 = time.perf_counter()
print(t1 - t0, t2 - t1, n, len(est.fit_seconds))
"""


def direct_trace(spec, stage: str, shape: dict, precision: str, attention: str, device: str):
    """A plain ``trace_call`` of one stage call at ``shape`` (the held-out reference)."""
    prec = precision_of(precision)
    mods = build_stage_modules(spec, stage, prec.weight_dtype)
    fn, args = stage_call(stage, mods, shape, prec.act_dtype)
    kinds = attention_family(attention, device)

    def call(*a):
        if prec.autocast_dtype is None:
            return fn(*a)
        with emulated_autocast(device, prec.autocast_dtype):
            return fn(*a)

    with torch.no_grad(), use_attention(mods[0], kinds):
        return trace_call(call, *args, device=device, sdpa_backend=sdpa_kernel(kinds))


def compare(est, ref) -> dict:
    row = {}
    for ours, theirs in _FIELDS:
        p, d = getattr(est, ours), getattr(ref, theirs)
        row[ours] = {"predicted": p, "direct": d, "rel_error": (p - d) / d if d else 0.0}
    row["terms"] = dict(est.terms)
    row["weights_bytes"] = dict(est.weights_bytes)
    return row


def check_config(name: str, cache: FitCache, device: str, families) -> list[dict]:
    spec = load_spec(name)
    est = StageEstimator(spec, device, cache=cache)
    h, w = spec.default_height_width
    rows = []
    for precision, attention, batches in families:
        for b in batches:
            before = dict(est.fit_seconds)
            pred = est.estimate("denoise", height=h, width=w, frames=16, precision=precision,
                                attention=attention, cfg_batch=b)
            fit = {k: v for k, v in est.fit_seconds.items() if k not in before}
            start = time.perf_counter()
            ref = direct_trace(spec, "denoise", {"b": b, "f": 16, "h": h // 8, "w": w // 8},
                               precision, attention, device)
            rows.append({"config": name, "stage": "denoise", "device": device,
                         "precision": precision, "attention": attention, "cfg_batch": b,
                         "height": h, "width": w, "frames": 16, "fit_seconds": fit,
                         "direct_trace_seconds": time.perf_counter() - start,
                         **compare(pred, ref)})
            print(f"{name} {device} denoise {precision} {attention} b={b}: "
                  f"{rows[-1]['activation_bytes']['rel_error']:+.2e}", flush=True)
    return rows


def check_encoders(name: str, cache: FitCache) -> list[dict]:
    spec = load_spec(name)
    est = StageEstimator(spec, "cuda", cache=cache)
    h, w = spec.default_height_width
    rows = []
    for precision in ENCODER_PRECISIONS:
        for stage in ("text_encode", "image_encode"):
            for b in (1, 2):
                before = dict(est.fit_seconds)
                pred = est.estimate(stage, height=h, width=w, precision=precision, cfg_batch=b)
                fit = {k: v for k, v in est.fit_seconds.items() if k not in before}
                ref = direct_trace(spec, stage, {"b": b, "h": h, "w": w}, precision, "sdpa", "cuda")
                rows.append({"config": name, "stage": stage, "device": "cuda",
                             "precision": precision, "cfg_batch": b, "height": h, "width": w,
                             "fit_seconds": fit, **compare(pred, ref)})
    return rows


def warm_timings(cache: FitCache) -> dict:
    spec = load_spec("1024")
    start = time.perf_counter()
    est = StageEstimator(spec, "cuda", cache=cache)
    est.estimate("denoise", height=576, width=1024, precision="fp16", attention="sdpa")
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(200):
        est.estimate("denoise", height=576, width=1024, precision="fp16", attention="sdpa",
                     cfg_batch=2)
    per = (time.perf_counter() - start) / 200
    # Every fitted family, bf16 too (it shares fp16's fits), and batch 3 (the batch >= 2 fits).
    fams = [(p, a, (*bs, 3) if 2 in bs else bs) for p, a, bs in DENOISE_FAMILIES]
    fams += [("bf16", a, bs) for p, a, bs in fams if p == "fp16"]
    out = subprocess.run([sys.executable, "-c", SWEEP, str(cache.root), json.dumps(fams)],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    return {"first_estimate_fresh_estimator_s": first, "warm_estimate_s": per,
            "fresh_process_import_s": float(out[0]), "fresh_process_sweep_s": float(out[1]),
            "fresh_process_sweep_estimates": int(out[2]),
            "fresh_process_cold_fits": int(out[3])}


def summarise(rows: list[dict]) -> dict:
    worst: dict[str, float] = {}
    for r in rows:
        key = f"{r['stage']}/{r['device']}/{r['precision']}/{r.get('attention', '-')}"
        worst[key] = max(worst.get(key, 0.0), abs(r["activation_bytes"]["rel_error"]),
                         abs(r["flops"]["rel_error"]), abs(r["bytes_moved"]["rel_error"]))
    fits = {k: v for r in rows for k, v in r["fit_seconds"].items()}
    return {"max_abs_rel_error_by_family": worst, "cold_fit_seconds": fits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["256", "512", "1024"])
    parser.add_argument("--cache-dir", default=None, help="fit cache (default: a fresh temp dir)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU device-type checks")
    parser.add_argument("--timings-only", action="store_true",
                        help="only redo the warm timings (needs --cache-dir with the fits)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cache = FitCache(args.cache_dir or tempfile.mkdtemp(prefix="stage-fits-"))
    if args.timings_only:
        result = json.loads(RESULTS.read_text())
        result["timings"] = warm_timings(cache)
        RESULTS.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["timings"], indent=1))
        return
    rows = []
    for name in args.configs:
        rows += check_config(name, cache, "cuda", DENOISE_FAMILIES)
        rows += check_encoders(name, cache)
    if not args.no_cpu:
        rows += check_config(args.configs[-1], cache, "cpu", CPU_FAMILIES)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
              "summary": summarise(rows), "timings": warm_timings(cache), "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(json.dumps({"summary": result["summary"], "timings": result["timings"]}, indent=1))


if __name__ == "__main__":
    main()
