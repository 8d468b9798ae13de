"""Conditioning as DynamiCrafter builds it: text + per-frame image tokens for cross-attention, the
VAE latent of the conditioning frame(s) for channel concatenation, and the frame-rate/stride ``fs``.

Only the frames that are used are VAE-encoded: one for image-to-video, two (first, last) for
interpolation and looping (DynamiCrafter encodes 16 copies of the input and keeps one or two).
"""
from __future__ import annotations

import torch

from ..plan.settings import CFGMode
from ..sampling.guidance import CFGDenoiser

MODES = ("i2v", "interp", "loop")


@torch.no_grad()
def text_context(model, prompts: list[str], device) -> torch.Tensor:
    tokens = model.cond_stage_model.tokenize(prompts).to(device)
    return model.cond_stage_model(tokens)


@torch.no_grad()
def image_context(model, image: torch.Tensor) -> torch.Tensor:
    """CLIP image tokens -> Resampler -> ``[B, 16 * video_length, C]`` per-frame image context."""
    return model.image_proj_model(model.embedder(image))


def concat_latents(z_first: torch.Tensor, z_last: torch.Tensor | None, frames: int, mode: str):
    """The ``c_concat`` video latent: I2V repeats the first frame's latent over time; interpolation
    and looping put the first and last latents at both ends and zeros between."""
    if mode == "i2v":
        return z_first[:, :, None].expand(-1, -1, frames, -1, -1).contiguous()
    out = torch.zeros(z_first.shape[0], z_first.shape[1], frames, *z_first.shape[2:],
                      dtype=z_first.dtype, device=z_first.device)
    out[:, :, 0] = z_first
    out[:, :, -1] = z_last
    return out


def guided(network, conds, opts, settings) -> CFGDenoiser:
    """The run's guidance wrapper over ``network``: ``conds`` as ``(cond, uncond, uncond_image)``,
    the options' guidance scales and the settings' CFG batching."""
    cond, uncond, uncond_image = conds
    # the image scale only applies with its branch (cfg == 1 builds none: plain conditional steps)
    cfg_img = opts.cfg_img if uncond_image is not None else None
    return CFGDenoiser(network, cond, uncond, opts.cfg, guidance_rescale=opts.guidance_rescale,
                       uncond_image=uncond_image, cfg_img=cfg_img, batched=settings.cfg is CFGMode.BATCHED)


def unet_call(model):
    """The function the guidance wrapper calls: ``(x, t, cond) -> network output``."""

    def call(x, t, cond):
        return model.apply_model(x, t, cond["c_concat"], cond["context"], cond["fs"])

    return call


@torch.no_grad()
def text_conditions(model, prompt: str, batch: int, with_uncond: bool, device):
    """(prompt tokens, empty-prompt tokens or None) from the text encoder."""
    text = text_context(model, [prompt] * batch, device)
    empty = text_context(model, [""] * batch, device) if with_uncond else None
    return text, empty


@torch.no_grad()
def image_conditions(model, image: torch.Tensor, with_uncond: bool):
    """(image tokens, tokens of an all-zero image or None) through CLIP and the Resampler."""
    img = image_context(model, image)
    zero = image_context(model, torch.zeros_like(image)) if with_uncond else None
    return img, zero


def assemble_conditions(text, empty, img, zero_img, c_concat, fs: int, with_uncond: bool,
                        with_uncond_image: bool):
    """``(cond, uncond, uncond_image)`` dicts for the guidance wrapper.

    The unconditional branch uses the empty prompt and the CLIP embedding of an all-zero image
    (``empty_seq`` in DynamiCrafter) but keeps ``c_concat``: the image latent is never dropped.
    ``uncond_image`` (multi-condition CFG) pairs the empty prompt with the real image tokens.
    """
    fs_t = torch.full((img.shape[0],), int(fs), dtype=torch.long, device=img.device)
    cond = {"c_concat": c_concat, "context": torch.cat([text, img], dim=1), "fs": fs_t}
    uncond = uncond_image = None
    if with_uncond:
        uncond = {"c_concat": c_concat, "fs": fs_t, "context": torch.cat([empty, zero_img], dim=1)}
    if with_uncond_image:
        uncond_image = {"c_concat": c_concat, "fs": fs_t, "context": torch.cat([empty, img], dim=1)}
    return cond, uncond, uncond_image
