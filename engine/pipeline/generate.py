"""The generation orchestrator: the stage choreography, readable top to bottom.

text/image conditioning -> VAE-encode the used frame(s) -> DDIM with classifier-free guidance ->
VAE-decode -> frames. Memory policies (autoencoding modes, attention backend, offload) are read
from the options/plan and attached from ``engine.runtime``; the models never see them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..runtime.autoencode import AEMode, decode_frames, encode_frames
from ..sampling.ddim import sample_ddim
from ..sampling.guidance import CFGDenoiser
from ..sampling.schedule import ddim_timesteps, make_betas
from .conditioning import build_conditions, concat_latents, unet_call
from ..runtime.precision import weight_dtype
from .execution import DEFAULT_SETTINGS, attached
from .image_io import prepare_image
from .options import GenerateOptions, resolve_options

log = logging.getLogger(__name__)


@dataclass
class GenerateResult:
    video: torch.Tensor  # [T, 3, H, W] in [-1, 1], on the CPU
    options: GenerateOptions
    timings: dict = field(default_factory=dict)


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


def _images(opts: GenerateOptions, device, dtype) -> list[torch.Tensor]:
    first = prepare_image(opts.image, opts.height, opts.width, "--image").to(device, dtype)
    if opts.mode == "i2v":
        return [first]
    second = opts.image2 or opts.image
    return [first, prepare_image(second, opts.height, opts.width, "--image2").to(device, dtype)]


def default_settings(spec, opts: GenerateOptions) -> dict:
    """Without a plan: DynamiCrafter's behaviour on the CPU (fp32, ``perframe_ae`` from the config)."""
    base = "per-frame" if spec.perframe_ae else "batched"
    return {**DEFAULT_SETTINGS, "cfg": "batched" if opts.cfg_batched else "sequential",
            "ae_encode": opts.ae_encode or base, "ae_decode": opts.ae_decode or base}


@torch.no_grad()
def generate(model, opts: GenerateOptions, device="cpu", progress: bool = True,
             settings: dict | None = None) -> GenerateResult:
    """Run one image-to-video generation with ``model`` (a loaded LatentVisualDiffusion).

    Args:
        model: the container, e.g. from :func:`engine.pipeline.loading.load_model`.
        opts: what to generate (validated here).
        device: where to compute.
        settings: a plan's ``settings`` (``plan.settings``); default: :func:`default_settings`.
            Options that force an autoencoding mode override the plan's.
    """
    spec = model.spec
    opts = resolve_options(opts, spec)
    settings = {**default_settings(spec, opts), **(settings or {})}
    for key in ("ae_encode", "ae_decode"):
        settings[key] = getattr(opts, key) or settings[key]
    with attached(model, settings, device) as run:
        return _run_stages(model, opts, run, progress)


def _run_stages(model, opts: GenerateOptions, run, progress: bool) -> GenerateResult:
    spec, device, s = model.spec, run.device, run.settings
    dtype = weight_dtype(s["dtype"])  # inputs follow the weights (fp32 under autocast)
    generator = torch.Generator("cpu").manual_seed(opts.seed)
    timings, clock = {}, time.perf_counter
    ae_encode = AEMode.parse(s["ae_encode"], argument="ae_encode")
    ae_decode = AEMode.parse(s["ae_decode"], argument="ae_decode")

    t = clock()
    images = _images(opts, device, dtype)
    with run.stage("vae"):
        z = encode_condition_latents(model, images, ae_encode, generator)
    c_concat = concat_latents(z[0:1], z[1:2] if opts.mode != "i2v" else None, opts.frames, opts.mode)
    timings["vae_encode"] = clock() - t

    t = clock()
    use_cfg, multi = opts.cfg != 1.0, opts.cfg != 1.0 and opts.cfg_img is not None
    with run.stage("text_encoder", "image_encoder", "image_proj"):
        cond, uncond, uncond_image = build_conditions(model, images[0], opts.prompt, c_concat, opts.fs,
                                                      use_cfg, multi)
    timings["conditioning"] = clock() - t

    t = clock()
    f = spec.vae.downsample_factor
    noise = torch.randn((1, spec.channels, opts.frames, opts.height // f, opts.width // f),
                        generator=generator).to(device, dtype)
    denoiser = CFGDenoiser(unet_call(model), cond, uncond if use_cfg else None, opts.cfg,
                           guidance_rescale=opts.guidance_rescale, uncond_image=uncond_image,
                           cfg_img=opts.cfg_img, batched=s["cfg"] == "batched")
    with run.stage("unet"):
        latents = sample_ddim(denoiser, noise, ddim_timesteps(opts.steps, spec.timesteps, opts.timestep_spacing),
                              disable=not progress, alphas_cumprod=training_alphas_cumprod(spec),
                              parameterization=spec.parameterization, eta=opts.eta,
                              scale_arr=getattr(model, "scale_arr", None), generator=generator)
    timings["denoise"] = clock() - t

    t = clock()
    with run.stage("vae"):
        video = decode_with_fallback(model, latents, ae_decode, device)
    if opts.mode == "loop":
        video = video[:-1]  # the last frame repeats the first
    timings["vae_decode"] = clock() - t
    return GenerateResult(video=video.float(), options=opts, timings=timings)
