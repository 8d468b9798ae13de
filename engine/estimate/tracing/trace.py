"""Trace a call under fake tensors: peak live bytes by kind, FLOPs and bytes moved, no real memory.

How storages are followed (torch 2.14, checked for real, meta and fake tensors): every tensor's
``untyped_storage()`` returns one Python object per storage for as long as the storage lives
(PyTorch preserves the storage's Python object while C++ still references it), views return the
same object, and a ``weakref`` on that object fires exactly when the last tensor using the storage
dies. Fake storages report ``nbytes()`` correctly but live on the meta device and their
``data_ptr()`` is 0 (and deprecated), so identity is the storage object's ``_cdata`` (its C++
address, unique while alive) and lifetime is the weakref. This is the mechanism PyTorch's own
``MemTracker`` relies on; unlike ``MemTracker`` no per-module state is kept, so a module called
many times in a Python loop (a per-frame decode) is fine.

Categories (:class:`MemKind`): ``WEIGHTS`` are parameters and buffers of modules (swapped for
fakes), ``INPUTS`` every other tensor that existed before the call, ``ACTIVATIONS`` op outputs
still alive when the next op starts, ``TEMPORARIES`` op outputs dropped before the next op starts
(discarded statistics of norms, results nobody keeps) plus kernel scratch memory.

What real kernels do that fakes do not show is corrected in :mod:`engine.estimate.tracing.kernels`:
modelled workspaces (CPU im2col convolution in 2-D and 3-D, oneDNN reorders on the plain and the
channels-last path, CPU flash attention, ``layer_norm`` of strided inputs), output layouts where
real kernels and fakes differ (``group_norm`` keeps channels-last on CPU; ATen's strides of size-1
dims), the in-place bias add of ``linear`` and the choice of attention kernel. Validated on CPU
against the profiler's allocation events (exact on the tested models, ours and foreign ones:
``benchmarks/foreign_modules.py``); the CUDA path (512-byte blocks) is checked against
``active_bytes.all.peak`` only where a GPU is present.

Known limitations: scratch memory of unmodelled kernels is invisible (cuBLAS/cuDNN workspaces,
the CUDA context, CPU transposed and dilated 3-D convolutions); ``UntypedStorage.resize_``
called directly bypasses dispatch; data-dependent ops (``.item()``, ``nonzero``) cannot run on
fake tensors and raise; modules swapped to fakes are fakes for every thread while tracing, so do
not trace a module another thread is running.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import threading
import weakref
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.flop_counter import flop_registry

from .allocator import allocation_bytes, segment_overhead_bytes
from .fake import FakeConverter, ModuleSwap, normalize_device
from .kernels import FidelityMode, real_layout, workspace_bytes

logger = logging.getLogger(__name__)

__all__ = ["MemKind", "TraceResult", "Tracer", "trace_call"]


class MemKind(str, enum.Enum):
    """What a tracked storage holds."""

    WEIGHTS = "weights"
    INPUTS = "inputs"
    ACTIVATIONS = "activations"
    TEMPORARIES = "temporaries"


@dataclasses.dataclass(frozen=True)
class TraceResult:
    """What one traced call costs.

    ``peak_bytes`` is the tensor-level peak (pre-existing weights and inputs included) and
    ``peak_by_kind`` its split; ``peak_new_bytes`` the peak of bytes allocated during the call,
    the quantity :func:`engine.estimate.tracing.measure.measure_cpu_peak_bytes` measures. On CUDA each
    storage is rounded to 512-byte blocks; ``allocator_overhead_bytes`` is the separate,
    approximate segment overhead at the peak (0 elsewhere). ``retained_bytes`` are the new bytes
    still alive when the call returned (its outputs and anything it cached). ``bytes_moved`` sums
    the input and output bytes of every non-view op (a roofline traffic estimate that ignores
    caches). ``num_ops`` counts dispatched ATen ops.
    """

    peak_bytes: int
    peak_new_bytes: int
    peak_by_kind: dict[MemKind, int]
    allocator_overhead_bytes: int
    flops: int
    bytes_moved: int
    output_shapes: tuple[tuple[int, ...], ...]
    retained_bytes: int
    num_ops: int
    device: str
    timeline: tuple[tuple[str, int], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (kinds by their string value, no timeline)."""
        out = dataclasses.asdict(self)
        out["peak_by_kind"] = {k.value: v for k, v in self.peak_by_kind.items()}
        out["output_shapes"] = [list(s) for s in self.output_shapes]
        out.pop("timeline")
        return out


@dataclasses.dataclass
class _Record:
    """One storage allocated during the trace."""

    nbytes: int
    alloc_op: int
    alloc_event: int
    free_op: int | None = None
    free_event: int | None = None


def tensors_in(obj: Any, found: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The tensors inside ``obj``, in pytree order (lists, tuples, named tuples, dict values).

    What ATen ops take and return nests only in these, so this plain walk finds what
    ``tree_flatten`` would at a fraction of its cost (it runs for every op of a trace).
    """
    found = [] if found is None else found
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            tensors_in(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            tensors_in(item, found)
    return found


class _TracingFakeMode(FakeTensorMode):
    """The fake mode, which also converts stray real tensors to fakes and follows storage
    lifetimes of every top-level op.

    One Python dispatch layer, not a second mode above the fake one: a separate mode costs a
    mode switch per op, about a third of a UNet trace. Ops the fake mode runs for an op
    (decompositions) and the ops of our own bookkeeping (layout fixes) run at ``_depth`` > 0 and
    are not accounted, exactly as a mode above the fake one would not see them.
    """

    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self._tracer = tracer
        self._depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._depth:
            return super().__torch_dispatch__(func, types, args, kwargs)
        tracer = self._tracer
        # Tensors captured by closures or globals arrive real (or meta): fake them here, with the
        # same memo as the upfront conversion so each keeps one identity.
        kwargs = kwargs or {}
        inputs = tensors_in((args, kwargs))
        fakes = [tracer._ensure_fake(t) for t in inputs]
        if any(a is not b for a, b in zip(inputs, fakes)):
            args, kwargs = tree_map_only(torch.Tensor, tracer._ensure_fake, (args, kwargs))
        if func.namespace == "prim":
            return super().__torch_dispatch__(func, types, args, kwargs)  # metadata queries
        tracer._op_count += 1
        self._depth += 1
        try:
            out = real_layout(func, args, kwargs, super().__torch_dispatch__(func, types, args, kwargs),
                              tracer.device.type)
            tracer._after_op(func, args, kwargs, out, fakes)
        finally:
            self._depth -= 1
        return out


class Tracer:
    """Context manager that runs code on fake tensors and accounts its memory, FLOPs and traffic.

    Inside the context every tensor the code touches is a fake tensor on ``device``: modules
    are swapped to fakes when first called (or upfront through :meth:`track_modules`), tensors
    captured from outside are converted when an op first reads them, and factory calls
    (``torch.zeros``) already make fakes, counted as new allocations. Nothing real is allocated,
    so a multi-GiB model built on the meta device traces in milliseconds per op. State lives in
    the tracer only (no per-module bookkeeping), so modules may be called any number of times.

    Args:
        device: the device to plan for (``"cpu"``, ``"cuda"``); CUDA applies allocator rounding.
        sdpa_backend: the attention kernel to trace ``F.scaled_dot_product_attention`` with:
            ``"auto"`` (what PyTorch picks on the device; flash/memory-efficient on CUDA),
            ``"native"``, ``"flash"``, ``"efficient"`` or ``"math"``; see
            :class:`engine.estimate.tracing.kernels.FidelityMode`.
        record_timeline: keep ``(op name, live new bytes)`` after every op in the result.

    Example::

        with Tracer("cuda") as tracer:
            z = tracer.fake(torch.empty(1, 4, 40, 64, device="meta"))
            out = vae.decode(z)
        print(tracer.result(out).peak_bytes)
    """

    def __init__(self, device: str | torch.device = "cpu", *, sdpa_backend: str = "auto",
                 record_timeline: bool = False):
        self.device = normalize_device(device)
        self._sdpa_backend = sdpa_backend
        FidelityMode(self.device.type, sdpa_backend)  # validates ``sdpa_backend`` now
        self._record_timeline = record_timeline
        self._depth = 0
        self._stack: contextlib.ExitStack | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self._fake_mode = _TracingFakeMode(self)
        self._convert = FakeConverter(self._fake_mode, self.device, on_new=self._on_new_fake)
        self._swap = ModuleSwap(self._convert)
        self._flops = 0  # FLOPs so far; ``_last_op_flops`` those of the latest op
        self._last_op_flops = 0
        self._last_moved: list[int] = []  # bytes each tensor of the latest op moved
        self._listeners: list[Callable[[Any, tuple, dict, Any], None]] = []
        self._fidelity = FidelityMode(self.device.type, self._sdpa_backend)
        self._pre: dict[int, tuple[int, MemKind]] = {}
        self._pre_hold: list[torch.UntypedStorage] = []
        self._records: list[_Record] = []
        self._live: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._timeline: list[tuple[str, int]] = []
        self._op_count = self._events = self._cur = self._peak = 0
        self._peak_event = -1
        self._bytes_moved = 0
        self._active = False
        self._thread = 0

    # -- context ---------------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        # Re-entrant: an inner ``with`` on the same tracer joins the running trace.
        self._depth += 1
        if self._depth > 1:
            return self
        self._reset_state()
        stack = contextlib.ExitStack()
        try:
            stack.callback(self._swap.restore)
            stack.callback(self._deactivate)
            stack.enter_context(self._fake_mode)
            stack.enter_context(self._fidelity)
            handle = nn.modules.module.register_module_forward_pre_hook(self._pre_forward)
            stack.callback(handle.remove)
        except BaseException:
            self._depth -= 1
            stack.close()
            raise
        self._active = True
        self._thread = threading.get_ident()
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0 and self._stack is not None:
            stack, self._stack = self._stack, None
            stack.__exit__(*exc)

    def _deactivate(self) -> None:
        # Storages still alive now are the call's retained bytes; stop listening for their death.
        self._active = False
        self._refs.clear()
        self._pre_hold.clear()
        self._convert.clear()

    # -- public helpers ----------------------------------------------------------------------
    def fake(self, obj: Any) -> Any:
        """Return ``obj`` (a tensor or pytree of tensors) as fakes on the traced device (INPUTS).

        Args:
            obj: real or meta tensors, possibly nested in tuples, lists and dicts.
        """
        self._require_active("fake")
        return self._convert.convert_tree(obj)

    def track_modules(self, *modules: nn.Module) -> None:
        """Swap the parameters and buffers of ``modules`` (recursively) for fakes now (WEIGHTS).

        Args:
            modules: modules whose weights should count as resident even if never called.
        """
        self._require_active("track_modules")
        for module in modules:
            self._swap_module(module)

    @contextlib.contextmanager
    def listening(self, listener: Callable[[Any, tuple, dict, Any], None]) -> Iterator[None]:
        """Call ``listener(func, args, kwargs, out)`` after every op the trace accounts (the ops
        of its timeline, ``prim`` metadata queries left out), while the block runs. Cheaper
        than a dispatch mode of one's own: the op is not dispatched through a second layer.
        """
        self._listeners.append(listener)
        try:
            yield
        finally:
            self._listeners.remove(listener)

    def reset_peak(self) -> None:
        """Start a new peak from the current live bytes (to measure one phase of a longer run)."""
        self._peak, self._peak_event = self._cur, self._events - 1

    def snapshot(self, which: str = "current") -> dict[MemKind, int]:
        """Live bytes by kind, ``"current"`` or at the ``"peak"`` so far.

        Args:
            which: ``"current"`` counts every live new storage as ACTIVATIONS (temporaries are
                only known once they die); ``"peak"`` splits them as in :class:`TraceResult`.
        """
        if which == "current":
            out = self._pre_by_kind()
            out[MemKind.ACTIVATIONS] += self._cur
            return out
        if which == "peak":
            return self._peak_by_kind()[0]
        raise ValueError(f"`which` must be 'current' or 'peak', got {which!r}.")

    def _require_active(self, name: str) -> None:
        if not self._active:
            raise RuntimeError(f"`Tracer.{name}` must be called inside `with tracer:`; enter the "
                               "tracer first.")

    # -- bookkeeping -------------------------------------------------------------------------
    def _on_new_fake(self, fake: torch.Tensor, source: torch.Tensor) -> None:
        kind = MemKind.WEIGHTS if isinstance(source, nn.Parameter) else MemKind.INPUTS
        self._register_pre(fake, kind)

    def _register_pre(self, fake: torch.Tensor, kind: MemKind) -> None:
        storage = fake.untyped_storage()
        size = allocation_bytes(storage.nbytes(), fake.device.type)
        if storage._cdata not in self._pre:
            self._pre_hold.append(storage)
        self._pre[storage._cdata] = (size if fake.device.type == self.device.type else 0, kind)

    def _swap_module(self, module: nn.Module) -> None:
        # A buffer first met as a captured input is re-labelled: it is resident model state.
        for fake in self._swap.swap(module):
            self._register_pre(fake, MemKind.WEIGHTS)

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        # The hook is process-wide but the dispatch modes are per thread: leave modules that
        # other threads run alone.
        if self._active and threading.get_ident() == self._thread:
            self._swap_module(module)

    def _ensure_fake(self, t: torch.Tensor) -> torch.Tensor:
        if not self._convert.is_ours(t):
            return self._convert(t)
        key = t.untyped_storage()._cdata
        if key not in self._pre and key not in self._live:
            # A fake we never saw being made (e.g. built while dispatch modes were off): it
            # existed before this op, so count it as an input.
            self._register_pre(t, MemKind.INPUTS)
        return t

    def _after_op(self, func: Any, args: Any, kwargs: Any, out: Any, inputs: list[torch.Tensor]) -> None:
        """Account one op; ``inputs`` are its tensor arguments (fakes), in pytree order."""
        # PyTorch's own FLOP formulas, read directly: a FlopCounterMode would add a dispatch
        # layer and a hook on every module call, a fifth of a trace's time.
        formula = flop_registry.get(func._overloadpacket)
        self._last_op_flops = int(formula(*args, **kwargs, out_val=out)) if formula else 0
        self._flops += self._last_op_flops
        flat_out = [out] if isinstance(out, torch.Tensor) else tensors_in(out)
        for tensor in flat_out:
            self._track_output(tensor)
        scratch = workspace_bytes(func, args, kwargs, out, self.device.type)
        if scratch:
            self._transient(allocation_bytes(scratch, self.device.type))
        # inputs and outputs of every op that is not a view (traffic), for the log too
        self._last_moved = [] if func.is_view else [t.numel() * t.element_size() for t in (*inputs, *flat_out)]
        self._bytes_moved += sum(self._last_moved)
        if self._record_timeline:
            self._timeline.append((str(func), self._cur))
        for listener in self._listeners:
            listener(func, args, kwargs, out)

    def _track_output(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._pre:
            return  # in-place on, or a view of, a weight or an input
        on_device = tensor.device.type == self.device.type
        size = allocation_bytes(storage.nbytes(), tensor.device.type) if on_device else 0
        idx = self._live.get(key)
        if idx is not None:
            if self._records[idx].nbytes == size:
                return  # view or in-place result: same storage, no allocation
            self._free(key)  # resized through ``out=``/``resize_``: close and reopen
        self._alloc(key, storage, size)

    def _alloc(self, key: int, storage: torch.UntypedStorage, size: int) -> None:
        self._records.append(_Record(size, self._op_count, self._events))
        self._live[key] = len(self._records) - 1
        self._refs[key] = weakref.ref(storage, lambda ref, key=key: self._on_death(key, ref))
        self._events += 1
        self._cur += size
        if self._cur > self._peak:
            self._peak, self._peak_event = self._cur, self._events - 1

    def _transient(self, size: int) -> None:
        # Kernel scratch lives and dies inside one op, on top of that op's outputs.
        self._records.append(_Record(size, self._op_count, self._events,
                                     self._op_count, self._events + 1))
        if self._cur + size > self._peak:
            self._peak, self._peak_event = self._cur + size, self._events
        self._events += 2

    def _on_death(self, key: int, ref: weakref.ref) -> None:
        if self._active and self._refs.get(key) is ref:
            self._free(key)

    def _free(self, key: int) -> None:
        rec = self._records[self._live.pop(key)]
        self._refs.pop(key, None)
        rec.free_op, rec.free_event = self._op_count, self._events
        self._events += 1
        self._cur -= rec.nbytes

    # -- results -----------------------------------------------------------------------------
    def _pre_by_kind(self) -> dict[MemKind, int]:
        out = {kind: 0 for kind in MemKind}
        for size, kind in self._pre.values():
            out[kind] += size
        return out

    def _peak_by_kind(self) -> tuple[dict[MemKind, int], list[int]]:
        out = self._pre_by_kind()
        blocks = [size for size, _ in self._pre.values()]
        peak_ev = self._peak_event
        for rec in self._records:
            alive = rec.alloc_event <= peak_ev and (rec.free_event is None
                                                    or rec.free_event > peak_ev)
            if alive:
                # An output dropped before the next op began was never used again.
                temp = rec.free_op is not None and rec.free_op == rec.alloc_op
                out[MemKind.TEMPORARIES if temp else MemKind.ACTIVATIONS] += rec.nbytes
                blocks.append(rec.nbytes)
        return out, blocks

    def result(self, output: Any = None) -> TraceResult:
        """Summarise the trace; pass the traced call's return value to record its shapes.

        Args:
            output: what the traced code returned (any pytree of tensors), or None.
        """
        by_kind, blocks = self._peak_by_kind()
        overhead = segment_overhead_bytes(blocks) if self.device.type == "cuda" else 0
        tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
        return TraceResult(
            peak_bytes=sum(by_kind.values()),
            peak_new_bytes=self._peak,
            peak_by_kind=by_kind,
            allocator_overhead_bytes=overhead,
            flops=self._flops,
            bytes_moved=int(self._bytes_moved),
            output_shapes=tuple(tuple(t.shape) for t in tensors),
            retained_bytes=self._cur,
            num_ops=self._op_count,
            device=str(self.device),
            timeline=tuple(self._timeline) if self._record_timeline else None,
        )


def _modules_reachable(fn: Callable, args: tuple, kwargs: dict) -> list[nn.Module]:
    """Modules ``fn`` obviously uses: itself, its bound object, partial args, closure cells."""
    found: list[Any] = [fn, getattr(fn, "__self__", None), *args, *kwargs.values()]
    if hasattr(fn, "func"):  # functools.partial
        found += [fn.func, getattr(fn.func, "__self__", None), *fn.args, *fn.keywords.values()]
    for cell in getattr(fn, "__closure__", None) or ():
        with contextlib.suppress(ValueError):  # an empty cell
            found.append(cell.cell_contents)
    return [obj for obj in found if isinstance(obj, nn.Module)]


def trace_call(fn: Callable[..., Any], *args: Any, device: str | torch.device = "cpu",
               sdpa_backend: str = "auto", **kwargs: Any) -> TraceResult:
    """Run ``fn(*args, **kwargs)`` on fake tensors and return its memory, FLOPs and traffic.

    Tensor arguments become fake INPUTS on ``device``; modules reachable from ``fn`` (the
    module itself, a bound method's module, closure cells) count their full weights as resident
    WEIGHTS; other modules are faked when first called. Grad mode is the caller's: wrap the call
    in ``torch.no_grad()`` to trace inference.

    Args:
        fn: the call to trace, e.g. ``model``, ``vae.decode`` or ``lambda: model(x)``; it may
            call the same module any number of times.
        *args: positional arguments for ``fn``; tensors may be real or on the meta device.
        device: the device to plan for; ``"cuda"`` works without a GPU.
        sdpa_backend: attention kernel to assume, as in :class:`Tracer`.
        **kwargs: keyword arguments for ``fn`` (use a lambda for ones named ``device`` or
            ``sdpa_backend``).

    Example::

        with torch.no_grad():
            res = trace_call(vae.decode, torch.empty(16, 4, 40, 64, device="meta"), device="cuda")
        res.peak_bytes, res.peak_by_kind[MemKind.ACTIVATIONS], res.flops
    """
    if not callable(fn):
        raise TypeError(f"`fn` must be callable (a module, a method or a lambda), got "
                        f"{type(fn).__name__}; wrap the call in a lambda.")
    tracer = Tracer(device, sdpa_backend=sdpa_backend)
    try:
        with tracer:
            tracer.track_modules(*_modules_reachable(fn, args, kwargs))
            fargs, fkwargs = tracer.fake((args, kwargs))
            output = fn(*fargs, **fkwargs)
    except (DataDependentOutputException, DynamicOutputShapeException) as err:
        raise RuntimeError(f"`fn` needs tensor values ({err.func}), which fake tensors do not "
                           "have; trace the parts before and after the data-dependent step "
                           "separately.") from err
    result = tracer.result(output)
    logger.debug("traced %d ops on %s: peak %d bytes (%d new), %d FLOPs", result.num_ops,
                 result.device, result.peak_bytes, result.peak_new_bytes, result.flops)
    return result
