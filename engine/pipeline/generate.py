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
from .image_io import prepare_image
from .options import GenerateOptions, resolve_options

log = logging.getLogger(__name__)


@dataclass
class GenerateResult:
    video: torch.Tensor  # [T, 3, H, W] in [-1, 1], on the CPU
    options: GenerateOptions
    timings: dict = field(default_factory=dict)


def default_ae_modes(spec, opts: GenerateOptions) -> tuple[AEMode, AEMode]:
    """Without a plan: the config's ``perframe_ae`` (per-frame or batched), unless the options force a mode."""
    base = "per-frame" if spec.perframe_ae else "batched"
    return (AEMode.parse(opts.ae_encode or base, argument="ae_encode"),
            AEMode.parse(opts.ae_decode or base, argument="ae_decode"))


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


@torch.no_grad()
def generate(model, opts: GenerateOptions, device="cpu", progress: bool = True) -> GenerateResult:
    """Run one image-to-video generation with ``model`` (a loaded LatentVisualDiffusion)."""
    spec = model.spec
    opts = resolve_options(opts, spec)
    dtype = next(model.parameters()).dtype
    generator = torch.Generator("cpu").manual_seed(opts.seed)
    timings, t0 = {}, time.perf_counter()
    ae_encode, ae_decode = default_ae_modes(spec, opts)

    images = _images(opts, device, dtype)
    z = encode_condition_latents(model, images, ae_encode, generator)
    z_last = z[1:2] if opts.mode != "i2v" else None
    c_concat = concat_latents(z[0:1], z_last, opts.frames, opts.mode)
    timings["vae_encode"] = time.perf_counter() - t0

    use_cfg = opts.cfg != 1.0
    multi = use_cfg and opts.cfg_img is not None
    cond, uncond, uncond_image = build_conditions(model, images[0], opts.prompt, c_concat, opts.fs,
                                                  use_cfg, multi)
    timings["conditioning"] = time.perf_counter() - t0 - timings["vae_encode"]

    h, w = opts.height // spec.vae.downsample_factor, opts.width // spec.vae.downsample_factor
    noise = torch.randn((1, spec.channels, opts.frames, h, w), generator=generator).to(device, dtype)
    denoiser = CFGDenoiser(unet_call(model), cond, uncond if use_cfg else None, opts.cfg,
                           guidance_rescale=opts.guidance_rescale, uncond_image=uncond_image,
                           cfg_img=opts.cfg_img, batched=opts.cfg_batched)
    steps = ddim_timesteps(opts.steps, spec.timesteps, opts.timestep_spacing)
    t1 = time.perf_counter()
    latents = sample_ddim(denoiser, noise, steps, disable=not progress,
                          alphas_cumprod=training_alphas_cumprod(spec), parameterization=spec.parameterization,
                          eta=opts.eta, scale_arr=getattr(model, "scale_arr", None), generator=generator)
    timings["denoise"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    video = decode_latents(model, latents, ae_decode)
    if opts.mode == "loop":
        video = video[:-1]  # the last frame repeats the first
    timings["vae_decode"] = time.perf_counter() - t2
    return GenerateResult(video=video, options=opts, timings=timings)
