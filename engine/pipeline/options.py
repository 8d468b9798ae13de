"""Validated generation options: every bad value gets one sentence naming the argument and the fix."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import InvalidArgument, WrongType
from ..plan.settings import GenerationMode

MODES = tuple(m.value for m in GenerationMode)  # from the plan's vocabulary: no torch to plan


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
    steps: int | None = None  # None: the plan's steps, else 50
    cfg: float = 7.5
    cfg_img: float | None = None
    fs: int | None = None
    eta: float = 1.0
    seed: int = 123
    fps: int = 8
    timestep_spacing: str | None = None
    guidance_rescale: float | None = None


def size_multiple(spec) -> int:
    """Pixels must divide by the VAE factor times the UNet's own downsampling (2 per level)."""
    return spec.vae.downsample_factor * 2 ** (len(spec.unet.channel_mult) - 1)


def library_name(field: str) -> str:
    """How a library error names an option: ``opts.height``."""
    return f"opts.{field}"


def cli_name(field: str) -> str:
    """How a CLI error names an option: ``--height``."""
    return "--" + field.replace("_", "-")


def _check_size(name: str, value: int, multiple: int) -> None:
    if value < multiple or value % multiple:
        low = max(multiple, value // multiple * multiple)
        raise InvalidArgument(f"`{name}` {value} must be a positive multiple of {multiple} for this model "
                              f"(VAE and UNet downsampling); use {low} or {low + multiple}.")


def resolve_options(opts: GenerateOptions, spec, workload=None, name=library_name) -> GenerateOptions:
    """Fill defaults from the plan's ``workload`` (if any), then the spec, and validate.

    ``name`` says how errors name an option (``opts.height`` for the library, ``--height`` on
    the CLI)."""
    if not isinstance(opts, GenerateOptions):
        raise WrongType(f"`opts` must be a GenerateOptions, not {type(opts).__name__}; build one with "
                        "GenerateOptions(image=..., prompt=...).")
    h0, w0 = (workload.height, workload.width) if workload else spec.default_height_width
    pick = lambda value, default: default if value is None else value  # noqa: E731 (0 must stay 0)
    opts = replace(opts, height=pick(opts.height, h0), width=pick(opts.width, w0),
                   frames=pick(opts.frames, workload.frames if workload else spec.frames),
                   steps=pick(opts.steps, workload.steps if workload else 50),
                   fs=spec.default_fs if opts.fs is None else opts.fs,
                   timestep_spacing=opts.timestep_spacing or spec.timestep_spacing,
                   guidance_rescale=(spec.guidance_rescale if opts.guidance_rescale is None
                                     else opts.guidance_rescale))
    multiple = size_multiple(spec)
    _check_size(name("height"), opts.height, multiple)
    _check_size(name("width"), opts.width, multiple)
    _check_values(opts, spec, name)
    return opts


def _check_values(opts: GenerateOptions, spec, name) -> None:
    if opts.frames < 1:
        raise InvalidArgument(f"`{name('frames')}` {opts.frames} must be at least 1; DynamiCrafter models "
                              "are trained on 16.")
    if opts.steps < 1 or opts.steps > spec.timesteps:
        raise InvalidArgument(f"`{name('steps')}` {opts.steps} must be between 1 and {spec.timesteps}; "
                              "50 is the default.")
    if opts.mode not in MODES:
        raise InvalidArgument(f"`{name('mode')}` {opts.mode!r} is unknown; use one of {', '.join(MODES)}.")
    if opts.mode == "interp" and not opts.image2:
        raise InvalidArgument(f"`{name('image2')}` is required for mode 'interp'; pass the last frame's image.")
    if opts.cfg <= 0:
        raise InvalidArgument(f"`{name('cfg')}` {opts.cfg} must be positive; use 1 to disable guidance or "
                              "7.5 as in DynamiCrafter.")
    if not 0.0 <= opts.eta:
        raise InvalidArgument(f"`{name('eta')}` {opts.eta} must be >= 0; 1.0 is DynamiCrafter's default, "
                              "0 is deterministic DDIM.")
    if opts.fps < 1:
        raise InvalidArgument(f"`{name('fps')}` {opts.fps} must be at least 1; 8 is DynamiCrafter's default.")
