"""A memory budget that is enforced, on every device, with the error a real shortage raises.

* CUDA: the caching allocator's own per-process cap (``torch.cuda.set_per_process_memory_fraction``),
  so an allocation past it raises the real ``torch.OutOfMemoryError``.
* CPU: :class:`LiveBytes`, a dispatch mode that adds up the bytes of every tensor storage created
  while it is active and still alive (plus the bytes the run already holds when it starts) and
  raises ``torch.OutOfMemoryError`` when an allocation takes the total past the cap.

Faults can be injected at a stage and step (:meth:`MemoryBudget.inject`): the next allocation
there raises the same ``torch.OutOfMemoryError``, once. Tests use it to fail any stage
deterministically through the mechanism users get; nothing patches a model.

Example:
    >>> budget = MemoryBudget(2 << 30, "cpu", baseline_bytes=weights)
    >>> with budget:
    ...     budget.at("denoise", 3)
    ...     out = unet(x)          # raises torch.OutOfMemoryError past 2 GiB of live bytes
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ..device.spec import format_bytes


@dataclass
class MemoryBudget:
    """A cap on the device memory one run may use, and deterministic fault injection.

    Args:
        max_bytes: the cap (None: no cap, faults only).
        device: the run's device.
        baseline_bytes: on the CPU, bytes the run already holds when the budget starts (weights).
    """

    max_bytes: int | None
    device: torch.device
    baseline_bytes: int = 0
    faults: set = field(default_factory=set)
    position: tuple = ("", None)
    need_bytes: int = 0  # what the last refused allocation would have brought the total to
    free_reader: object = None  # () -> free device bytes now; default: the driver / host RAM
    peak_floor: int = 0  # CUDA: the stage's peak before a measurement reset the allocator's statistics

    def __post_init__(self):
        self.device = torch.device(self.device)
        self._mode: LiveBytes | None = None

    def inject(self, stage: str, step: int | None = None) -> None:
        """Make the next allocation in ``stage`` (at denoising step or chunk ``step``) run out."""
        self.faults.add((stage, step))

    def at(self, stage: str, step: int | None = None, reset_peak: bool = False) -> None:
        """Where the run is now (the stage and, in a stage made of steps or chunks, which one);
        ``reset_peak`` starts a new stage's peak."""
        self.position = (stage, step)
        if reset_peak:
            self.peak_floor = 0
            if self._mode is not None:
                self._mode.peak = self._mode.live

    def stage_peak(self) -> int | None:
        """Live bytes at their highest since the stage began (CPU tracker only; None without it)."""
        return self._mode.peak if self._mode is not None else None

    def measurable(self) -> bool:
        """Whether :meth:`measuring` can measure here: on CUDA, or on the CPU under a cap."""
        return self.device.type == "cuda" or self._mode is not None

    @contextlib.contextmanager
    def measuring(self) -> Iterator[dict]:
        """Measure the block: yields a dict that gets ``start`` (live bytes when it began) and
        ``peak`` (the most live during it) when it ends. The stage's own peak is kept."""
        cuda = self.device.type == "cuda"
        result = {"start": self.live_bytes()}
        if cuda:
            self.peak_floor = max(self.peak_floor, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._mode is not None:
            stage_peak, self._mode.peak = self._mode.peak, self._mode.live
        yield result
        if cuda:
            result["peak"] = torch.cuda.max_memory_allocated(self.device)
            self.peak_floor = max(self.peak_floor, result["peak"])
        elif self._mode is not None:
            result["peak"] = self._mode.peak
            self._mode.peak = max(stage_peak, self._mode.peak)

    def check_fault(self, nbytes: int) -> None:
        if self.position in self.faults:
            self.faults.discard(self.position)
            self.need_bytes = self.live_bytes() + nbytes
            stage, step = self.position
            raise torch.OutOfMemoryError(f"injected out of memory in {stage}"
                                         + ("" if step is None else f" at step {step}"))

    def available_bytes(self) -> int:
        """What this run could hold now: free device memory plus what it already holds, within the cap."""
        if self.free_reader is not None:
            free = self.free_reader()
        elif self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            import psutil

            free = psutil.virtual_memory().available
        held = torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else self.live_bytes()
        total = free + held
        return total if self.max_bytes is None else min(total, self.max_bytes)

    def live_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self._mode.live if self._mode is not None else self.baseline_bytes

    def __enter__(self) -> MemoryBudget:
        if self.device.type == "cuda" and self.max_bytes is not None:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.max_bytes / total), self.device)
        # the CPU tracker costs time on every op: only when there is a cap or a fault to enforce
        if (self.device.type != "cuda" and self.max_bytes is not None) or self.faults:
            self._mode = LiveBytes(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        if self.device.type == "cuda" and self.max_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)


def _holds_cpu_bytes(t) -> bool:
    """A real CPU tensor (a fake one, e.g. of a shape trace made under the budget, says "cpu" and
    holds nothing)."""
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and not isinstance(t, FakeTensor)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live storages created under it; refuses allocations past the cap."""

    def __init__(self, budget: MemoryBudget):
        super().__init__()
        self.budget = budget
        self.live = budget.baseline_bytes
        self.peak = self.live
        self._storages: dict[int, list] = {}  # data_ptr -> [bytes, live tensor count]
        self._seen = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_flatten(out)[0]:
            if _holds_cpu_bytes(t) and t not in self._seen:
                if inputs is None:
                    inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                              if _holds_cpu_bytes(a)}
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        entry = self._storages.get(key)
        if entry is None and key in inputs:
            return  # a view of a tensor the run already held (a weight): no new bytes
        self._seen[t] = True
        if entry is None:
            budget = self.budget
            budget.check_fault(nbytes)
            if budget.max_bytes is not None and self.live + nbytes > budget.max_bytes:
                budget.need_bytes = self.live + nbytes
                raise torch.OutOfMemoryError(
                    f"CPU memory budget exceeded: {format_bytes(self.live + nbytes)} would be live, the cap "
                    f"is {format_bytes(budget.max_bytes)}")
            entry = self._storages[key] = [nbytes, 0]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._storages[key]
            self.live -= entry[0]
