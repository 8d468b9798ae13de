"""One fake trace of a stage, kept as an event log that scaling laws can be derived from.

:class:`LogTracer` is a :class:`~engine.estimate.tracing.trace.Tracer` that also writes down, in order,
every allocation (its exact byte size, before and after the CUDA allocator's rounding), every free,
every kernel scratch transient, the FLOPs of every op and the bytes every non-view op reads and
writes. Because the UNet's op sequence does not depend on the latent shape, two logs of the same
call at two shapes line up item by item; :mod:`engine.estimate.laws.monomials` then reads each item's
size as a monomial in the shape features and rebuilds the whole memory timeline as a formula.

:func:`emulated_autocast` is ``torch.autocast`` without its availability check: ``torch.autocast(
"cuda")`` disables itself (with a warning) on a machine without a GPU, but the autocast dispatch
keys work on fake CUDA tensors, so setting the thread-local autocast state directly traces exactly
what a card would run (weight casts included).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .trace import MemKind, Tracer

logger = logging.getLogger(__name__)

__all__ = ["LogTracer", "TraceLog", "emulated_autocast", "trace_log"]

aten = torch.ops.aten
_HALF = (torch.float16, torch.bfloat16)


@dataclasses.dataclass
class TraceLog:
    """What one traced call allocated, freed and computed, in program order.

    Attributes:
        raw: exact byte size of each allocated storage (index = record id).
        rounded: the same after the traced device's allocator rounding.
        events: ``rid`` for an allocation, ``~rid`` (negative) for a free, in order.
        transients: ``(position in events, op index, bytes)`` of kernel scratch memory.
        op_flops: FLOPs of every dispatched op, in order.
        moved: input and output bytes of every non-view op, flattened in order.
        cast_weight_keys: storage keys of weights that were cast to fp16/bf16 (autocast).
        alive_at_end: record ids still allocated when the call returned.
        num_ops: dispatched ops.
        seconds: wall time of the trace.
    """

    raw: list[int] = dataclasses.field(default_factory=list)
    rounded: list[int] = dataclasses.field(default_factory=list)
    events: list[int] = dataclasses.field(default_factory=list)
    transients: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    op_flops: list[int] = dataclasses.field(default_factory=list)
    moved: list[int] = dataclasses.field(default_factory=list)
    cast_weight_keys: set[int] = dataclasses.field(default_factory=set)
    alive_at_end: list[int] = dataclasses.field(default_factory=list)
    num_ops: int = 0
    seconds: float = 0.0

    def peak_new_bytes(self) -> int:
        """Replay the log: the largest live new bytes, transients included (as the tracer does)."""
        live = peak = 0
        scratch: dict[int, int] = {}
        for pos, _, size in self.transients:
            scratch[pos] = max(scratch.get(pos, 0), size)
        for pos, ev in enumerate(self.events):
            peak = max(peak, live + scratch.get(pos, 0))
            live += self.rounded[ev] if ev >= 0 else -self.rounded[~ev]
            peak = max(peak, live)
        return max(peak, live + scratch.get(len(self.events), 0))


class LogTracer(Tracer):
    """A :class:`Tracer` that also fills a :class:`TraceLog` (see the module docstring).

    It hooks the tracer's private bookkeeping methods (same package, same invariants): every
    allocation, free and transient the base class counts is logged too, so the log replays to
    exactly the tracer's peak.
    """

    def _reset_state(self) -> None:
        super()._reset_state()
        self.log = TraceLog()
        self._rid: dict[int, int] = {}

    def _alloc(self, key: int, storage: torch.UntypedStorage, size: int) -> None:
        self._rid[key] = len(self.log.raw)
        self.log.events.append(len(self.log.raw))
        self.log.raw.append(int(storage.nbytes()))
        self.log.rounded.append(int(size))
        super()._alloc(key, storage, size)

    def _free(self, key: int) -> None:
        rid = self._rid.pop(key, None)
        if rid is not None:
            self.log.events.append(~rid)
        super()._free(key)

    def _transient(self, size: int) -> None:
        self.log.transients.append((len(self.log.events), self._op_count, int(size)))
        super()._transient(size)

    def _after_op(self, func: Any, args: Any, kwargs: Any, out: Any, inputs: list[torch.Tensor]) -> None:
        super()._after_op(func, args, kwargs, out, inputs)
        self.log.op_flops.append(self._last_op_flops)
        self.log.moved.extend(self._last_moved)
        if func is aten._to_copy.default and isinstance(out, torch.Tensor) and out.dtype in _HALF:
            key = args[0].untyped_storage()._cdata
            if self._pre.get(key, (0, None))[1] is MemKind.WEIGHTS:
                self.log.cast_weight_keys.add(key)

    def finish(self) -> TraceLog:
        """Close the log (call inside the ``with`` block, after the traced call returned)."""
        self.log.alive_at_end = sorted(self._rid.values())
        self.log.num_ops = self._op_count
        return self.log


@contextlib.contextmanager
def emulated_autocast(device_type: str, dtype: torch.dtype = torch.float16) -> Iterator[None]:
    """``torch.autocast(device_type, dtype)`` that also works for fake CUDA tensors on a CPU host.

    Args:
        device_type: the autocast device type, ``"cuda"`` or ``"cpu"``.
        dtype: the lower-precision compute dtype.
    """
    prev_enabled = torch.is_autocast_enabled(device_type)
    prev_dtype = torch.get_autocast_dtype(device_type)
    torch.set_autocast_enabled(device_type, True)
    torch.set_autocast_dtype(device_type, dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        # Leaving the outermost block drops the weight-cast cache, as torch.autocast does.
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(device_type, prev_enabled)
        torch.set_autocast_dtype(device_type, prev_dtype)


def _cast_modules(modules: tuple[nn.Module, ...], log: TraceLog) -> list[nn.Module]:
    """Submodules whose own ``weight`` the traced call cast to half precision.

    Runs inside the tracer, where parameters are still swapped for the fakes the log keyed.
    """
    return [sub for module in modules for sub in module.modules()
            if sub._parameters.get("weight") is not None
            and sub._parameters["weight"].untyped_storage()._cdata in log.cast_weight_keys]


def trace_log(fn: Callable[..., Any], args: tuple, modules: tuple[nn.Module, ...], *,
              device: str, sdpa_backend: str = "auto",
              autocast_dtype: torch.dtype | None = None) -> tuple[TraceLog, list[nn.Module]]:
    """Trace ``fn(*args)`` under fake tensors; return its log and the modules autocast cast.

    Args:
        fn: the call to trace; it is run under ``torch.no_grad()``.
        args: positional arguments (real or meta tensors, converted to fake inputs).
        modules: modules whose weights count as resident (and are searched for casts).
        device: the device type to plan for.
        sdpa_backend: attention kernel to assume, as in :class:`Tracer`.
        autocast_dtype: run under emulated autocast to this dtype, or None for no autocast.
    """
    start = time.perf_counter()
    tracer = LogTracer(device, sdpa_backend=sdpa_backend)
    amp = (emulated_autocast(tracer.device.type, autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with torch.no_grad(), tracer:
        tracer.track_modules(*modules)
        fargs = tracer.fake(args)
        with amp:
            out = fn(*fargs)
        log = tracer.finish()
        cast = _cast_modules(modules, log)
    del out  # released only now: the tracer has stopped following frees
    log.seconds = time.perf_counter() - start
    logger.debug("logged %d ops, %d allocations in %.2f s", log.num_ops, len(log.raw), log.seconds)
    return log, cast
