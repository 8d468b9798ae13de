"""Weight precision and autocast as a policy: ``fp32-autocast`` | ``fp16`` | ``bf16`` | ``fp32``.

* ``fp32-autocast`` (DynamiCrafter's reference execution): weights stay fp32; sampling runs under
  ``torch.autocast(device_type, dtype=torch.float16)``. On a CPU device no autocast is used and
  the plan runs in plain fp32: CPUs gain nothing from fp16, CPU autocast to bf16 is slower than
  fp32 without AMX and changes the numerics, and a CPU run exists to test plans exactly.
* ``fp16`` / ``bf16``: the components' weights are cast with ``module.to(dtype)`` by
  :func:`apply_precision`; no autocast (inputs follow the weights' dtype, as the pipeline does).
  Two things are kept in fp32: the container's schedule buffers (``alphas_cumprod``, ...; they
  are not inside any component, and the sampler's maths needs them exact), and the norm layers
  that compute in fp32 on purpose (``GroupNorm32``: it upcasts its input, and ``group_norm``
  refuses an fp32 input with low-precision weights). Models declare those modules themselves
  with a ``_keep_in_fp32_modules`` class attribute (class names), as the UNet does.
* ``fp32``: fp32 weights, no autocast.

Apply precision BEFORE :func:`engine.runtime.offload.apply_offload` (offload keeps host copies of
the tensors ``to(dtype)`` would replace); :func:`apply_precision` refuses while offload is on.

Example:
    >>> previous = apply_precision(model, "fp16", device="cuda")
    >>> with precision_context("fp16", "cuda"):
    ...     video = generate(model, opts, device="cuda").video
    >>> restore_precision(model, previous)   # lossy: fp16 -> fp32 does not bring the bits back
"""
from __future__ import annotations

import contextlib
import logging
from collections import Counter

import torch
from torch import nn

from .modes import ModeEnum

logger = logging.getLogger(__name__)

__all__ = ["PrecisionMode", "apply_precision", "precision_context", "restore_precision",
           "weight_dtype"]

_DEFAULT_KEEP_FP32: tuple[str, ...] = ()


class PrecisionMode(ModeEnum):
    FP32_AUTOCAST = "fp32-autocast"
    FP16 = "fp16"
    BF16 = "bf16"
    FP32 = "fp32"

    @classmethod
    def parse(cls, value, argument: str = "dtype") -> PrecisionMode:
        return super().parse(value, argument)


PrecisionMode._label = "a precision mode"


_WEIGHT_DTYPES = {PrecisionMode.FP32_AUTOCAST: torch.float32, PrecisionMode.FP16: torch.float16,
                  PrecisionMode.BF16: torch.bfloat16, PrecisionMode.FP32: torch.float32}


def weight_dtype(mode: PrecisionMode | str) -> torch.dtype:
    """The dtype weights are stored in for ``mode`` (for the planner's byte counts).

    Example:
        >>> weight_dtype("fp32-autocast")
        torch.float32
    """
    return _WEIGHT_DTYPES[PrecisionMode.parse(mode)]


def _check_supported(mode: PrecisionMode, device: torch.device) -> None:
    if mode is PrecisionMode.BF16 and device.type == "cuda" and torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(device)
            raise ValueError(f"`dtype` 'bf16' is not supported natively by {name}; use dtype='fp16' "
                             f"or 'fp32-autocast'.")


def _components(model: nn.Module) -> list[nn.Module]:
    """The modules whose weights are cast: the container's components, or the module itself."""
    from ..models.lvdm import COMPONENTS, LatentVisualDiffusion

    if isinstance(model, LatentVisualDiffusion):
        return [model.get_submodule(path) for path in COMPONENTS.values()]
    return [model]


def _dominant_dtype(modules: list[nn.Module]) -> torch.dtype:
    counts: Counter = Counter()
    for module in modules:
        for p in module.parameters():
            if p.is_floating_point():
                counts[p.dtype] += p.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    for component in _components(model):
        keep = set(getattr(component, "_keep_in_fp32_modules", _DEFAULT_KEEP_FP32))
        component.to(dtype)
        for module in component.modules():
            if type(module).__name__ in keep:
                module.float()


def apply_precision(model: nn.Module, mode: PrecisionMode | str, *,
                    device: str | torch.device | None = None) -> torch.dtype:
    """Cast the weights for ``mode`` and return the previous weight dtype.

    Args:
        model: a :class:`~engine.models.lvdm.LatentVisualDiffusion` (its components are cast,
            the schedule buffers stay fp32) or any module.
        mode: ``"fp32-autocast"``, ``"fp16"``, ``"bf16"`` or ``"fp32"``.
        device: the execution device, for the bf16 support check (default: where the weights
            are; pass it when weights are offloaded or not yet moved).

    Returns:
        The dominant floating dtype of the weights before the cast, for :func:`restore_precision`.

    Example:
        >>> previous = apply_precision(model, "bf16", device="cuda")
    """
    from .offload import get_offload

    mode = PrecisionMode.parse(mode)
    components = _components(model)
    if device is None:
        device = next((p.device for m in components for p in m.parameters()), torch.device("cpu"))
    _check_supported(mode, torch.device(device))
    if get_offload(model) is not None:
        raise ValueError("`apply_precision` cannot cast weights while offload is installed; call "
                         "remove_offload(model) first and reapply_offload(model, config) after.")
    previous = _dominant_dtype(components)
    _cast(model, _WEIGHT_DTYPES[mode])
    logger.debug("precision %s: weights %s -> %s", mode.value, previous, _WEIGHT_DTYPES[mode])
    return previous


def restore_precision(model: nn.Module, previous: torch.dtype) -> None:
    """Cast the weights back to ``previous`` (exact only if nothing was narrowed on the way).

    Example:
        >>> restore_precision(model, apply_precision(model, "fp32"))
    """
    from .offload import get_offload

    if get_offload(model) is not None:
        raise ValueError("`restore_precision` cannot cast weights while offload is installed; call "
                         "remove_offload(model) first.")
    _cast(model, previous)


def precision_context(mode: PrecisionMode | str, device: str | torch.device):
    """The context manager the UNet/VAE calls run under for ``mode``.

    Args:
        mode: the precision mode (weights must already be cast by :func:`apply_precision`).
        device: the execution device.

    Returns:
        ``torch.autocast(device_type, dtype=torch.float16)`` for ``fp32-autocast`` on an
        accelerator; a null context otherwise (CPU runs ``fp32-autocast`` in plain fp32, see
        the module docstring).

    Example:
        >>> with precision_context("fp32-autocast", "cuda"):
        ...     eps = model.apply_model(x, t, c_concat, context, fs)
    """
    mode, device = PrecisionMode.parse(mode), torch.device(device)
    _check_supported(mode, device)
    if mode is PrecisionMode.FP32_AUTOCAST and device.type != "cpu":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()
