"""Duck-typed adapters that let the autoencode runtime drive any VAE-like module.

Two return conventions are understood without importing either library:
LDM/ours (``encode -> posterior`` with ``.mean``/``.logvar``, ``decode -> Tensor``) and
diffusers (``encode -> .latent_dist`` or ``(posterior,)``, ``decode -> .sample`` or
``(sample,)``). Rebuilders put a tensor back into the caller's original return type, so a
wrapped ``encode``/``decode`` looks unchanged from outside.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

__all__ = ["VAECall", "as_image", "as_moments", "decode_rebuilder", "downsample_factor",
           "encode_rebuilder", "module_place", "posterior_of", "takes_num_frames",
           "without_num_frames"]


def as_image(raw) -> torch.Tensor:
    """Decode output -> image tensor (ours: Tensor; diffusers: ``.sample`` or ``(sample,)``)."""
    if torch.is_tensor(raw):
        return raw
    if isinstance(raw, (tuple, list)):
        return raw[0]
    return raw.sample


def posterior_of(raw):
    """The posterior inside an encode output (diffusers wraps it; LDM returns it bare)."""
    if isinstance(raw, (tuple, list)):
        raw = raw[0]
    return getattr(raw, "latent_dist", raw)


def as_moments(raw) -> torch.Tensor:
    """Encode output -> ``cat(mean, logvar)`` on dim 1; a plain tensor is a deterministic latent."""
    dist = posterior_of(raw)
    if torch.is_tensor(dist):
        return dist
    return torch.cat([dist.mean, dist.logvar], dim=1)


def decode_rebuilder(raw) -> Callable[[torch.Tensor], object]:
    """A function putting an image back into ``raw``'s return type (captures no tensors)."""
    if torch.is_tensor(raw):
        return lambda image: image
    if isinstance(raw, (tuple, list)):
        return lambda image: (image,)
    cls = type(raw)
    return lambda image: cls(sample=image)


def encode_rebuilder(raw) -> Callable[[torch.Tensor], object]:
    """A function rebuilding ``raw``'s return type from moments; posterior classes in the LDM
    and diffusers conventions are constructible from ``cat(mean, logvar)``."""
    dist = posterior_of(raw)
    if torch.is_tensor(dist):
        return lambda moments: moments
    dist_cls = type(dist)
    if isinstance(raw, (tuple, list)):
        return lambda moments: (dist_cls(moments),)
    if hasattr(raw, "latent_dist"):
        out_cls = type(raw)
        return lambda moments: out_cls(latent_dist=dist_cls(moments))
    return dist_cls


def downsample_factor(vae) -> int:
    """Spatial downsample factor of ``vae``: ours (``params``), diffusers (``config``), else 8."""
    params = getattr(vae, "params", None)
    if getattr(params, "downsample_factor", None):
        return int(params.downsample_factor)
    channels = getattr(getattr(vae, "config", None), "block_out_channels", None)
    if channels:
        return 2 ** (len(channels) - 1)
    return int(getattr(vae, "downsample_factor", 8))


def module_place(vae) -> tuple[torch.device | None, torch.dtype | None]:
    try:
        p = next(vae.parameters())
    except (AttributeError, StopIteration):
        return None, None
    return p.device, (p.dtype if p.is_floating_point() else None)


def takes_num_frames(method: Callable) -> bool:
    """Whether ``method`` has a ``num_frames`` parameter (a temporal decoder such as diffusers'
    ``AutoencoderKLTemporalDecoder.decode``, whose convolutions mix the frames of one call)."""
    try:
        return "num_frames" in inspect.signature(method).parameters
    except (TypeError, ValueError):  # builtins and C callables
        return False


def without_num_frames(method: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a call ``method(t, *args, **kwargs)`` minus its ``num_frames``
    (positional or keyword), which a chunked call replaces with each chunk's frame count."""
    if not takes_num_frames(method):
        return args, kwargs
    kwargs = dict(kwargs)
    if kwargs.pop("num_frames", None) is None and args:
        names = [n for n in inspect.signature(method).parameters][1:]
        if "num_frames" in names[:len(args)]:
            i = names.index("num_frames")
            args = args[:i] + args[i + 1:]
    return args, kwargs


class VAECall:
    """Calls the original VAE method, normalises its output and remembers its return type.

    Args:
        method: the VAE's own ``encode`` or ``decode`` (or a call of it with fixed arguments).
        decode: whether ``method`` decodes.
        num_frames: pass ``num_frames=`` each call's frame count (temporal decoders); default:
            whether ``method`` has that parameter.
    """

    def __init__(self, method: Callable, decode: bool, num_frames: bool | None = None):
        self.method, self.decode, self.rebuild = method, decode, None
        self.deterministic = False  # encode returned a plain latent, not a posterior
        self.num_frames = takes_num_frames(method) if num_frames is None else num_frames

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        # a temporal decoder gets the frames of THIS call: a chunk is a clip of its own
        raw = self.method(t, num_frames=t.shape[0]) if self.num_frames else self.method(t)
        if self.rebuild is None:
            self.rebuild = decode_rebuilder(raw) if self.decode else encode_rebuilder(raw)
            self.deterministic = not self.decode and torch.is_tensor(posterior_of(raw))
        return as_image(raw) if self.decode else as_moments(raw)
