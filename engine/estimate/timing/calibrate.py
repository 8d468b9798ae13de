"""Calibration measurements of the AE time model (see :mod:`engine.estimate.timing.model`).

Short real calls on the device: a ladder of single VAE calls gives ``per_call_s``, ``s(p)`` and
the batch factor ``r(k)`` (:func:`_ladder`, :func:`_fit_direction`); tile blending and chunk
copies are timed directly (:func:`_measure_blend`); a few multi-call runs check the fit
(:func:`_holdout`). torch is imported inside the functions, as in the rest of the time model.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from ...device.host import cpu_name
from .terms import DirectionTiming, loglog

logger = logging.getLogger(__name__)

# Ladder of calibration calls (frames per call, latent side, variant). Main rungs grow one
# frame's side by ~1.5x (p by ~2.25x; a steeper ladder reaches further for the same budget but
# smears the cliff where activations leave the caches), then add frames; variants repeat a p
# with more frames so s(p) sees both ways of filling it, and run only while they are cheap.
_LADDER = ((1, 1, False), (1, 2, False), (1, 4, False), (1, 6, False), (1, 8, False),
           (4, 4, True), (1, 12, False), (1, 16, False), (4, 8, True), (1, 24, False),
           (2, 16, True), (1, 32, False), (4, 16, True), (16, 8, True), (1, 48, False),
           (1, 64, False), (4, 32, True), (1, 96, False), (1, 128, False), (4, 96, False),
           (4, 128, False))
# Of the budget left when each ladder starts; the rest pays for blending, copies and hold-outs.
# Decode gets most: it runs on every frame, encode on one or two.
_BUDGET_SHARE = {"decode": 0.65, "encode": 0.6}


def device_name(device) -> str:
    """A description of ``device`` that identifies its speed: the GPU's name, or the CPU model
    with the thread count torch uses (timings on CPU depend on it as much as on the chip)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        return f"{cpu_name()} ({torch.get_num_threads()} threads)"
    return dev.type


def check_place(vae, device, dtype):
    import torch

    from ...runtime.vae_adapter import module_place

    own_device, own_dtype = module_place(vae)
    device = torch.device(device) if device is not None else (own_device or torch.device("cpu"))
    dtype = dtype if dtype is not None else (own_dtype or torch.float32)
    if own_device is not None and own_device.type != device.type:
        raise ValueError(f"`device` {device} differs from the VAE's device {own_device}; move the "
                         "VAE first (`vae.to(device)`) or leave `device` unset.")
    if own_dtype is not None and own_dtype != dtype:
        raise ValueError(f"`dtype` {dtype} differs from the VAE's parameters ({own_dtype}); cast "
                         "the VAE first (`vae.to(dtype)`) or leave `dtype` unset.")
    return device, dtype


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _timed(fn: Callable[[], Any], device, runs: int, warmup: bool = True) -> float:
    """Fastest of ``runs`` calls, after one untimed warm-up call when ``warmup`` (new shapes pay
    kernel selection and primitive creation once; the runtime pays it once per shape too). The
    minimum, not the median: on a machine shared with other processes they only ever add time,
    and the planner compares modes, so the undisturbed time is the comparable one."""
    if warmup:
        fn()
    times = []
    for _ in range(max(1, runs)):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        del out
    return min(times)


def _latent_channels(vae) -> int:
    params = getattr(vae, "params", None)
    if getattr(params, "embed_dim", None):
        return int(params.embed_dim)
    return int(getattr(getattr(vae, "config", None), "latent_channels", 4) or 4)


def _in_channels(vae) -> int:
    params = getattr(vae, "params", None)
    if getattr(params, "in_channels", None):
        return int(params.in_channels)
    return int(getattr(getattr(vae, "config", None), "in_channels", 3) or 3)


def vae_info(vae, device) -> dict[str, Any]:
    """Downsample factor, channels and the exact FLOP terms ``(a, b)`` of each direction, from
    three fake-tensor traces (two to solve, one to check)."""
    import torch

    from ...runtime.autoencode import decode_frames, encode_frames
    from ...runtime.vae_adapter import downsample_factor
    from ..laws.scaling import fit_scaling_law
    from ..tracing.trace import trace_call

    f, zc, xc = downsample_factor(vae), _latent_channels(vae), _in_channels(vae)
    calls = {"decode": (lambda z: decode_frames(vae, z, "batched"), zc, 1),
             "encode": (lambda x: encode_frames(vae, x, "batched", sample=False), xc, f)}
    flops, out_channels, residual = {}, {}, {}
    with torch.no_grad():
        for direction, (fn, channels, scale) in calls.items():
            samples = []
            for k, h, w in ((1, 4, 4), (1, 8, 8), (2, 4, 8)):
                meta = torch.empty(k, channels, h * scale, w * scale, device="meta")
                res = trace_call(fn, meta, device=device)
                samples.append(({"n": k, "hw": h * w}, float(res.flops)))
                out_channels[direction] = int(res.output_shapes[0][1])
            law = fit_scaling_law(samples[:2], ["n*hw", "n*hw^2"], holdout=samples[2:])
            flops[direction] = (max(law.coefficients[0], 0.0), max(law.coefficients[1], 0.0))
            residual[direction] = law.holdout_max_rel_residual
    out_channels["encode"] *= 2  # tiles blend the posterior moments (mean and log-variance)
    return {"downsample": f, "latent_channels": zc, "in_channels": xc, "flops": flops,
            "out_channels": out_channels, "flops_holdout_rel_err": residual}


def _ladder(run: Callable[[int, int], Callable[[], Any]], flops: Callable[[int, int], float],
            device, budget_s: float, max_p: int) -> list[dict[str, float]]:
    """Time single VAE calls up the ladder of (frames, latent side) until the budget is spent,
    then once more down the ladder, keeping each rung's fastest call."""
    import torch

    points: list[dict[str, float]] = []
    calls: dict[int, Callable[[], Any]] = {}
    spent = 0.0
    for k, side, variant in _LADDER:
        p = k * side * side
        if p > max_p:
            break
        work = flops(k, side * side)
        guess = points[-1]["seconds"] * work / points[-1]["flops"] if points else 0.0
        # cheap calls: warm-up + best of 3; dear ones: one cold call (one-off costs are small
        # next to seconds of compute, and the budget goes further up the ladder instead)
        warmup, runs = (True, 3) if guess < 0.02 * budget_s else (
            (True, 1) if guess < 0.1 * budget_s else (False, 1))
        cost = guess * (runs + warmup + 1)  # + 1: the pass back down
        if variant and (cost > 0.1 * budget_s or spent + cost > budget_s):
            continue
        if len(points) >= 2 and spent + cost > budget_s:
            break
        start = time.perf_counter()
        try:
            calls[len(points)] = run(k, side)
            seconds = _timed(calls[len(points)], device, runs, warmup)
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError on torch >= 2.5
            logger.info("AE calibration stopped at %d frame(s) of %dx%d latents: out of memory",
                        k, side, side)
            calls.pop(len(points), None)
            break
        spent += time.perf_counter() - start
        points.append({"frames": k, "side": side, "p": p, "flops": work, "seconds": seconds})
    # Load from other processes comes and goes over seconds: a second pass in the opposite
    # order gives every rung another chance at a quiet moment, so the curve keeps its shape.
    for index in reversed(range(len(points))):
        again = _timed(calls.pop(index), device, 1, warmup=False)
        points[index]["seconds"] = min(points[index]["seconds"], again)
    return points


def _fit_direction(points: list[dict[str, float]], flop_terms: tuple[float, float],
                   out_channels: int, out_scale: int) -> DirectionTiming:
    """``per_call_s`` from the two smallest calls (same rate assumed); ``s(p)`` from the
    one-frame calls as (time - per_call_s) / FLOPs; the batch factor of ``k`` frames as the
    geometric mean, over the ``p`` where both were measured, of ``s`` of the ``k``-frame call
    over ``s(p)`` (clamped to [0.5, 2] against noise)."""
    if len(points) < 2 or points[0]["frames"] != 1:
        raise RuntimeError("AE calibration timed fewer than two one-frame calls (out of memory "
                           "at the smallest size?); free device memory and calibrate again.")
    one, two = points[0], points[1]
    slope = (two["seconds"] - one["seconds"]) / max(two["flops"] - one["flops"], 1.0)
    per_call = one["seconds"] - max(slope, 0.0) * one["flops"]
    # Noise can put the intercept outside the smallest call; keep some time for its FLOPs.
    per_call = min(max(per_call, 0.0), 0.95 * one["seconds"])

    def rate(pt):
        return max(pt["seconds"] - per_call, 0.05 * pt["seconds"]) / max(pt["flops"], 1.0)
    single = tuple((float(pt["p"]), rate(pt)) for pt in points if pt["frames"] == 1)
    ratios: dict[float, list[float]] = {}
    for pt in points:
        if pt["frames"] > 1 and single[0][0] <= pt["p"] <= single[-1][0]:
            ratios.setdefault(float(pt["frames"]), []).append(
                math.log(rate(pt) / loglog(single, pt["p"])))
    batch = ((1.0, 1.0),) + tuple(
        (k, min(2.0, max(0.5, math.exp(sum(v) / len(v))))) for k, v in sorted(ratios.items()))
    # multi-frame rungs beyond the one-frame range extend s(p), divided by their batch factor
    extra = tuple((float(pt["p"]), rate(pt) / loglog(batch, pt["frames"])) for pt in points
                  if pt["frames"] > 1 and pt["p"] > single[-1][0])
    knots = tuple(sorted(dict(single + extra).items()))
    return DirectionTiming(per_call, knots, flop_terms[0], flop_terms[1], out_channels,
                           out_scale, batch)


def _measure_blend(device, dtype, f: int) -> dict[str, float]:
    """Seconds per element of tile blending and chunk copies, timed on the device's tensors with
    a stand-in decoder that returns a fixed tile (so only the runtime's own work is timed)."""
    import torch

    from ...runtime.tiling import axis_spans, blend_tiles

    spans = axis_spans(32, 16, 4)  # 3 x 3 tiles of 16 latents, as a 256x256 decode with 128 tiles
    tile_px, channels = (16 * f) ** 2, 3
    timings = {}
    for k in (1, 4):
        src = torch.empty(k, 4, 32, 32, device=device, dtype=dtype)
        tile = torch.randn(k, channels, 16 * f, 16 * f, device=device, dtype=dtype)
        dst = torch.empty(k, channels, 32 * f, 32 * f, device=device, dtype=dtype)
        timings[k] = _timed(lambda: blend_tiles(lambda t: tile, src, dst, spans, spans, 1, f),
                            device, 3)
    tiles = len(spans) ** 2
    per_frame = max(timings[4] - timings[1], 0.0) / 3  # addcmul_ work grows with frames
    fixed = max(timings[1] - per_frame, 0.0)           # weight maps: once per tile
    src = torch.randn(4, channels, 32 * f, 32 * f, device=device, dtype=dtype)
    out = torch.empty_like(src)
    copy = _timed(lambda: out.copy_(src), device, 3)
    return {"blend_s_per_elem": per_frame / (tiles * tile_px * channels),
            "weight_s_per_elem": fixed / (tiles * tile_px),
            "copy_s_per_elem": copy / src.numel()}


def _holdout(model: Any, run_mode: Callable[[str, int, int], Callable[[], Any]],
             device, side: int, budget_s: float) -> list[dict[str, Any]]:
    """Time a few multi-call runs the ladder never saw and record the prediction error."""
    f = model.downsample
    px = side * f
    checks = [("per-frame+tile:%dx%d" % (px // 2, px // 2), 2), ("batched", 2), ("chunk:2", 4)]
    out, spent = [], 0.0
    for mode, frames in checks:
        predicted = model.predict("decode", frames, px, px, mode)
        if spent + 2 * predicted > budget_s:
            continue
        start = time.perf_counter()
        measured = _timed(run_mode(mode, frames, side), device, 1)
        spent += time.perf_counter() - start
        out.append({"mode": mode, "frames": frames, "height": px, "width": px,
                    "measured_s": measured, "predicted_s": predicted,
                    "rel_err": predicted / measured - 1.0})
    return out


def measure_and_fit(model_cls: Callable[..., Any], vae, device, dtype, name: str, budget_s: float,
                    max_latent_pixels: int) -> Any:
    """Measure ``vae`` and build the fitted ``model_cls`` (:class:`~.model.AETimeModel`, passed in
    so this module does not import the model that imports it)."""
    import torch

    from ...runtime.autoencode import decode_frames, encode_frames

    start = time.perf_counter()
    info = vae_info(vae, device)
    f, zc, xc = info["downsample"], info["latent_channels"], info["in_channels"]

    def run(direction):
        def make(k, side):
            if direction == "decode":
                z = torch.randn(k, zc, side, side, device=device, dtype=dtype)
                return lambda: decode_frames(vae, z, "batched")
            x = torch.rand(k, xc, side * f, side * f, device=device, dtype=dtype) * 2 - 1
            return lambda: encode_frames(vae, x, "batched", sample=False)
        return make

    fitted, ladders = {}, {}
    with torch.no_grad():
        for direction in ("decode", "encode"):
            a, b = info["flops"][direction]
            # shares of what is left, so tracing time and a slow first rung are paid for
            share = _BUDGET_SHARE[direction] * (budget_s - (time.perf_counter() - start))
            ladders[direction] = _ladder(run(direction), lambda k, hw: k * (a * hw + b * hw * hw),
                                         device, share, max_latent_pixels)
            fitted[direction] = _fit_direction(ladders[direction], (a, b),
                                               info["out_channels"][direction],
                                               f if direction == "decode" else 1)
        blend = _measure_blend(device, dtype, f)
        model = model_cls(fitted["decode"], fitted["encode"], f, **blend, source="measured",
                            device=name, dtype=str(dtype))
        side = max([p["side"] for p in ladders["decode"] if p["frames"] == 1 and p["side"] <= 32]
                   + [2])

        def run_mode(mode, frames, s):
            z = torch.randn(frames, zc, s, s, device=device, dtype=dtype)
            return lambda: decode_frames(vae, z, mode)
        left = budget_s - (time.perf_counter() - start)
        holdout = _holdout(model, run_mode, device, side, max(left, 0.0))
    meta = {"ladders": ladders, "holdout": holdout, "budget_s": budget_s,
            "calibration_s": time.perf_counter() - start, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "flops_holdout_rel_err": info["flops_holdout_rel_err"]}
    logger.info("calibrated AE time model on %s in %.1f s", name, meta["calibration_s"])
    return dataclasses.replace(model, meta=meta)
