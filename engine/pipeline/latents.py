"""The latent side of a run: encode the conditioning frame(s), decode the video, with fallbacks."""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..plan.aemode import AEMode
from ..runtime.autoencode import decode_frames, encode_frames
from ..sampling.schedule import make_betas

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_condition_latents(model, images: list[torch.Tensor], mode: AEMode, generator) -> torch.Tensor:
    """VAE-encode only the frames that are used, sample the posterior, scale by ``scale_factor``."""
    x = torch.cat(images, dim=0)
    z = encode_frames(model.first_stage_model, x, mode, sample=True, generator=generator)
    return z * model.spec.scale_factor


@torch.no_grad()
def decode_latents(model, z: torch.Tensor, mode: AEMode) -> torch.Tensor:
    """[1, C, T, h, w] latents -> [T, 3, H, W] frames on the CPU."""
    b, c, t, h, w = z.shape
    flat = (z / model.spec.scale_factor).permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    return decode_frames(model.first_stage_model, flat, mode).cpu()


# Smaller and smaller decodes to fall back on when a decode still runs out of memory: the
# denoised latents are never lost to a decode that did not fit.
DECODE_FALLBACKS = ("per-frame", "per-frame+tile:256x256", "per-frame+tile:128x128")


def decode_with_fallback(model, z: torch.Tensor, mode: AEMode, device) -> torch.Tensor:
    """Decode with the plan's mode; on out-of-memory retry with the fallbacks, smallest last."""
    modes = [mode] + [AEMode.parse(m) for m in DECODE_FALLBACKS if AEMode.parse(m) != mode]
    for i, current in enumerate(modes):
        try:
            return decode_latents(model, z, current)
        except torch.OutOfMemoryError:
            if i == len(modes) - 1:
                raise
            log.warning("VAE decode in mode %s ran out of memory; retrying as %s", current, modes[i + 1])
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    raise AssertionError("unreachable")


def training_alphas_cumprod(spec) -> np.ndarray:
    """The float64 schedule: DynamiCrafter's DDIM computes its coefficients from it (the model's
    float32 buffer differs by up to one ulp, which shifts the result by ~3e-5)."""
    betas = make_betas(spec.timesteps, spec.linear_start, spec.linear_end, spec.rescale_betas_zero_snr)
    return np.cumprod(1.0 - betas)
