"""What each non-VAE stage runs, built on the meta device, ready to be traced.

The calls mirror :mod:`engine.pipeline.conditioning` and :mod:`engine.pipeline.generate`:

* ``text_encode``: the OpenCLIP text tower on ``[B, 77]`` tokens;
* ``image_encode``: the CLIP vision tower (its preprocessing included) and the Resampler on a
  ``[B, 3, H, W]`` image;
* ``denoise``: one ``apply_model`` call (``c_concat`` channel-concatenated, context of
  ``77 + 16 * frames`` tokens, ``fs``) at latent ``[B, 4, frames, H/8, W/8]``.

The precision regimes and attention families are named in :mod:`engine.estimate.unet.precision`
(torch-free) and re-exported here.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .precision import PRECISIONS, Precision, attention_family, precision_of

__all__ = ["PRECISIONS", "Precision", "attention_family", "build_stage_modules", "clip_image_size",
           "precision_of", "preprocess_call", "sdpa_kernel", "stage_call", "use_attention"]

# A chunk larger than any token count: one chunk per call, so the op sequence is shape-independent.
_ONE_CHUNK = 1 << 30


def sdpa_kernel(kinds: tuple[str, str]) -> str:
    """The SDPA kernel to trace with: xformers' cutlass kernel is PyTorch's memory-efficient one."""
    return "efficient" if "xformers" in kinds else "auto"


@contextlib.contextmanager
def use_attention(module: nn.Module, kinds: tuple[str, str]) -> Iterator[None]:
    """Set the ``backend`` of every attention layer under ``module`` for the duration, then restore.

    xformers is traced as SDPA (with the memory-efficient kernel picked by :func:`sdpa_kernel`):
    it need not import on the planning machine.
    """
    from ...models.transformers import CrossAttention, SpatialTransformer, TemporalTransformer

    names = {k: ("sdpa" if k == "xformers" else f"chunked:{_ONE_CHUNK}" if k == "chunked" else k)
             for k in kinds}
    saved = []
    for parent in module.modules():
        role = (0 if isinstance(parent, SpatialTransformer)
                else 1 if isinstance(parent, TemporalTransformer) else None)
        if role is None:
            continue
        for sub in parent.modules():
            if isinstance(sub, CrossAttention):
                saved.append((sub, sub.backend))
                sub.backend = names[kinds[role]]
    try:
        yield
    finally:
        for sub, backend in saved:
            sub.backend = backend


def build_stage_modules(spec, stage: str, dtype: torch.dtype) -> tuple[nn.Module, ...]:
    """The modules ``stage`` runs, on the meta device, in ``dtype``, eval mode, frozen.

    Args:
        spec: a :class:`~engine.config.ModelSpec`.
        stage: ``text_encode``, ``image_encode`` or ``denoise``.
        dtype: the weight dtype.
    """
    from ...models.clip import ImageEncoder, TextEncoder
    from ...models.lvdm import DiffusionWrapper
    from ...models.resampler import Resampler
    from ...models.unet import UNetModel

    with torch.device("meta"):
        if stage == "denoise":
            mods: tuple[nn.Module, ...] = (DiffusionWrapper(UNetModel(spec.unet)),)
        elif stage == "text_encode":
            mods = (TextEncoder(spec.text_arch, spec.text_layer),)
        elif stage == "image_encode":
            mods = (ImageEncoder(spec.image_arch), Resampler(spec.resampler))
        else:
            raise ValueError(f"`stage` {stage!r} is unknown; use text_encode, image_encode or "
                             "denoise.")
    return tuple(m.to(dtype).eval().requires_grad_(False) for m in mods)


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def stage_call(stage: str, modules: tuple[nn.Module, ...], shape: dict[str, int],
               act_dtype: torch.dtype) -> tuple[Callable[..., Any], tuple]:
    """``(fn, args)`` for one call of ``stage`` at ``shape``; args are meta tensors.

    Args:
        stage: as in :func:`build_stage_modules`.
        modules: what :func:`build_stage_modules` returned for ``stage``.
        shape: ``b`` always; ``f``, ``h``, ``w`` (latent) for denoise; ``h``, ``w`` (pixels) for
            ``image_encode`` preprocessing.
        act_dtype: dtype of the floating inputs.
    """
    b = shape["b"]
    if stage == "text_encode":
        return modules[0], (torch.zeros(b, 77, dtype=torch.long, device="meta"),)
    if stage == "image_encode":
        encoder, resampler = modules
        return (lambda image: resampler(encoder(image))), (_meta(b, 3, shape["h"], shape["w"],
                                                                 dtype=act_dtype),)
    wrapper = modules[0]
    f, h, w = shape["f"], shape["h"], shape["w"]
    p = wrapper.diffusion_model.params
    latent = _meta(b, p.out_channels, f, h, w, dtype=act_dtype)
    concat = _meta(b, p.in_channels - p.out_channels, f, h, w, dtype=act_dtype)
    context = _meta(b, 77 + 16 * f, p.context_dim, dtype=act_dtype)
    steps = torch.zeros(b, dtype=torch.long, device="meta")

    def denoise(x, t, c_concat, ctx, fs):
        return wrapper(x, t, c_concat=c_concat, context=ctx, fs=fs)

    return denoise, (latent, steps, concat, context, steps.clone())


def clip_image_size(spec) -> tuple[int, int]:
    """The vision tower's input size (every image is resized to it before encoding)."""
    from ...models.clip import clip_config

    size = clip_config(spec.image_arch)["vision_cfg"].get("image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)


def preprocess_call(spec, b: int, height: int, width: int,
                    act_dtype: torch.dtype) -> tuple[Callable[..., Any], tuple]:
    """``(fn, args)`` for the image encoder's resize + normalisation alone.

    The encoder's own ``preprocess`` runs on a stand-in that carries only the input size and the
    two normalisation constants, so no vision tower is built or swapped for fakes.
    """
    from ...models.clip import ImageEncoder

    visual = SimpleNamespace(image_size=clip_image_size(spec))

    def preprocess(image, mean, std):
        stand_in = SimpleNamespace(model=SimpleNamespace(visual=visual), mean=mean, std=std)
        return ImageEncoder.preprocess(stand_in, image)

    return preprocess, (_meta(b, 3, height, width, dtype=act_dtype), _meta(3, dtype=act_dtype),
                        _meta(3, dtype=act_dtype))
