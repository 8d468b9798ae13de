"""What each non-VAE stage runs, built on the meta device, ready to be traced.

The calls mirror :mod:`engine.pipeline.conditioning` and :mod:`engine.pipeline.generate`:

* ``text_encode``: the OpenCLIP text tower on ``[B, 77]`` tokens;
* ``image_encode``: the CLIP vision tower (its preprocessing included) and the Resampler on a
  ``[B, 3, H, W]`` image;
* ``denoise``: one ``apply_model`` call (``c_concat`` channel-concatenated, context of
  ``77 + 16 * frames`` tokens, ``fs``) at latent ``[B, 4, frames, H/8, W/8]``.

Precision regimes (``precision`` names): ``fp32-autocast`` keeps fp32 weights and computes under
fp16 autocast (DynamiCrafter's own inference); ``fp16`` and ``bf16`` are half-precision weights
and activations (equal byte counts, traced as fp16); ``fp32`` is full precision.
"""
from __future__ import annotations

import contextlib
import dataclasses
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ...models.attention_ops import parse_backend

__all__ = ["PRECISIONS", "Precision", "attention_family", "build_stage_modules", "clip_image_size",
           "precision_of", "preprocess_call", "sdpa_kernel", "stage_call", "use_attention"]

# A chunk larger than any token count: one chunk per call, so the op sequence is shape-independent.
_ONE_CHUNK = 1 << 30


@dataclasses.dataclass(frozen=True)
class Precision:
    """How a precision name is traced: weight dtype, activation dtype, autocast dtype."""

    family: str
    weight_dtype: torch.dtype
    act_dtype: torch.dtype
    autocast_dtype: torch.dtype | None = None


PRECISIONS = {
    "fp32-autocast": Precision("amp16", torch.float32, torch.float32, torch.float16),
    "fp16": Precision("half", torch.float16, torch.float16),
    "bf16": Precision("half", torch.float16, torch.float16),  # bf16 bytes equal fp16 bytes
    "fp32": Precision("fp32", torch.float32, torch.float32),
}


def precision_of(name: str) -> Precision:
    """The :class:`Precision` for ``name``; raises for unknown names."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"`precision` {name!r} is unknown; use one of "
                         f"{', '.join(PRECISIONS)}.") from None


def attention_family(attention: str, device_type: str) -> tuple[str, str]:
    """``(spatial, temporal)`` backend kinds for an ``attention`` setting.

    ``attention`` is one backend for every attention layer (``naive``, ``sdpa``, ``xformers``,
    ``chunked:N``) or ``SPATIAL/TEMPORAL``, e.g. ``xformers/naive`` for DynamiCrafter's own run
    (xformers in spatial layers, the plain path in temporal ones). The chunk size is dropped:
    with fused kernels chunking changes only per-chunk scratch, bounded by the one-chunk trace.
    """
    parts = attention.split("/")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError(f"`attention` {attention!r} has more than one '/'; write one backend or "
                         "SPATIAL/TEMPORAL such as 'xformers/naive'.")
    kinds = tuple(parse_backend(p)[0] for p in parts)
    if "xformers" in kinds and device_type != "cuda":
        raise ValueError(f"`attention` {attention!r} needs CUDA (xformers has no CPU kernels); "
                         "use 'sdpa' or 'naive' for device type 'cpu'.")
    return kinds  # type: ignore[return-value]


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
