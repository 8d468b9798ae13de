"""Argument checks for ``plan_svd``/``apply_svd_plan``: one sentence each, before any tracing."""
from __future__ import annotations

from numbers import Real

from ...device.spec import format_bytes, parse_device, parse_size
from ...errors import InvalidArgument, WrongType
from .settings import COMPONENTS

__all__ = ["check_budget", "check_pipeline", "check_size"]


def check_pipeline(pipe) -> None:
    """``pipe`` must look like a ``StableVideoDiffusionPipeline``: the three modules and ``decode_latents``."""
    from torch import nn

    missing = [n for n in COMPONENTS if not isinstance(getattr(pipe, n, None), nn.Module)]
    if missing or not callable(getattr(type(pipe), "decode_latents", None)):
        what = f"no `{missing[0]}` module" if missing else "no `decode_latents` method"
        raise WrongType(f"`pipe` ({type(pipe).__name__}) is not a StableVideoDiffusionPipeline: it has "
                        f"{what}; pass a diffusers StableVideoDiffusionPipeline (with `unet`, `vae` and "
                        "`image_encoder` loaded).")
    for name in COMPONENTS:
        if not hasattr(getattr(pipe, name), "config"):
            raise WrongType(f"`pipe.{name}` ({type(getattr(pipe, name)).__name__}) has no `config` to "
                            "rebuild it from; pass a pipeline of diffusers/transformers modules.")


def _positive_int(value, argument: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WrongType(f"`{argument}` has type {type(value).__name__}; pass an int ({hint}).")
    if value < 1:
        raise InvalidArgument(f"`{argument}` {value} must be at least 1; {hint}.")
    return value


def check_size(pipe, height, width, num_frames) -> tuple[int, int, int]:
    """Output size and frame count the pipeline and its UNet can run."""
    for name, value in (("height", height), ("width", width)):
        _positive_int(value, name, "pixels, a multiple of 8 such as 576 or 1024")
        if value % 8:
            raise InvalidArgument(f"`{name}` {value} is not a multiple of 8, which the SVD pipeline "
                                  f"requires; use {max(8, value // 8 * 8)} or {value // 8 * 8 + 8}.")
        scale = int(getattr(pipe, "vae_scale_factor", 8))
        steps = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        if (value // scale) % steps:
            unit = scale * steps
            raise InvalidArgument(f"`{name}` {value} gives a latent of {value // scale}, which the UNet's "
                                  f"{steps}x downsampling cannot divide; use a multiple of {unit} such "
                                  f"as {max(unit, value // unit * unit)}.")
    _positive_int(num_frames, "num_frames", "the number of video frames, such as 14 or 25")
    return height, width, num_frames


def check_guidance(max_guidance_scale) -> float:
    if isinstance(max_guidance_scale, bool) or not isinstance(max_guidance_scale, Real):
        raise WrongType(f"`max_guidance_scale` has type {type(max_guidance_scale).__name__}; pass a "
                        "number (the pipeline's default is 3.0; 1.0 or less turns guidance off).")
    return float(max_guidance_scale)


def check_device(device, pipe) -> str:
    """The device to plan for: ``device`` (cpu, cuda, cuda:N) or where ``pipe.unet`` is."""
    if device is None:
        param = next(iter(pipe.unet.parameters()), None)
        device = param.device if param is not None and param.device.type != "meta" else "cpu"
    return parse_device(device, "device")


def check_budget(max_memory, device: str) -> int:
    """``max_memory`` in bytes: a count, a size such as '12GiB', or None (what the device has now)."""
    if max_memory is None:
        return _available_bytes(device)
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float, str)):
        raise WrongType(f"`max_memory` has type {type(max_memory).__name__}; pass bytes (an int) or a "
                        "size such as '12GiB'.")
    budget = parse_size(max_memory, "max_memory")  # InvalidArgument for a text that is no size
    if budget <= 0:
        raise InvalidArgument(f"`max_memory` {max_memory!r} is not a positive size; pass bytes or a size "
                              "such as '12GiB' (None: the device's free memory).")
    return budget


def _available_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidArgument(f"`max_memory` is needed to plan for {device!r} on a machine without "
                                  "CUDA; pass the card's memory, e.g. max_memory='24GiB'.")
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_allocated(device)
    from ...device import host_memory

    return host_memory()["available_bytes"]


def too_small(budget: int, floor: int, what: str) -> InvalidArgument:
    from ...errors import DoesNotFit

    return DoesNotFit(f"`max_memory` {format_bytes(budget, floor)} cannot hold this SVD call: the "
                      f"smallest plan ({what}) needs {format_bytes(floor, budget)}; raise `max_memory` "
                      "to at least that, or lower `height`, `width` or `num_frames`.")
