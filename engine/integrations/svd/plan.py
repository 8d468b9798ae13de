"""``plan_svd``: the fastest memory settings for a ``StableVideoDiffusionPipeline`` call that fit.

Search, fastest first: least offload, then the device's preferred precision (one at least as
wide as a precision that did not fit is skipped: it needs at least as much); within those the
stages are independent (each stage's peak depends on its own setting only), so the denoising
stage takes the UNet's default attention if it fits, else feed-forward chunking, and the decode
takes the largest ``decode_chunk_size`` (``num_frames`` down to 1) that fits. The first
(offload, precision) whose every stage fits wins; if none does, :class:`~engine.errors.DoesNotFit`
names the smallest need.

Example:
    >>> plan = plan_svd(pipe, height=576, width=1024, num_frames=14, max_memory="12GiB")
    >>> print(plan.explain())
    >>> kwargs = apply_svd_plan(pipe, plan)      # casts, attention, offload; removable
    >>> frames = pipe(image, **kwargs).frames    # decode_chunk_size and the planned size
    >>> remove_svd_plan(pipe)
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from ...device.spec import format_bytes
from ...errors import WrongType
from ...plan.settings import Offload, Precision
from .estimate import StageEstimate, SVDWorkload, estimate_stage, estimate_stages, weights_bytes
from .inputs import check_budget, check_device, check_guidance, check_pipeline, check_size, too_small
from .settings import COMPONENTS, SVD_STAGES, SVDAttention, SVDSettings

logger = logging.getLogger(__name__)

__all__ = ["SVDPlan", "plan_svd"]

_CPU_NOTES = ("offload: none on the CPU; the weights already live in host memory, so diffusers' model "
              "offload would move nothing",
              "precision: fp32, then bf16 on the CPU; fp16 is not searched there (slow CPU kernels)")

_COMMON_NOTES = ("held tensors assume one image, num_videos_per_prompt=1 and at least two denoising steps",
                 "numpy/PIL outputs (output_type 'np' or 'pil') are copies outside torch, not counted")
_CUDA_NOTES = ("the budget counts tensor bytes from the caching allocator; the CUDA context and "
               "cached free blocks are not included: leave headroom",)


@dataclass(frozen=True)
class SVDPlan:
    """Settings for one SVD call and what each stage is predicted to hold (read-only).

    ``stages`` are in execution order; ``rejected`` lists faster settings that did not fit, with
    their predicted peak. ``call_kwargs()`` are the arguments the pipeline call needs.
    """

    device: str
    height: int
    width: int
    num_frames: int
    max_guidance_scale: float
    budget_bytes: int
    settings: SVDSettings
    stages: tuple[StageEstimate, ...]
    rejected: tuple[tuple[str, int], ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def peak_bytes(self) -> int:
        return max(s.peak_bytes for s in self.stages)

    def stage(self, name: str) -> StageEstimate:
        return next(s for s in self.stages if s.name == name)

    def call_kwargs(self) -> dict:
        """Keyword arguments for ``pipe(image, **kwargs)``: the planned size and decode chunk."""
        return {"height": self.height, "width": self.width, "num_frames": self.num_frames,
                "decode_chunk_size": self.settings.decode_chunk_size,
                "max_guidance_scale": self.max_guidance_scale}

    def explain(self) -> str:
        lines = [f"SVD {self.height}x{self.width}x{self.num_frames} on {self.device}: "
                 f"{self.settings.label()}",
                 f"predicted peak {format_bytes(self.peak_bytes)} of a {format_bytes(self.budget_bytes)} budget"]
        for s in self.stages:
            lines.append(f"  {s.name:<12} {format_bytes(s.peak_bytes):>10} = weights {format_bytes(s.weights_bytes)} "
                         f"({'+'.join(s.resident)}) + held {format_bytes(s.held_bytes)} + call {format_bytes(s.call_bytes)}")
        lines += [f"  rejected: {label} needs {format_bytes(need)}" for label, need in self.rejected]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"device": self.device, "height": self.height, "width": self.width,
                           "num_frames": self.num_frames, "max_guidance_scale": self.max_guidance_scale,
                           "budget_bytes": self.budget_bytes, "peak_bytes": self.peak_bytes,
                           "settings": self.settings.to_dict(),
                           "stages": [s.to_dict() for s in self.stages],
                           "rejected": [list(r) for r in self.rejected], "notes": list(self.notes)},
                          indent=1)


def _precisions(device: str) -> tuple[Precision, ...]:
    if device == "cpu":
        return Precision.FP32, Precision.BF16
    import torch

    bf16 = not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False)
    return (Precision.FP16, *((Precision.BF16,) if bf16 else ()), Precision.FP32)


def _offloads(device: str) -> tuple[Offload, ...]:
    return (Offload.NONE,) if device == "cpu" else (Offload.NONE, Offload.MODEL)


def _weights_floor(pipe, device: str) -> tuple[int, str]:
    """The least any plan can hold: the largest component alone at the smallest precision."""
    precision = min(_precisions(device), key=lambda p: p.weight_bytes)
    sizes = {n: weights_bytes(getattr(pipe, n), precision) for n in COMPONENTS}
    if device == "cpu":
        return sum(sizes.values()), f"{precision.value} weights of every component"
    name = max(sizes, key=sizes.get)
    return sizes[name], f"the {precision.value} {name} alone"


class _Search:
    """The per-stage choices for one (offload, precision), cheapest traces first."""

    def __init__(self, pipe, work: SVDWorkload, budget: int):
        self.pipe, self.work, self.budget = pipe, work, budget
        self.rejected: list[tuple[str, int]] = []

    def _first_fit(self, stage, options: list[SVDSettings]) -> tuple[SVDSettings, StageEstimate | None]:
        for settings in options:
            est = estimate_stage(self.pipe, stage, self.work, settings)
            if est.peak_bytes <= self.budget:
                return settings, est
            self.rejected.append((f"{settings.label()} at {stage.name}", est.peak_bytes))
        return options[-1], None

    def settle(self, offload: Offload, precision: Precision) -> SVDSettings | None:
        """The fastest fitting settings with this offload and precision, or None."""
        base = SVDSettings(offload, precision, SVDAttention.DEFAULT, self.work.num_frames)
        for stage in SVD_STAGES[:2]:
            if self._first_fit(stage, [base])[1] is None:
                return None
        base, fit = self._first_fit(SVD_STAGES[2], [base, SVDSettings(offload, precision,
                                                                      SVDAttention.FF_CHUNK, base.decode_chunk_size)])
        if fit is None:
            return None
        chunks = [SVDSettings(offload, precision, base.attention, k) for k in range(self.work.num_frames, 0, -1)]
        settings, fit = self._first_fit(SVD_STAGES[3], chunks)
        return settings if fit is not None else None

    def run(self, device: str) -> SVDSettings:
        """The first (offload, precision) whose stages all fit; a precision at least as wide as
        one that did not fit is skipped (it needs at least as much)."""
        narrowest: dict[Offload, Precision] = {}
        for offload in _offloads(device):
            for precision in _precisions(device):
                if offload in narrowest and precision.weight_bytes >= narrowest[offload].weight_bytes:
                    continue
                settings = self.settle(offload, precision)
                if settings is not None:
                    return settings
                if offload not in narrowest or precision.weight_bytes < narrowest[offload].weight_bytes:
                    narrowest[offload] = precision
        need, smallest = self.smallest(narrowest.items())
        raise too_small(self.budget, need, smallest.label())

    def smallest(self, combos) -> tuple[int, SVDSettings]:
        """The least peak over ``combos`` with the least-memory setting of every stage."""
        options = [SVDSettings(o, p, SVDAttention.FF_CHUNK, 1) for o, p in combos]
        needs = [(max(s.peak_bytes for s in estimate_stages(self.pipe, self.work, o)), o) for o in options]
        return min(needs, key=lambda n: n[0])


def plan_svd(pipe, *, height: int, width: int, num_frames: int, max_memory: int | str | None = None,
             device: str | None = None, max_guidance_scale: float = 3.0) -> SVDPlan:
    """Plan memory settings for ``pipe(image, height=..., width=..., num_frames=...)``.

    Args:
        pipe: a diffusers ``StableVideoDiffusionPipeline`` (weights may be random; nothing runs).
        height, width: output size in pixels (multiples of 8 the UNet can halve down to its bottom).
        num_frames: frames of the video.
        max_memory: the budget: bytes or a size such as ``"12GiB"``; None: the device's free
            memory now (on the CPU plus the weights it already holds).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; default: where ``pipe.unet`` is.
        max_guidance_scale: as passed to the pipeline; above 1 the UNet runs a CFG batch of 2.

    Returns:
        An :class:`SVDPlan`; raises :class:`~engine.errors.DoesNotFit` if no setting fits.
    """
    check_pipeline(pipe)
    height, width, num_frames = check_size(pipe, height, width, num_frames)
    guidance = check_guidance(max_guidance_scale)
    device = check_device(device, pipe)
    budget = check_budget(max_memory, device) + (_held_weights(pipe) if max_memory is None and device == "cpu" else 0)
    floor, what = _weights_floor(pipe, device)
    if floor > budget:
        raise too_small(budget, floor, what)
    work = SVDWorkload(height, width, num_frames, guidance > 1.0, device)
    search = _Search(pipe, work, budget)
    settings = search.run(device)
    notes = (_CPU_NOTES if device == "cpu" else _CUDA_NOTES) + _COMMON_NOTES
    plan = SVDPlan(device, height, width, num_frames, guidance, budget, settings,
                   estimate_stages(pipe, work, settings), tuple(search.rejected), notes)
    logger.info("SVD plan: %s, peak %s", settings.label(), format_bytes(plan.peak_bytes))
    return plan


def _held_weights(pipe) -> int:
    return sum(t.nbytes for n in COMPONENTS for t in getattr(pipe, n).parameters())


def check_plan(plan) -> SVDPlan:
    if not isinstance(plan, SVDPlan):
        raise WrongType(f"`plan` has type {type(plan).__name__}; pass the SVDPlan that plan_svd returned.")
    return plan
