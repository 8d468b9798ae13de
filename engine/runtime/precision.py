"""Weight precision and autocast as a policy: ``fp32-autocast`` | ``fp16`` | ``bf16`` | ``fp32``.

* ``fp32-autocast`` (DynamiCrafter's reference execution): weights stay fp32; sampling runs under
  ``torch.autocast(device_type, dtype=torch.float16)``. On a CPU device no autocast is used and
  the plan runs in plain fp32: CPUs gain nothing from fp16, CPU autocast to bf16 is slower than
  fp32 without AMX and changes the numerics, and a CPU run exists to test plans exactly.
* ``fp16`` / ``bf16``: the components' weights are cast tensor by tensor (``t.data`` replaced,
  the ``Parameter`` objects kept) by :func:`apply_precision`; no autocast (inputs follow the weights' dtype, as the pipeline does).
  Two things are kept in fp32: the container's schedule buffers (``alphas_cumprod``, ...; they
  are not inside any component, and the sampler's maths needs them exact), and the norm layers
  that compute in fp32 on purpose (``GroupNorm32``: it upcasts its input, and ``group_norm``
  refuses an fp32 input with low-precision weights). Models declare those modules themselves
  with a ``_keep_in_fp32_modules`` class attribute (class names), as the UNet does.
* ``fp32``: fp32 weights, no autocast.

Apply precision BEFORE :func:`engine.runtime.offload.apply_offload` (offload keeps host copies of
the tensors ``to(dtype)`` would replace); :func:`apply_precision` refuses while offload is on.

The cast is undone exactly: :func:`apply_precision` returns a :class:`CastRecord` holding the
original storages (no copy: the tensors the model already had), and :func:`restore_precision`
puts them back, so a later fp32 run is bit-identical to one on a freshly loaded model.

Example:
    >>> record = apply_precision(model, "fp16", device="cuda")
    >>> with precision_context("fp16", "cuda"):
    ...     out = model.apply_model(x, t, c_concat, context, fs)
    >>> restore_precision(model, record)
"""
from __future__ import annotations

import contextlib
import logging
from collections import Counter

import torch
from torch import nn

from ..errors import InvalidArgument
from ..plan.settings import Precision

logger = logging.getLogger(__name__)

__all__ = ["CastRecord", "Precision", "apply_precision", "precision_context", "restore_precision",
           "torch_dtype", "weight_dtype"]

_DEFAULT_KEEP_FP32: tuple[str, ...] = ()


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name such as ``Precision.weight_dtype_name`` ("float16")."""
    return getattr(torch, name)


def weight_dtype(precision: Precision | str) -> torch.dtype:
    """The dtype weights are stored in for ``precision``.

    Example:
        >>> weight_dtype("fp32-autocast")
        torch.float32
    """
    return torch_dtype(Precision.parse(precision, "precision").weight_dtype_name)


def _check_supported(mode: Precision, device: torch.device) -> None:
    if mode is Precision.BF16 and device.type == "cuda" and torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(device)
            raise InvalidArgument(f"`precision` 'bf16' is not supported natively by {name}; use "
                                  f"precision='fp16' or 'fp32-autocast'.")


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


class CastRecord:
    """What :func:`apply_precision` replaced: every weight's original storage, to put back exactly.

    Keeping the originals costs no copy: they are the tensors the model already held (for a
    checkpoint, memory-mapped file pages), kept alive instead of freed.
    """

    def __init__(self, model: nn.Module):
        self.dtype = _dominant_dtype(_components(model))
        self.originals = [(t, t.data) for m in _components(model) for t in _floating(m)]

    def restore(self) -> None:
        for t, data in self.originals:
            t.data = data


def _floating(module: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    for component in _components(model):
        keep = set(getattr(component, "_keep_in_fp32_modules", None) or _DEFAULT_KEEP_FP32)  # diffusers: None
        kept = {id(t) for m in component.modules() if type(m).__name__ in keep for t in _floating(m)}
        for t in _floating(component):
            wanted = torch.float32 if id(t) in kept else dtype
            if t.dtype != wanted:
                t.data = t.data.to(wanted)


def apply_precision(model: nn.Module, precision: Precision | str, *,
                    device: str | torch.device | None = None) -> CastRecord:
    """Cast the weights for ``precision``; returns a :class:`CastRecord` that undoes it exactly.

    Args:
        model: a :class:`~engine.models.lvdm.LatentVisualDiffusion` (its components are cast,
            the schedule buffers stay fp32) or any module.
        precision: ``"fp32-autocast"``, ``"fp16"``, ``"bf16"`` or ``"fp32"``.
        device: the execution device, for the bf16 support check (default: where the weights
            are; pass it when weights are offloaded or not yet moved).

    Example:
        >>> record = apply_precision(model, "bf16", device="cuda")
        >>> restore_precision(model, record)   # the very tensors the model had before
    """
    from .offload import get_offload

    mode = Precision.parse(precision, "precision")
    components = _components(model)
    if device is None:
        device = next((p.device for m in components for p in m.parameters()), torch.device("cpu"))
    _check_supported(mode, torch.device(device))
    if get_offload(model) is not None:
        raise InvalidArgument("`apply_precision` cannot cast weights while offload is installed; call "
                              "remove_offload(model) first and reapply_offload(model, config) after.")
    record = CastRecord(model)
    _cast(model, weight_dtype(mode))
    logger.debug("precision %s: weights %s -> %s", mode.value, record.dtype, weight_dtype(mode))
    return record


def restore_precision(model: nn.Module, previous: CastRecord | torch.dtype) -> None:
    """Undo :func:`apply_precision`: exactly with its :class:`CastRecord`, or cast to a dtype.

    Example:
        >>> restore_precision(model, apply_precision(model, "fp16"))
    """
    from .offload import get_offload

    if get_offload(model) is not None:
        raise InvalidArgument("`restore_precision` cannot restore weights while offload is installed; "
                              "call remove_offload(model) first.")
    if isinstance(previous, CastRecord):
        previous.restore()
    else:
        _cast(model, previous)


def precision_context(mode: Precision | str, device: str | torch.device):
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
    mode, device = Precision.parse(mode, "precision"), torch.device(device)
    _check_supported(mode, device)
    if mode is Precision.FP32_AUTOCAST and device.type != "cpu":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()
