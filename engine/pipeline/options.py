"""Validated generation options: every bad value gets one sentence naming the argument and the fix."""
from __future__ import annotations

import logging
import math
import numbers
import secrets
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Union

from ..errors import InvalidArgument, WrongType
from ..plan.settings import TIMESTEP_SPACINGS, GenerationMode

if TYPE_CHECKING:  # no torch, numpy or PIL imported to plan
    import os

    import numpy as np
    import torch
    from PIL import Image

    ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]  # what prepare_image reads
else:  # at run time the annotation must resolve without those imports (typing.get_type_hints)
    ImageInput = object

MODES = tuple(m.value for m in GenerationMode)  # from the plan's vocabulary: no torch to plan
SEED_LIMIT = 2 ** 64  # torch.Generator.manual_seed's range
FPS_LIMIT = 240  # above this GIF frame durations (10 ms units) and players stop keeping time

logger = logging.getLogger(__name__)

# Frame-stride (fs) defaults that differ from the config's ``default_fs``, keyed on
# (fps_condition_type, default_fs, mode): the 512 config is also the 512 interpolation checkpoint's,
# and DynamiCrafter's scripts/run_application.sh conditions that on FS=5 for interp and loop, while
# scripts/run.sh uses the config's 24 for i2v (docs/compatibility.md, "Defaults and their sources").
MODE_FS = {("fps", 24, "interp"): 5, ("fps", 24, "loop"): 5}

# What each field holds (None allowed where the default is None); images are checked when read.
_INTS = ("height", "width", "frames", "steps", "fs", "seed", "fps")
_FLOATS = ("cfg", "cfg_img", "eta", "guidance_rescale")
_STRS = ("prompt", "mode", "timestep_spacing")
_EXAMPLE = {"height": 320, "width": 512, "frames": 16, "steps": 50, "fs": 24, "seed": 123, "fps": 8,
            "cfg": 7.5, "cfg_img": 7.5, "eta": 1.0, "guidance_rescale": 0.7, "prompt": "'a cat'",
            "mode": "'i2v'", "timestep_spacing": "'uniform_trailing'"}


@dataclass(frozen=True)
class GenerateOptions:
    """What to generate. ``None`` fields take the model config's defaults (DynamiCrafter's run.sh)."""

    image: ImageInput | None = None  # a path, a PIL image, a numpy array or a torch tensor
    image2: ImageInput | None = None
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

    def __post_init__(self):
        """Types are checked when the options are built (values in :func:`resolve_options`)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            object.__setattr__(self, f.name, _typed(f.name, value))


def _typed(field: str, value):
    """``value`` as the field's type (numpy scalars too), or one sentence naming the argument."""
    if field in _INTS and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if field in _FLOATS and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return value if isinstance(value, (int, float)) else float(value)  # 0 stays 0 in messages
    if field in _STRS and isinstance(value, str):
        return value
    if field not in _INTS + _FLOATS + _STRS:
        return value  # image, image2: any source load_image reads, checked when read
    want = {**dict.fromkeys(_INTS, "an int"), **dict.fromkeys(_FLOATS, "a number"),
            **dict.fromkeys(_STRS, "a string")}[field]
    raise WrongType(f"`{field}` {value!r} has type {type(value).__name__}; GenerateOptions takes {want} "
                    f"there, e.g. {field}={_EXAMPLE[field]}.")


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
                   fs=pick(opts.fs, default_fs(spec, opts.mode)),
                   timestep_spacing=pick(opts.timestep_spacing, spec.timestep_spacing),
                   guidance_rescale=pick(opts.guidance_rescale, spec.guidance_rescale))
    multiple = size_multiple(spec)
    _check_size(name("height"), opts.height, multiple)
    _check_size(name("width"), opts.width, multiple)
    _check_values(opts, spec, name)
    return replace(opts, seed=_seed(opts.seed, name("seed")))


def default_fs(spec, mode: str) -> int:
    """The frame stride DynamiCrafter's scripts use for this config and mode (see ``MODE_FS``)."""
    return MODE_FS.get((spec.fps_condition_type, spec.default_fs, str(mode)), spec.default_fs)


def _seed(seed: int, argument: str) -> int:
    """A negative seed draws one at random, as DynamiCrafter's ``seed_everything`` does; logged so
    the run can be repeated."""
    if seed >= SEED_LIMIT:
        raise InvalidArgument(f"`{argument}` {seed} is too large for torch's generator; pass a seed "
                              "below 2**64 (or a negative one for a random seed).")
    if seed >= 0:
        return seed
    drawn = secrets.randbelow(2 ** 31)
    logger.warning("`%s` %d is negative, so the seed was drawn at random: %d; pass `%s` %d to repeat "
                   "this run.", argument, seed, drawn, argument, drawn)
    return drawn


def _check_values(opts: GenerateOptions, spec, name) -> None:
    if opts.frames < 1:
        raise InvalidArgument(f"`{name('frames')}` {opts.frames} must be at least 1; DynamiCrafter models "
                              "are trained on 16.")
    if opts.steps < 1 or opts.steps > spec.timesteps:
        raise InvalidArgument(f"`{name('steps')}` {opts.steps} must be between 1 and {spec.timesteps}; "
                              "50 is the default.")
    if opts.mode not in MODES:
        raise InvalidArgument(f"`{name('mode')}` {opts.mode!r} is unknown; use one of {', '.join(MODES)}.")
    for field in ("image", "image2"):
        if isinstance(getattr(opts, field), str) and not getattr(opts, field).strip():
            raise InvalidArgument(f"`{name(field)}` is an empty path; pass the path of a PNG or JPEG image"
                                  + (" or leave it out for the bundled example." if field == "image" else "."))
    if opts.mode == "interp" and opts.image2 is None:
        raise InvalidArgument(f"`{name('image2')}` is required for mode 'interp'; pass the last frame's image.")
    for field in _FLOATS:
        value = getattr(opts, field)
        if value is not None and not math.isfinite(value):
            raise InvalidArgument(f"`{name(field)}` {value} is not a finite number; pass a value such as "
                                  f"{_EXAMPLE[field]}.")
    if opts.cfg <= 0:
        raise InvalidArgument(f"`{name('cfg')}` {opts.cfg} must be positive; use 1 to disable guidance or "
                              "7.5 as in DynamiCrafter.")
    if not 0.0 <= opts.eta:
        raise InvalidArgument(f"`{name('eta')}` {opts.eta} must be >= 0; 1.0 is DynamiCrafter's default, "
                              "0 is deterministic DDIM.")
    if not 0.0 <= opts.guidance_rescale <= 1.0:
        raise InvalidArgument(f"`{name('guidance_rescale')}` {opts.guidance_rescale} must be between 0 and 1; "
                              "DynamiCrafter uses 0.7 (512, 1024) and 0 (256).")
    # fs is embedded like a diffusion timestep, so it is bounded by the schedule's length
    if not 1 <= opts.fs <= spec.timesteps:
        raise InvalidArgument(f"`{name('fs')}` {opts.fs} must be between 1 and {spec.timesteps}; this config's "
                              f"default is {default_fs(spec, opts.mode)} (larger means {_fs_meaning(spec)}).")
    if not 1 <= opts.fps <= FPS_LIMIT:
        raise InvalidArgument(f"`{name('fps')}` {opts.fps} must be between 1 and {FPS_LIMIT}; 8 is "
                              "DynamiCrafter's default.")
    if opts.timestep_spacing not in TIMESTEP_SPACINGS:
        raise InvalidArgument(f"`{name('timestep_spacing')}` {opts.timestep_spacing!r} is unknown; use one of "
                              f"{', '.join(TIMESTEP_SPACINGS)}.")


def _fs_meaning(spec) -> str:
    # 'fs' models take a frame stride (more motion), 'fps' models a frame rate (less motion)
    return "more motion" if spec.fps_condition_type == "fs" else "less motion"


def run_device(device, argument: str = "device") -> str:
    """The device a run computes on, as ``cpu`` or ``cuda:N``, checked to exist here (one sentence
    naming ``argument`` otherwise), before anything is planned or built."""
    from ..device.spec import parse_device

    device = parse_device(device, argument)
    if device == "cpu":
        return device
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if count == 0:
        raise InvalidArgument(f"`{argument}` {device!r} is not available here (no CUDA device found); "
                              "use cpu.")
    if index >= count:
        raise InvalidArgument(f"`{argument}` {device!r} is not available here ({count} CUDA device"
                              f"{'s' if count > 1 else ''}: cuda:0 to cuda:{count - 1}); pick one of those.")
    return f"cuda:{index}"
