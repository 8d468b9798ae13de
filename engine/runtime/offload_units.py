"""Offload structure without the machinery: which units move in each mode and their bytes.

Light on purpose (no accelerate import), so the planner can size offload plans in milliseconds.
"""
from __future__ import annotations

import torch
from torch import nn

from .modes import ModeEnum

_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


class OffloadMode(ModeEnum):
    NONE = "none"
    MODEL = "model"
    BLOCK = "block"


OffloadMode._label = "an offload mode"


def _tensors(module: nn.Module, seen: set[int]) -> list[torch.Tensor]:
    """Parameters and buffers of ``module`` not yet claimed by another group."""
    out = []
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _components(model: nn.Module) -> dict[str, nn.Module]:
    """Public component name -> module; a module that is not the container is one component."""
    from ..models.lvdm import COMPONENTS, LatentVisualDiffusion

    if isinstance(model, LatentVisualDiffusion):
        return {name: model.get_submodule(path) for name, path in COMPONENTS.items()}
    return {"model": model}


def _declares_blocks(module: nn.Module) -> bool:
    return bool(getattr(module, "_block_modules", ()))


def _block_units(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The offload units of a module declaring ``_block_modules``: each element of a block list,
    and every other child as one unit (containers are split since their forward never runs)."""
    units = []
    for name, child in module.named_children():
        if isinstance(child, _CONTAINERS):
            units += [(f"{name}.{i}", sub) for i, sub in child.named_children()]
        else:
            units.append((name, child))
    return units


def _nbytes(tensors, dtype: torch.dtype | None) -> int:
    """Bytes of ``tensors`` with floating ones counted at ``dtype`` (integer buffers keep theirs)."""
    return sum(t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point()
                            else t.element_size()) for t in tensors)


def offload_units(model: nn.Module, mode: OffloadMode | str,
                  dtype: torch.dtype | None = None) -> list[tuple[str, int]]:
    """The units that move in ``mode``, with their weight bytes, in module order (works on meta).

    In ``model`` mode one unit per component; in ``block`` mode the UNet's units
    (``unet.input_blocks.0``, ...) then the other components. A block-mode stage holds at most
    two consecutive units of the UNet on the device.

    Args:
        model: the container or a module, as for :func:`apply_offload`.
        mode: the offload mode.
        dtype: weight dtype to count floating tensors at (default: their current dtype).

    Example:
        >>> max(b for _, b in offload_units(model, "block", torch.float16) if _.startswith("unet."))
    """
    mode, seen, units = OffloadMode.parse(mode), set(), []
    if mode is OffloadMode.NONE:
        return units
    for name, module in _components(model).items():
        if mode is OffloadMode.BLOCK and _declares_blocks(module):
            units += [(f"{name}.{u}", _nbytes(_tensors(m, seen), dtype)) for u, m in _block_units(module)]
        else:
            units.append((name, _nbytes(_tensors(module, seen), dtype)))
    return [(name, n) for name, n in units if n]


def offload_host_bytes(model: nn.Module, mode: OffloadMode | str, dtype: torch.dtype | None = None) -> int:
    """Host memory the offloaded weights occupy (pinned when offloading to CUDA with pinning).

    Each offloaded tensor has exactly one host copy, held for the whole run (also while the
    weight is on the device), so this is the sum of :func:`offload_units`; ``none`` needs 0.
    Applying from pageable CPU weights briefly needs one extra tensor (the largest) while it is
    copied into pinned memory. Works on meta-device models.

    Args:
        model: the container or a module.
        mode: the offload mode.
        dtype: weight dtype to count floating tensors at (default: their current dtype).

    Example:
        >>> offload_host_bytes(build_model(spec, device="meta"), "model", torch.float16)
    """
    return sum(n for _, n in offload_units(model, mode, dtype))
