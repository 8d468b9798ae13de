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
import gc
import logging
import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from ..plan.aemode import AEMode
from ..plan.settings import Offload, Precision, Settings
from ..plan.stages import COMPONENT_NAMES, stage as stage_of
from ..device.spec import format_bytes
from .attention import restore_attention_backend, set_attention_backend
from .budget import MemoryBudget
from .offload import apply_offload, remove_offload
from .precision import apply_precision, precision_context, weight_dtype
from .recovery import MAX_REPLANS, Adjustment, OutOfMemory, Predictor, choose_rung
from .residency import Kept, TensorRecord, model_state, place

log = logging.getLogger(__name__)

_MINIMAL_CALL_REPEATS = 5
# DynamiCrafter never freezes these: autocast then caches fp16 copies of their weights
_GRAD_COMPONENTS = ("unet", "image_proj")


@dataclass(frozen=True)
class StageRecord:
    """One stage as executed: what was on the device, how long it took, its measured peak."""

    name: str
    resident: tuple[str, ...]
    time_s: float
    peak_bytes: int | None = None  # the allocator's peak on CUDA; None where the device gives none
    call_s: float | None = None  # a minimal call of the stage's model: its fixed cost per call

    def to_dict(self) -> dict:
        return {"name": self.name, "resident": list(self.resident), "time_s": self.time_s,
                "peak_bytes": self.peak_bytes, "call_s": self.call_s}


@dataclass
class Run:
    """What the stages need while the policies are attached; re-applies settings after a re-plan."""

    model: object
    settings: Settings
    device: torch.device
    budget: MemoryBudget
    frames: int = 1
    offload: object = None  # the OffloadHandle in model/block mode
    records: list[StageRecord] = field(default_factory=list)
    adjustments: list[Adjustment] = field(default_factory=list)
    plan: object = None  # the Plan being run, when there is one: its predictions guide re-plans
    predict: Predictor | None = None  # the planner's stage peak under other settings (with a plan)

    def check_headroom(self, name: str) -> None:
        """Before ``name``: if memory was taken since planning (another program, a smaller cap) and
        the stage's predicted peak no longer fits, re-plan it before it fails."""
        if self.plan is None or self.replans() >= MAX_REPLANS:
            return
        predicted = self.plan.stage(name)
        context = predicted.terms.get("cuda_context", 0)
        available = self.budget.available_bytes() + context  # the context is in use already
        if predicted.peak_bytes <= available or self.settings != self.plan.settings:
            return
        new, how = self._rung(name, available - context)  # predictions are given without it
        if new is None:
            return  # nothing smaller: run it and recover if it really runs out
        why = (f"free memory fell to {format_bytes(available)} since planning; the plan predicted "
               f"{format_bytes(predicted.peak_bytes)} for {name}{how}")
        self.adjustments.append(Adjustment(name, None, self.settings, new, why))
        log.warning("%s: %s; continuing with %s", name, why, self.adjustments[-1].describe_changes())
        self._reapply(new)

    def _rung(self, name: str, available: int, need: int = 0) -> tuple[Settings | None, str]:
        return choose_rung(name, self.settings, accelerator=self.device.type != "cpu", frames=self.frames,
                           available=available, need=need, predict=self.predict)

    def size_chunks(self, name: str, chunk: int, measured: dict, remaining: int) -> None:
        """After the first chunk of ``name`` (``chunk`` frames, ``measured`` by
        :meth:`MemoryBudget.measuring`): give the remaining ``remaining`` frames the largest chunk
        whose need, scaled from the measured one, fits 90 % of the memory available now.

        Only a plan's own choice is resized (forced settings stay, and so do tiles); the need of a
        chunk grows with its frames, and scaling the measured bytes per frame counts the fixed
        part again for every frame, so a grown chunk needs no more than predicted here.
        """
        key = stage_of(name).ae_setting
        mode = getattr(self.settings, key)
        forced = {item.split("=")[0] for item in self.plan.forced} if self.plan is not None else set()
        if (self.plan is None or key in forced or "reference" in forced or mode is None or mode.tile is not None
                or remaining <= 0 or "peak" not in measured):
            return
        per_frame = max(1, measured["peak"] - measured["start"]) / chunk
        room = 0.9 * self.budget.available_bytes() - self.budget.live_bytes()
        best = max(1, min(remaining, int(room // per_frame)))
        if best == chunk:
            return
        new = replace(self.settings, **{key: AEMode(chunk=best)})
        why = (f"the first {chunk}-frame chunk needed {format_bytes(measured['peak'] - measured['start'])}; "
               f"{format_bytes(max(0, int(room)))} is free for the remaining {remaining} frames")
        self.adjustments.append(Adjustment(name, 1, self.settings, new, why, measured=True))
        log.info("%s: %s; continuing with %s", name, why, self.adjustments[-1].describe_changes())
        self.settings = new

    def replans(self) -> int:
        """Re-plans made for trouble (a measured resize of chunks is not one)."""
        return sum(not a.measured for a in self.adjustments)

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
        self.budget.at(name, reset_peak=True)
        start = time.perf_counter()
        with self.placed(name):
            resident = self._resident()
            yield self
        if cuda:
            torch.cuda.synchronize(self.device)
        peak = (max(torch.cuda.max_memory_allocated(self.device), self.budget.peak_floor) if cuda
                else self.budget.stage_peak())
        self.records.append(StageRecord(name, resident, time.perf_counter() - start, peak))

    @contextlib.contextmanager
    def placed(self, name: str):
        """Stage ``name``'s components resident and the plan's precision regime."""
        with contextlib.ExitStack() as stack:
            if self.offload is not None:
                stack.enter_context(self.offload.onload(*stage_of(name).components))
            stack.enter_context(precision_context(self.settings.precision, self.device))
            yield

    def time_minimal_call(self, name: str, call, calls: int = 1) -> None:
        """Time ``call`` (``calls`` calls of stage ``name``'s model as the run makes them, at their
        smallest input: what every call costs whatever its size) and keep the cost of one in the
        stage's record as ``call_s``, for calibration.

        The median of five after a warm-up (a new shape's one-off costs: oneDNN primitives, cuDNN
        autotuning): the stage's own time is a sum over its calls, disturbances included, so the
        fixed cost it is compared with is a typical call, not the luckiest one. Outside the
        stage's time; a failure only leaves ``call_s`` unmeasured.
        """
        cuda = self.device.type == "cuda"
        self.budget.at("calibration")  # outside every stage: no fault or measurement of theirs
        try:
            with self.placed(name), torch.no_grad():
                call()
                times = []
                for _ in range(_MINIMAL_CALL_REPEATS):
                    start = time.perf_counter()
                    call()
                    if cuda:
                        torch.cuda.synchronize(self.device)
                    times.append(time.perf_counter() - start)
        except torch.OutOfMemoryError:
            log.info("no room for the minimal %s call; its fixed cost stays unmeasured", name)
            return
        i = max(i for i, r in enumerate(self.records) if r.name == name)
        self.records[i] = replace(self.records[i], call_s=statistics.median(times) / calls)

    def _resident(self) -> tuple[str, ...]:
        if self.offload is None:
            return COMPONENT_NAMES
        return tuple(n for n in COMPONENT_NAMES if self.offload.is_resident(n))

    def recover(self, name: str, step: int | None, error: BaseException) -> Settings:
        """After ``name`` ran out of memory: free what can be freed, re-read the memory available,
        choose smaller settings for the stage (:func:`~engine.runtime.recovery.choose_rung`, with
        the measured need as a floor), re-apply them and return them; :class:`OutOfMemory` when
        none is left."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        need = self.budget.need_bytes
        new, how = (None, "") if self.replans() >= MAX_REPLANS else self._rung(
            name, self.budget.available_bytes(), need)
        if new is None and not any(a.stage == name and not a.measured for a in self.adjustments):
            new = self.settings  # nothing smaller: once, the same settings after freeing memory
        if new is None:
            tried = "; ".join(a.new.describe() for a in self.adjustments) or self.settings.describe()
            raise OutOfMemory(f"`{name}` ran out of memory ({error}; it needed {format_bytes(need)}) after "
                              f"{self.replans()} re-plan(s), settings tried: {tried}; raise `max_memory`, "
                              "free device memory or lower the resolution or frame count.") from error
        why = f"out of memory: {error}" + ("; retried after freeing memory" if new == self.settings else how)
        adjustment = Adjustment(name, step, self.settings, new, why)
        log.warning("%s ran out of memory%s; continuing with %s", name,
                    "" if step is None else f" at step {step}", adjustment.describe_changes())
        self.adjustments.append(adjustment)
        self._reapply(new)
        return new

    def _reapply(self, new: Settings) -> None:
        old, self.settings = self.settings, new
        unet = self.model.model.diffusion_model
        if (old.backend("spatial"), old.backend("temporal")) != (new.backend("spatial"), new.backend("temporal")):
            set_attention_backend(unet, None, spatial=new.backend("spatial"), temporal=new.backend("temporal"),
                                  device=self.device)
        if old.offload is not new.offload:
            remove_offload(self.model)
            self.offload = (apply_offload(self.model, new.offload, device=self.device)
                            if new.offload is not Offload.NONE else None)


@contextlib.contextmanager
def attached(model, settings: Settings, device, *, frames: int = 1, max_memory: int | None = None,
             budget: MemoryBudget | None = None, plan=None, predict: Predictor | None = None):
    """Apply ``settings`` to ``model`` for one run, within ``max_memory`` bytes (or ``budget``);
    give the model back as it was afterwards. ``predict`` (with ``plan``) guides re-plans."""
    device = torch.device(device)
    state = model_state(model)
    with state.lock:
        record = _prepare_weights(model, settings, device, state)
        grads = [(p, p.requires_grad) for p in model.parameters()]
        unet = model.model.diffusion_model
        previous = set_attention_backend(unet, None, spatial=settings.backend("spatial"),
                                         temporal=settings.backend("temporal"), device=device)
        run = None
        try:
            if settings.autocast_weight_cache and settings.precision is Precision.FP32_AUTOCAST:
                for name in _GRAD_COMPONENTS:
                    model.component(name).requires_grad_(True)
            handle = (apply_offload(model, settings.offload, device=device)
                      if settings.offload is not Offload.NONE else None)
            budget = budget or MemoryBudget(max_memory, device)
            budget.baseline_bytes = budget.baseline_bytes or _held_bytes(model, device)
            if budget.max_bytes is not None and budget.max_bytes <= budget.baseline_bytes:
                raise OutOfMemory(f"`max_memory` {format_bytes(budget.max_bytes)} is below the "
                                  f"{format_bytes(budget.baseline_bytes)} the model's weights already take "
                                  f"on {device}; raise it or plan a lower precision.")
            run = Run(model, settings, device, budget, frames, handle, plan=plan, predict=predict)
            with budget:
                yield run
        finally:
            remove_offload(model)
            restore_attention_backend(unet, previous)
            for p, requires_grad in grads:
                p.requires_grad_(requires_grad)
            _finish_weights(run.settings if run else settings, device, state, record)


def _held_bytes(model, device: torch.device) -> int:
    """Bytes of the model's tensors on ``device`` when the run starts (the CPU budget's baseline)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if t.device == device and key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


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
