"""The minimal calls a calibrating run times: each stage's model called as the run called it, at
its smallest input, so calibration can tell a call's fixed cost from the part that grows with size
(:mod:`engine.planner.calibration`).

"As the run called it" matters: a batched-CFG step calls the UNet on two or three conditionings at
once and a chunked decode calls the VAE on several frames, and their fixed cost is larger than a
batch-1, one-frame call's. Timing a smaller call than the run's under-counts the fixed part, and
the run's time beyond it, scaled to a larger size, over-predicts there.
"""
from __future__ import annotations

import logging
import math
import os
import sys

import torch

from ..errors import InvalidArgument

from .conditioning import guided, unet_call

log = logging.getLogger(__name__)


def time_minimal_calls(model, run, opts, conds, x: torch.Tensor, frames: torch.Tensor, flat: torch.Tensor) -> None:
    """Time one guided denoising step and one VAE call each way at the smallest latent the UNet
    halves down to, with the run's CFG batching and frames per VAE call (``frames``: the frames
    the run encoded; ``flat``: the latents it decoded)."""
    spec, settings = model.spec, run.settings
    side = 2 ** (len(spec.unet.channel_mult) - 1)
    pixels = side * spec.vae.downsample_factor
    small = tuple(None if c is None else {**c, "c_concat": c["c_concat"][..., :side, :side]} for c in conds)
    denoiser = guided(unet_call(model), small, opts, settings)
    x_small, t = x[..., :side, :side], torch.full((x.shape[0],), 1, device=x.device, dtype=torch.long)
    run.time_minimal_call("denoise", lambda: denoiser(x_small, t), calls=denoiser.calls_per_step)
    vae = model.first_stage_model
    encode_k, decode_k = _frames_per_vae_call(settings, frames, flat)
    run.time_minimal_call("vae_encode", lambda: vae.encode(frames[:encode_k, :, :pixels, :pixels]))
    run.time_minimal_call("vae_decode", lambda: vae.decode(flat[:decode_k, :, :side, :side]))


def _frames_per_vae_call(settings, frames: torch.Tensor, flat: torch.Tensor) -> tuple[int, int]:
    """Frames in each of the run's encode and decode calls (``frames``: what it encoded; ``flat``:
    the latents it decoded)."""
    return (settings.ae_encode.frames_per_call(frames.shape[0]),
            settings.ae_decode.frames_per_call(flat.shape[0]))


# Of the first calibrating run on a device, for timing its VAE: on this project's 2-core CPU the
# tiny VAE's ladder climbs to 1024 latent pixels a call in 4 s and 4096 in 8 s (``engine probe
# --calibrate`` spends 20 s); a card climbs the whole ladder in less.
VAE_TIMING_BUDGET_S = 6.0
VAE_TIMING_ENV = "ENGINE_VAE_TIMING_S"


def vae_timing_budget_s() -> float:
    """Seconds the first calibrating run on a device spends timing its VAE: ``$ENGINE_VAE_TIMING_S``
    if set (0 turns it off), else :data:`VAE_TIMING_BUDGET_S`. Read before the run starts, so a bad
    value is refused before any work."""
    text = os.environ.get(VAE_TIMING_ENV, "").strip()
    if not text:
        return VAE_TIMING_BUDGET_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidArgument(f"`{VAE_TIMING_ENV}` must be a number of seconds (0 turns the VAE timing "
                              f"off), not {text!r}; set it so or unset it.")
    return seconds


def measure_vae_speed(model, run, budget_s: float, frames: torch.Tensor, flat: torch.Tensor,
                      announce: bool = False) -> bool:
    """The first calibrating run on a device times its VAE at many sizes, as ``engine probe
    --calibrate`` does (:meth:`~engine.estimate.timing.AETimeModel.calibrate`, cached), unless a
    measured model is already there. One run's correction cannot do this: one size shows one
    ratio, and the VAE's speed per FLOP changes with size. Within the run's memory budget and up to
    :func:`ladder_top` latent pixels a call, from the run's largest VAE call (``frames``: what it
    encoded; ``flat``: the latents it decoded). Nothing here can cost the finished video: out of
    memory, Ctrl-C or any failure only ends the timing. ``announce``: say so on stderr first (with
    the progress bar). Returns whether it measured."""
    try:
        largest_call = flat.shape[-2] * flat.shape[-1] * max(_frames_per_vae_call(run.settings, frames, flat))
        return _measure_vae_speed(model, run, budget_s, largest_call, announce)
    except torch.OutOfMemoryError:
        log.info("no room left to time the VAE; `engine probe --calibrate CONFIG` does it with the card free")
    except KeyboardInterrupt:
        log.warning("VAE timing interrupted; the video is kept and the next run times it again")
    except Exception as err:  # noqa: BLE001 - an optional measurement must not cost the finished video
        log.warning("timing the VAE failed (%s); the video is kept, plans keep the VAE's FLOP estimate", err)
    return False


def ladder_top(run, largest_call_pixels: int) -> int:
    """The largest call the VAE timing makes, in latent pixels: up to 4x the run's largest, so a
    later, larger run is measured too, and within what the plan's budget left the run's VAE (its
    decode's predicted peak against the budget; the activations grow with the call, the weights
    do not, so the bound is conservative)."""
    scale = 4.0
    if run.plan is not None:
        peak = run.plan.stage("vae_decode").peak_bytes
        scale = min(scale, max(1.0, run.plan.budget_bytes / peak)) if peak else scale
    return max(1, int(largest_call_pixels * scale))


def _measure_vae_speed(model, run, budget_s: float, largest_call_pixels: int, announce: bool) -> bool:
    from ..estimate.timing import AETimeModel
    from ..planner.estimators import forget_vae_time_models, timed_dtype

    vae = model.first_stage_model
    dtype = next(vae.parameters()).dtype
    # only a model the planner will look up: an fp32 VAE under autocast on a card computes in fp16
    if budget_s <= 0 or dtype != timed_dtype(run.settings.precision.value, run.device.type):
        return False
    if AETimeModel.cached(vae, device=run.device, dtype=dtype) is not None:
        return False
    run.budget.at("vae_timing")  # outside every stage, and apart from the minimal calls' faults
    log.info("timing the VAE on %s once for the next plans (~%.0f s)", run.device, budget_s)
    if announce:  # a pause after the progress bar's end needs a reason
        print(f"engine: timing the VAE on {run.device} once for later plans (~{budget_s:.0f} s, cached; "
              "--no-calibrate or calibrate=False skips it)", file=sys.stderr, flush=True)
    with run.placed("vae_decode"), torch.no_grad():  # refresh: the cache was just read, and held none
        AETimeModel.calibrate(vae, device=run.device, dtype=dtype, budget_s=budget_s, refresh=True,
                              max_latent_pixels=ladder_top(run, largest_call_pixels))
    forget_vae_time_models()
    return True
