"""The planner: minimise predicted time subject to the predicted peak fitting the budget at every
stage; explain the choice. Pure Python over the estimators' numbers.

Example:
    >>> plan = make_plan(load_spec("1024"), 576, 1024, 16, catalog_device("rtx-4090-laptop"))
    >>> print(plan.explain())
"""
from __future__ import annotations

import itertools
import numbers
import time
from collections.abc import Mapping
from dataclasses import replace

from ..device.spec import DeviceSpec, default_reserve, format_bytes
from ..errors import DoesNotFit, InvalidArgument, WrongType
from ..plan.plan import Plan, Rejected, StagePlan, Workload
from ..plan.settings import (Attention, CFGMode, Offload, Precision, Settings, parse_force,
                             reference_settings)
from ..plan.stages import STAGE_NAMES, stage as stage_of
from .calibration import CalibrationStore, corrected
from .fit_ahead import helper_jobs, lead_job, reap, start_helper
from .costs import DeviceTerms, reserved_after, resident_bytes, roofline_seconds, transfer_bytes


# Searched: a fused kernel, which keeps no score matrix: xformers where the probe saw its kernels
# run on this device, PyTorch's SDPA otherwise. On our estimates the naive and query-chunked paths
# never use less memory and are never faster; they stay available via --force.
def searched_attention(device: DeviceSpec) -> Attention:
    return Attention.XFORMERS if device.xformers else Attention.SDPA


def searched_precisions(device: DeviceSpec) -> list[Precision]:
    # fp32 weights under autocast cost twice the weight memory of fp16 at the same speed: searched
    # only when forced (or as part of the reference); a CPU computes in fp32
    if device.kind == "cpu":
        return [Precision.FP32]
    return [Precision.FP16] + ([Precision.BF16] if device.bf16 else [])


def candidate_settings(device: DeviceSpec, forced, perframe_ae: bool) -> list[Settings]:
    """Every point of the plan space the device supports, with forced keys pinned."""
    if forced.reference:
        return [forced.apply(reference_settings(perframe_ae))]
    attention = searched_attention(device)
    combos = itertools.product(searched_precisions(device), CFGMode, Offload)
    out = [forced.apply(Settings(precision=p, spatial_attention=attention, temporal_attention=attention,
                                 cfg=c, offload=o)) for p, c, o in combos]
    return list(dict.fromkeys(out))  # forced keys collapse duplicates


def _check_runs_on(device: DeviceSpec, forced, argument: str) -> None:
    """xformers has no CPU kernels: a forced xformers layer (the reference's spatial attention)
    cannot be planned, let alone run, on a CPU device; say so before any fit is traced."""
    probe = forced.apply(reference_settings(False) if forced.reference else Settings())
    if device.kind == "cpu" and Attention.XFORMERS in (probe.spatial_attention, probe.temporal_attention):
        what = "`reference` (xformers spatial attention)" if forced.reference else "xformers attention"
        raise InvalidArgument(f"`{argument}` {what} needs a CUDA device and this plan is for the CPU; add "
                              "spatial_attention=sdpa (e.g. reference,spatial_attention=sdpa) or plan for "
                              "a card with --gpu.")


def _unet_calls(s: Settings, w: Workload) -> tuple[int, int]:
    """(UNet calls per step, batch of each call)."""
    branches = 2 if w.guidance else 1
    return (1, branches) if s.cfg is CFGMode.BATCHED else (branches, 1)


def _flops_rate(device: DeviceSpec, precision: Precision) -> float | None:
    """fp16 and bf16 run on the tensor cores, and so do autocast's fp16 matmuls."""
    if device.kind == "cpu" or precision is Precision.FP32:
        return device.fp32_flops or device.fp16_flops
    return device.fp16_flops or device.fp32_flops


def make_plan(spec, height: int, width: int, frames: int, device: DeviceSpec, *, force: str | None = None,
              reserve_bytes: int | None = None, steps: int = 50, guidance: bool = True,
              mode: str = "i2v", host_bytes: int | None = None, estimators=None,
              calibrate: bool = True, names: Mapping[str, str | None] | None = None) -> Plan:
    """Choose the fastest predicted settings whose every stage fits ``device`` minus the reserve.

    Args:
        spec: the model spec (``engine.config.load_spec``).
        height, width, frames: the video to generate.
        device: a probed, catalogued or ``--vram`` device.
        force: ``key=value,...`` settings to pin, or ``reference`` (DynamiCrafter's execution),
            combinable: ``reference,ae_decode=batched``. Forced plans are predicted even if they
            do not fit.
        reserve_bytes: memory kept free (default max(1 GiB, 10 %)).
        steps, guidance, mode: the sampling run (``mode``: ``i2v``, ``interp`` or ``loop``).
        host_bytes: host RAM available for offloaded weights (None: not checked).
        estimators: an ``engine.planner.estimators.Estimators`` (built and cached if None).
        calibrate: on a probed device, correct the predictions by what earlier runs measured
            there (:mod:`engine.planner.calibration`).
        names: how the caller's user names the arguments in error messages, e.g. ``{"device":
            "--vram", "reserve_bytes": "--reserve", "height": "--height"}``; None leaves a way out
            unmentioned (the command has no such flag). Default: the Python names.

    Raises:
        WrongType, InvalidArgument: a bad argument, before anything is estimated.
        DoesNotFit: no candidate fits (or the reserve leaves nothing); the message names the
            memory (device memory or, on the CPU, host RAM) and the arguments that would help.
    """
    from .estimators import Estimators

    t0 = time.perf_counter()
    name = _namer(names)
    _check_arguments(spec, height, width, frames, device, steps, reserve_bytes, host_bytes, force, mode, name)
    work = Workload.for_spec(spec, height, width, frames, steps=steps, mode=mode, guidance=guidance)
    forced = parse_force(force, (names or {}).get("force") or "--force")  # its long-standing name
    _check_runs_on(device, forced, (names or {}).get("force") or "--force")
    reserve = default_reserve(device, reserve_bytes)
    budget = device.total_bytes - reserve
    if device.free_bytes is not None:  # a probed device: what other programs hold is not ours
        budget = min(budget, device.free_bytes)
    if budget <= 0:
        raise _no_memory(device, reserve, reserve_bytes is not None, name)
    est = estimators or Estimators.for_spec(spec, device)
    store = CalibrationStore(device, work.config_digest) if calibrate and device.source == "probe" else None
    fitting, rejected = [], []
    candidates = candidate_settings(device, forced, spec.perframe_ae)
    # a cold cache: a helper process fits the VAE and batch-1 UNet laws while this one fits the rest
    jobs = helper_jobs(est, candidates, work, lambda s: _unet_calls(s, work)[1])
    helper = start_helper(est, jobs)
    try:
        if helper is not None and (lead := lead_job(jobs)) is not None:
            _lead_fits(est, candidates[0], work, lead)
        for cand in candidates:
            chosen, stages, reason = evaluate(cand, work, device, budget, est, host_bytes, store)
            (rejected if reason else fitting).append((chosen, stages, reason))
    except BaseException:
        reap(helper, stop=True)
        raise
    finally:
        reap(helper)
        est.fits_done()
    if fitting:
        best, stages, _ = _fastest(fitting)
        chosen_time = sum(x.time_s for x in stages)
        rejected += [(c, st, f"fits, but predicted {sum(x.time_s for x in st):.1f} s vs {chosen_time:.1f} s"
                      + (" (tied; fewer moves/calls preferred)" if sum(x.time_s for x in st)
                         <= chosen_time * (1 + TIE_TOLERANCE) else ""))
                     for c, st, _ in fitting if c is not best]
    elif forced.items:  # a forced plan that does not fit is still predicted and explained
        best, stages, _ = min(rejected, key=lambda e: max(x.peak_bytes for x in e[1]))
    else:
        raise _infeasible(rejected, budget, reserve, device, name)
    return Plan(workload=work, device=device, budget_bytes=budget, reserve_bytes=reserve, settings=best,
                stages=tuple(stages), forced=forced.items,
                rejected=tuple(Rejected(c, r) for c, _, r in rejected[:30] if c is not best),
                planning_ms=(time.perf_counter() - t0) * 1e3,
                assumptions=tuple(est.assumptions()) + _calibration_notes(store, stages))


def _calibration_notes(store, stages) -> tuple[str, ...]:
    """How the plan's stage times were corrected; stages timed by a model measured on this
    device are not rescaled and so not listed."""
    rescaled = {s.name for s in stages if not s.time_measured}
    corrections = {k: c for k, c in (store.stages.items() if store is not None else ()) if k in rescaled}
    if not corrections:
        return ("stage times are roofline lower bounds (marked >=) until a run on this device "
                "calibrates them",)
    runs = max(c.runs for c in corrections.values())
    factors = ", ".join(f"{k} {c.time_text()}" for k, c in corrections.items())
    return (f"stage times corrected by {runs} calibrating run(s) on this device: {factors} "
            "(`engine probe --reset-calibration` drops them)",)


TIE_TOLERANCE = 0.01  # predicted times this close are within the time model's own error


def _preference(s: Settings) -> tuple:
    """Among tied plans: fewer weight moves, fewer UNet calls, fp16 (how the model was run)."""
    return (list(Offload).index(s.offload), s.cfg is not CFGMode.BATCHED, s.precision is not Precision.FP16)


def _fastest(fitting):
    total = lambda e: sum(x.time_s for x in e[1])  # noqa: E731
    fastest = min(total(e) for e in fitting)
    tied = [e for e in fitting if total(e) <= fastest * (1 + TIE_TOLERANCE)]
    return min(tied, key=lambda e: _preference(e[0]))


def _namer(names):
    """``name(argument)``: how messages write an argument (backticked), or None (not the caller's)."""
    names = {} if names is None else dict(names)
    return lambda arg: (f"`{names[arg]}`" if names[arg] else None) if arg in names else f"`{arg}`"


_EXAMPLES = {"height": 320, "width": 512, "frames": 16, "steps": 50}
_AT_LEAST = {"height": 1, "width": 1, "frames": 1, "steps": 1, "reserve_bytes": 0, "host_bytes": 0}
_WAY_OUT = {"frames": "DynamiCrafter models are trained on 16", "steps": "50 is the default",
            "reserve_bytes": "pass 0 to keep nothing free", "host_bytes": "pass None to skip the host RAM check",
            "height": "pass the video's height in pixels, e.g. 320",
            "width": "pass the video's width in pixels, e.g. 512"}


def _check_arguments(spec, height, width, frames, device, steps, reserve_bytes, host_bytes, force, mode,
                     name) -> None:
    """Types and ranges first: one sentence naming the argument, before anything is estimated."""
    if not hasattr(spec, "unet") or not hasattr(spec, "vae"):
        raise WrongType(f"`spec` has type {type(spec).__name__}; pass a model spec: "
                        "engine.load_spec('512') (or a config path).")
    values = {"height": height, "width": width, "frames": frames, "steps": steps,
              "reserve_bytes": reserve_bytes, "host_bytes": host_bytes}
    for arg, value in values.items():
        label = name(arg) or f"`{arg}`"
        if value is None and arg.endswith("_bytes"):
            continue
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise WrongType(f"{label} {value!r} has type {type(value).__name__}; pass an int"
                            + (" (bytes)." if arg.endswith("_bytes") else f", e.g. {_EXAMPLES[arg]}."))
        if value < _AT_LEAST[arg]:
            raise InvalidArgument(f"{label} {value} must be >= {_AT_LEAST[arg]}; {_WAY_OUT[arg]}.")
    if steps > spec.timesteps:
        raise InvalidArgument(f"{name('steps') or '`steps`'} {steps} must be at most {spec.timesteps} "
                              "(the model's training timesteps); 50 is the default.")
    if not isinstance(device, DeviceSpec):
        raise WrongType(f"`device` has type {type(device).__name__}; pass a DeviceSpec: "
                        "catalog_device('rtx-4090'), vram_device('8GiB') or engine.device.probe_device().")
    if force is not None and not isinstance(force, str):
        raise WrongType(f"{name('force') or '`force`'} has type {type(force).__name__}; pass a string such "
                        "as 'cfg=sequential,ae_decode=chunk:4' or 'reference'.")


def _memory_words(device: DeviceSpec) -> str:
    return "host RAM" if device.kind == "cpu" else "device memory"


def _no_memory(device: DeviceSpec, reserve: int, reserve_given: bool, name) -> DoesNotFit:
    """Nothing left to plan in: say whether the reserve, the device's size or its free memory is why."""
    total, memory = format_bytes(device.total_bytes), _memory_words(device)
    if reserve_given and reserve >= device.total_bytes:
        return DoesNotFit(f"{name('reserve_bytes') or 'the reserve'} {format_bytes(reserve)} leaves nothing of "
                          f"the {total} of {memory} on {device.name}; keep less free (below {total}).")
    if reserve >= device.total_bytes:
        where = f" ({name('device')})" if name("device") else ""
        way = f", or pass {name('reserve_bytes')} to keep less free" if name("reserve_bytes") else ""
        return DoesNotFit(f"{device.name} has {total} of {memory}{where}, no more than the default reserve "
                          f"of {format_bytes(reserve)} (max(1 GiB, 10 %)) kept free; plan for a device with "
                          f"more memory{way}.")
    return DoesNotFit(f"only {format_bytes(device.free_bytes or 0)} of the {total} of {memory} on {device.name} "
                      f"is free, less than the {format_bytes(reserve)} reserve; free the memory other "
                      "programs hold, then plan again.")


def _or(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " or " + items[-1] if len(items) > 1 else "".join(items)


def _infeasible(rejected, budget, reserve, device, name) -> DoesNotFit:
    need = min((max(x.peak_bytes for x in stages) for _, stages, _ in rejected), default=0)
    of = f"{format_bytes(device.total_bytes)} of {_memory_words(device)}"
    of += f" less a {format_bytes(reserve)} reserve" if reserve else ", no reserve"
    if device.free_bytes is not None and device.free_bytes < device.total_bytes - reserve:
        of += f", {format_bytes(device.free_bytes)} free"
    ways = [f"more memory ({name('device')})" if name("device") else "",
            f"a smaller {name('reserve_bytes')}" if reserve and name("reserve_bytes") else ""]
    sizes = [n for n in (name("height"), name("width"), name("frames")) if n]
    ways = [w for w in ways + ["a lower " + _or(sizes) if sizes else ""] if w]
    return DoesNotFit(f"the budget {format_bytes(budget)} ({of}) on {device.name} is below the "
                      f"{format_bytes(need)} the smallest plan needs" + (f"; use {_or(ways)}." if ways else "."))


def _stage_work(name, s: Settings, w: Workload, est, budget_left: int, resident: int):
    """A stage's :class:`~engine.planner.estimators.StageWork`: activation bytes, FLOPs, bytes
    moved, allocator bytes and, for the VAE stages, the chosen mode and the AE time model's time
    (``time_s`` None where the roofline times the stage)."""
    batch = _unet_calls(s, w)[1]
    if name in ("vae_encode", "vae_decode"):
        direction = "encode" if name == "vae_encode" else "decode"
        frames = w.encoded_frames(s) if direction == "encode" else w.frames
        forced = getattr(s, stage_of(name).ae_setting)
        return est.autoencode(direction, frames, w.height, w.width, s.precision.value, forced=forced,
                              budget_bytes=budget_left, resident_bytes=resident)
    return est.stage(name, height=w.height, width=w.width, frames=w.frames, precision=s.precision.value,
                     attention=s.attention, cfg_batch=batch, guidance=w.guidance)


def _lead_fits(est, s: Settings, w: Workload, lead) -> None:
    """With a helper: the first candidate's encoders, then the UNet regime the helper would reach
    last (:func:`~engine.planner.fit_ahead.lead_job`), then the search (VAE first) as usual."""
    batch = _unet_calls(s, w)[1]
    for name in ("text_encode", "image_encode"):
        est.stage(name, height=w.height, width=w.width, frames=w.frames, precision=s.precision.value,
                  attention=s.attention, cfg_batch=batch, guidance=w.guidance)
    lead[1]()


def _model_calls(name: str, unet_calls: int, mode, s: Settings, w: Workload, downsample: int) -> int:
    """Model calls of a stage: the UNet's for the denoise, the VAE's of the AE mode, else one."""
    if mode is None:
        return unet_calls
    from ..estimate.timing.layout import call_layout  # torch-free

    frames = w.encoded_frames(s) if name == "vae_encode" else w.frames
    return call_layout(mode, frames, w.height, w.width, downsample).calls


def evaluate(s: Settings, w: Workload, device: DeviceSpec, budget: int, est, host_bytes, store=None):
    """Predict every stage of candidate ``s``; returns (settings with AE modes, stages, reason or None)."""
    weights = est.weights(s.precision.value)
    terms: DeviceTerms = est.device_terms()
    calls, _ = _unet_calls(s, w)
    unet_calls = calls * w.steps
    block_res = est.block_resident_bytes(s.precision.value) if s.offload is Offload.BLOCK else 0
    carried = est.carried_bytes(w)
    prev_reserved = prev_live = 0
    stages, reason, modes = [], None, {}
    for name in STAGE_NAMES:
        weights_on = resident_bytes(name, weights, s.offload, block_res)
        # DynamiCrafter's weights require grad: autocast keeps fp16 copies of them (see estimators)
        cache = (est.autocast_cache_bytes() if s.autocast_weight_cache and s.precision is Precision.FP32_AUTOCAST
                 and device.kind != "cpu" and name in ("denoise", "vae_decode") else 0)  # no CPU autocast
        resident = weights_on + carried + cache
        cached_free = 0 if s.empty_cache else max(0, prev_reserved - prev_live)
        left = budget - terms.cuda_context_bytes - cached_free
        work = _stage_work(name, s, w, est, left, resident)
        act, mode, alloc_extra = work.activation_bytes, work.mode, work.allocator_bytes
        allocated = resident + act
        reserved = reserved_after(allocated + alloc_extra, prev_reserved, prev_live, s.empty_cache)
        peak = terms.cuda_context_bytes + reserved
        n = unet_calls if name == "denoise" else 1
        t = work.time_s if work.time_s is not None else n * roofline_seconds(
            work.flops, work.bytes_moved, _flops_rate(device, s.precision), device.mem_bandwidth)
        moving = transfer_bytes(name, weights, s.offload, unet_calls) / (device.link_bandwidth or float("inf"))
        # block offload prefetches the next block on a side stream: copies overlap the compute
        t = max(t, moving) if (s.offload is Offload.BLOCK and name == "denoise") else t + moving
        if mode is not None:
            modes[stage_of(name).ae_setting] = mode
        note = f"x{n} calls" if n > 1 else (str(mode) if mode is not None else "")
        stage = corrected(StagePlan(name, peak, allocated, t, {
            "cuda_context": terms.cuda_context_bytes, "weights": weights_on, "autocast_cache": cache,
            "carried": carried, "activations": act, "cached_blocks": reserved - allocated - alloc_extra,
            "allocator": alloc_extra}, note, calls=_model_calls(name, n, mode, s, w, est.spec.vae.downsample_factor),
            fixed_s=work.overhead_s, time_measured=work.time_measured),
            store.correction(name) if store else None)
        stages.append(stage)
        if reason is None and stage.peak_bytes > budget:
            reason = f"{name} needs {format_bytes(stage.peak_bytes)} > budget {format_bytes(budget)}"
        prev_reserved, prev_live = reserved, resident
    if reason is None and s.offload is not Offload.NONE and host_bytes is not None and sum(weights.values()) > host_bytes:
        reason = f"offload needs {format_bytes(sum(weights.values()))} of host RAM > {format_bytes(host_bytes)} free"
    return replace(s, **modes), stages, reason
