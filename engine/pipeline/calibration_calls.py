"""The minimal calls a calibrating run times: each stage's model called as the run called it, at
its smallest input, so calibration can tell a call's fixed cost from the part that grows with size
(:mod:`engine.planner.calibration`).

"As the run called it" matters: a batched-CFG step calls the UNet on two or three conditionings at
once and a chunked decode calls the VAE on several frames, and their fixed cost is larger than a
batch-1, one-frame call's. Timing a smaller call than the run's under-counts the fixed part, and
the run's time beyond it, scaled to a larger size, over-predicts there.
"""
from __future__ import annotations

import torch

from .conditioning import guided, unet_call


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
    encode_k = settings.ae_encode.frames_per_call(frames.shape[0])
    decode_k = settings.ae_decode.frames_per_call(flat.shape[0])
    run.time_minimal_call("vae_encode", lambda: vae.encode(frames[:encode_k, :, :pixels, :pixels]))
    run.time_minimal_call("vae_decode", lambda: vae.decode(flat[:decode_k, :, :side, :side]))
