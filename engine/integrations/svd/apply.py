"""``apply_svd_plan``/``remove_svd_plan``: put a plan's settings on a pipeline, and take them off.

What is applied, honestly:

* precision: every component's floating weights are cast in place (``engine.runtime.precision``);
  the originals are not kept (that would hold both copies), so :func:`remove_svd_plan` casts
  back to the dtype each component had: exact for fp32 plans and widening casts, rounded
  otherwise;
* attention ``ff-chunk``: diffusers' ``unet.enable_forward_chunking(chunk_size=1, dim=0)``; the
  previous per-block chunk settings are put back on removal;
* offload ``model``: diffusers' ``enable_model_cpu_offload(device=plan.device)``; removal drops its
  hooks (``remove_all_hooks``) and moves every component back where it was;
* ``decode_chunk_size``, size and guidance are call arguments: they are returned, not applied.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import InvalidArgument, PlanMismatch
from ...plan.settings import Offload
from ...runtime.precision import apply_precision, restore_precision
from .inputs import check_pipeline
from .plan import SVDPlan, check_plan
from .settings import COMPONENTS, SVDAttention

__all__ = ["apply_svd_plan", "remove_svd_plan"]

_ATTR = "_engine_svd_plan"


@dataclass
class _Applied:
    """What :func:`apply_svd_plan` changed, so that :func:`remove_svd_plan` can undo it."""

    plan: SVDPlan
    dtypes: dict = field(default_factory=dict)
    devices: dict = field(default_factory=dict)
    chunking: list = field(default_factory=list)  # (block, chunk size, dim) before ff-chunking


def _place(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next((t for t in module.parameters() if t.is_floating_point()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _check_device(pipe, plan: SVDPlan) -> None:
    device = _place(pipe.unet)[0]
    if device.type != torch.device(plan.device).type:
        raise PlanMismatch(f"`plan` was made for {plan.device} but `pipe.unet` is on {device}; move the "
                           f"pipeline with pipe.to({plan.device!r}) or plan with device={device.type!r}.")


def _ff_chunk(pipe, applied: _Applied) -> None:
    applied.chunking = [(m, m._chunk_size, m._chunk_dim) for m in pipe.unet.modules()
                        if hasattr(m, "set_chunk_feed_forward")]
    pipe.unet.enable_forward_chunking(chunk_size=1, dim=0)


def apply_svd_plan(pipe, plan: SVDPlan) -> dict:
    """Apply ``plan``'s precision, attention and offload to ``pipe``; return the call's kwargs.

    Args:
        pipe: the ``StableVideoDiffusionPipeline`` the plan was made for, on the plan's device.
        plan: an :class:`~engine.integrations.svd.plan.SVDPlan` from ``plan_svd``.

    Returns:
        ``{"height", "width", "num_frames", "decode_chunk_size", "max_guidance_scale"}`` for
        ``pipe(image, **kwargs)``.

    Example:
        >>> frames = pipe(image, **apply_svd_plan(pipe, plan)).frames
        >>> remove_svd_plan(pipe)               # the pipeline as it was
    """
    check_pipeline(pipe)
    check_plan(plan)
    if getattr(pipe, _ATTR, None) is not None:
        raise InvalidArgument("`pipe` already has an SVD plan applied; call remove_svd_plan(pipe) first.")
    _check_device(pipe, plan)
    applied = _Applied(plan)
    for name in COMPONENTS:
        module = getattr(pipe, name)
        applied.devices[name], applied.dtypes[name] = _place(module)
        apply_precision(module, plan.settings.precision, device=plan.device)  # record dropped: no copies kept
    if plan.settings.attention is SVDAttention.FF_CHUNK:
        _ff_chunk(pipe, applied)
    if plan.settings.offload is Offload.MODEL:
        pipe.enable_model_cpu_offload(device=plan.device)
    setattr(pipe, _ATTR, applied)
    return plan.call_kwargs()


def remove_svd_plan(pipe) -> SVDPlan | None:
    """Undo :func:`apply_svd_plan` on ``pipe``; returns the plan that was applied (None if none)."""
    applied = getattr(pipe, _ATTR, None)
    if applied is None:
        return None
    if applied.plan.settings.offload is Offload.MODEL:
        pipe.remove_all_hooks()
    for block, size, dim in applied.chunking:
        block.set_chunk_feed_forward(chunk_size=size, dim=dim)
    for name in COMPONENTS:
        module = getattr(pipe, name)
        restore_precision(module, applied.dtypes[name])
        module.to(applied.devices[name])
    setattr(pipe, _ATTR, None)
    return applied.plan
