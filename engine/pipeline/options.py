"""Validated generation options: every bad value gets one sentence naming the argument and the fix."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .conditioning import MODES


@dataclass(frozen=True)
class GenerateOptions:
    """What to generate. ``None`` fields take the model config's defaults (DynamiCrafter's run.sh)."""

    image: str | None = None
    image2: str | None = None
    prompt: str = ""
    mode: str = "i2v"
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    steps: int = 50
    cfg: float = 7.5
    cfg_img: float | None = None
    fs: int | None = None
    eta: float = 1.0
    seed: int = 123
    fps: int = 8
    timestep_spacing: str | None = None
    guidance_rescale: float | None = None
    ae_encode: str | None = None  # None: from the plan / the config's perframe_ae
    ae_decode: str | None = None
    cfg_batched: bool = False


def size_multiple(spec) -> int:
    """Pixels must divide by the VAE factor times the UNet's own downsampling (2 per level)."""
    return spec.vae.downsample_factor * 2 ** (len(spec.unet.channel_mult) - 1)


def _check_size(name: str, value: int, multiple: int) -> None:
    if value < multiple or value % multiple:
        low = max(multiple, value // multiple * multiple)
        raise ValueError(f"`--{name}` {value} must be a positive multiple of {multiple} for this model "
                         f"(VAE and UNet downsampling); use {low} or {low + multiple}.")


def resolve_options(opts: GenerateOptions, spec) -> GenerateOptions:
    """Fill defaults from the spec and validate; returns a complete options object."""
    h0, w0 = spec.default_height_width
    pick = lambda value, default: default if value is None else value  # noqa: E731 (0 must stay 0)
    opts = replace(opts, height=pick(opts.height, h0), width=pick(opts.width, w0),
                   frames=pick(opts.frames, spec.frames),
                   fs=spec.default_fs if opts.fs is None else opts.fs,
                   timestep_spacing=opts.timestep_spacing or spec.timestep_spacing,
                   guidance_rescale=(spec.guidance_rescale if opts.guidance_rescale is None
                                     else opts.guidance_rescale))
    multiple = size_multiple(spec)
    _check_size("height", opts.height, multiple)
    _check_size("width", opts.width, multiple)
    if opts.frames < 1:
        raise ValueError(f"`--frames` {opts.frames} must be at least 1; DynamiCrafter models are trained on 16.")
    if opts.steps < 1 or opts.steps > spec.timesteps:
        raise ValueError(f"`--steps` {opts.steps} must be between 1 and {spec.timesteps}; 50 is the default.")
    if opts.mode not in MODES:
        raise ValueError(f"`--mode` {opts.mode!r} is unknown; use one of {', '.join(MODES)}.")
    if opts.mode == "interp" and not opts.image2:
        raise ValueError("`--image2` is required for mode 'interp'; pass the last frame's image.")
    if opts.cfg <= 0:
        raise ValueError(f"`--cfg` {opts.cfg} must be positive; use 1 to disable guidance or 7.5 as in DynamiCrafter.")
    if not 0.0 <= opts.eta:
        raise ValueError(f"`--eta` {opts.eta} must be >= 0; 1.0 is DynamiCrafter's default, 0 is deterministic DDIM.")
    if opts.fps < 1:
        raise ValueError(f"`--fps` {opts.fps} must be at least 1; 8 is DynamiCrafter's default.")
    return opts
