"""Attaching a plan's :class:`~engine.plan.settings.Settings` to a model for one run, stage by stage.

:func:`attached` takes the model's lock (runs on one model are serialised), records its tensors,
applies precision, attention backends and offload, and yields a :class:`Run` whose
:meth:`Run.stage` context onloads the components the stage table names, runs the stage under the
plan's precision regime and measures it. On exit every policy is removed and the model is given
back exactly as it was (see :mod:`engine.runtime.residency` for the one deliberate exception).

Example:
    >>> with attached(model, plan.settings, "cuda") as run:
    ...     with run.stage("vae_decode"):
    ...         video = decode_frames(model.first_stage_model, z, plan.settings.ae_decode)
    >>> run.records[-1].name, run.records[-1].time_s
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from ..plan.settings import Offload, Precision, Settings
from ..plan.stages import COMPONENT_NAMES, stage as stage_of
from .attention import restore_attention_backend, set_attention_backend
from .offload import apply_offload, remove_offload
from .precision import apply_precision, precision_context, weight_dtype
from .residency import Kept, TensorRecord, model_state, place

log = logging.getLogger(__name__)

# DynamiCrafter never freezes these: autocast then caches fp16 copies of their weights
_GRAD_COMPONENTS = ("unet", "image_proj")


@dataclass(frozen=True)
class StageRecord:
    """One stage as executed: what was on the device, how long it took, its measured peak."""

    name: str
    resident: tuple[str, ...]
    time_s: float
    peak_bytes: int | None = None  # the allocator's peak on CUDA; None where the device gives none

    def to_dict(self) -> dict:
        return {"name": self.name, "resident": list(self.resident), "time_s": self.time_s,
                "peak_bytes": self.peak_bytes}


@dataclass
class Run:
    """What the stages need while the policies are attached."""

    settings: Settings
    device: torch.device
    offload: object = None  # the OffloadHandle in model/block mode
    records: list[StageRecord] = field(default_factory=list)

    @property
    def input_dtype(self) -> torch.dtype:
        """Inputs follow the weights (fp32 under autocast)."""
        return weight_dtype(self.settings.precision)

    @contextlib.contextmanager
    def stage(self, name: str):
        """One stage: its components resident, the plan's precision regime, measured."""
        cuda = self.device.type == "cuda"
        if cuda and self.settings.empty_cache:
            torch.cuda.empty_cache()  # give the previous stage's cached blocks back (lowers the peak)
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        components = stage_of(name).components
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if self.offload is not None:
                stack.enter_context(self.offload.onload(*components))
            stack.enter_context(precision_context(self.settings.precision, self.device))
            resident = self._resident()
            yield self
        if cuda:
            torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
        self.records.append(StageRecord(name, resident, time.perf_counter() - start, peak))

    def _resident(self) -> tuple[str, ...]:
        if self.offload is None:
            return COMPONENT_NAMES
        return tuple(n for n in COMPONENT_NAMES if self.offload.is_resident(n))


@contextlib.contextmanager
def attached(model, settings: Settings, device):
    """Apply ``settings`` to ``model`` for one run; give the model back as it was afterwards."""
    device = torch.device(device)
    state = model_state(model)
    with state.lock:
        record = _prepare_weights(model, settings, device, state)
        grads = [(p, p.requires_grad) for p in model.parameters()]
        unet = model.model.diffusion_model
        previous = set_attention_backend(unet, None, spatial=settings.backend("spatial"),
                                         temporal=settings.backend("temporal"), device=device)
        handle = None
        try:
            if settings.autocast_weight_cache and settings.precision is Precision.FP32_AUTOCAST:
                for name in _GRAD_COMPONENTS:
                    model.component(name).requires_grad_(True)
            if settings.offload is not Offload.NONE:
                handle = apply_offload(model, settings.offload, device=device)
            yield Run(settings, device, handle)
        finally:
            remove_offload(model)
            restore_attention_backend(unet, previous)
            for p, requires_grad in grads:
                p.requires_grad_(requires_grad)
            _finish_weights(settings, device, state, record)


def _prepare_weights(model, settings: Settings, device: torch.device, state) -> TensorRecord | None:
    """Cast and place the weights for this run, reusing what the last run kept where it fits."""
    keeps = settings.offload is Offload.NONE and device.type != "cpu"
    if keeps and state.reusable(settings.precision.value, device):
        return None  # already in this precision on this device
    state.drop_kept()
    record = TensorRecord(model)
    apply_precision(model, settings.precision, device=device)
    if settings.offload is Offload.NONE:
        place(model, device)
    return record


def _finish_weights(settings: Settings, device: torch.device, state, record) -> None:
    if record is None:  # the weights the last run kept served this one; they stay
        return
    if settings.offload is Offload.NONE and device.type != "cpu":
        state.kept = Kept(settings.precision.value, device, record)
        log.debug("weights kept on %s in %s for the next run", device, settings.precision)
    else:
        record.restore()
