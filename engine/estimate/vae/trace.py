"""Tracing machinery of the VAE memory model (see :mod:`engine.estimate.vae`).

A meta-device twin of the VAE is run through the runtime on fake tensors; every dispatched op
is labelled with its *phase* (:class:`_Where`) and its kernel scratch (:class:`_OpRecorder`),
and each fit job's memory is split into per-phase peaks (:func:`trace_samples`).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import logging
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_map_only

from ...plan.aemode import AEMode
from ...runtime.autoencode import decode_frames, encode_frames, remove_autoencode_policy
from ...runtime.vae_adapter import takes_num_frames
from ..tracing.allocator import allocation_bytes, segment_overhead_bytes
from ..tracing.kernels import has_workspace, meta_like, workspace_bytes
from ..tracing.trace import MemKind, Tracer
from .shapes import DIRECTIONS, input_shape, CallPoint

logger = logging.getLogger(__name__)

_WRAPPER, _WRAPPER_END, _IN_CALL = "(runtime)", "(runtime, after calls)", "(call)"


def meta_twin(vae: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A structural copy of ``vae`` with meta weights in ``dtype``: tracing it never touches
    the caller's module (which another thread may be running) nor its memory."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(vae.parameters(), vae.buffers()):
        meta = torch.empty_like(t, device="meta",
                                dtype=dtype if t.is_floating_point() else t.dtype)
        if isinstance(t, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=False)
        memo[id(t)] = meta
    twin = copy.deepcopy(vae, memo)
    remove_autoencode_policy(twin)  # trace the VAE itself; the runtime supplies the loop
    for module in twin.modules():
        # Hooks of offload libraries would move fakes to devices that may not exist here.
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
        if "_old_forward" in module.__dict__:
            module.forward = module.__dict__.pop("_old_forward")
    return twin.eval()


class _Where:
    """Names the phase of each op: innermost running submodule (or runtime code), the op's
    position inside that module invocation or code segment, and the op itself.

    It also wraps the twin's ``encode``/``decode`` (:meth:`instrument`). In a chunked or tiled
    fit job every VAE call has the same input shape, and the runtime holds the most (its
    output buffer, the previous tile's blend weights) from the second call on, so only the
    second call is traced: the others return a precomputed meta output turned into fakes
    (counted as pre-existing, like an input), which halves the cost of a cold fit.
    """

    def __init__(self, root: nn.Module) -> None:
        self.names = {id(m): name for name, m in root.named_modules() if name}
        self.stack: list[list] = []  # [module name, ops seen in this invocation]
        self.outside = [_WRAPPER, 0]  # ops outside modules: runtime code or the call's own
        self.in_call = 0
        self.calls = 0  # VAE calls started in this session
        self.job_calls = 0  # VAE calls started in the current job
        self.traced_call: int | None = None  # the job's one traced call (None: all)
        self.shortcuts: dict[tuple, Any] = {}  # (method, input shape) -> meta output
        self.convert = None  # meta -> fake, set once the tracer runs

    def pre(self, module: nn.Module, args: Any) -> None:
        name = self.names.get(id(module))
        if name is not None:
            self.stack.append([name, 0])

    def post(self, module: nn.Module, args: Any, out: Any) -> None:
        if id(module) in self.names and self.stack:
            self.stack.pop()

    def label(self, op: str) -> str:
        frame = self.stack[-1] if self.stack else self.outside
        frame[1] += 1
        return f"{frame[0]}#{frame[1]}:{op}"

    def instrument(self, twin: nn.Module) -> None:
        """Wrap the twin's ``encode``/``decode`` to count calls and skip repeated ones."""
        for name in DIRECTIONS:
            method = getattr(type(twin), name, None)
            if method is not None:
                twin.__dict__[name] = functools.partial(self._call, twin, name, method)

    def _call(self, twin: nn.Module, name: str, method: Any, x: torch.Tensor, *args, **kwargs):
        self.calls += 1
        self.job_calls += 1
        if self.traced_call not in (None, self.job_calls) and not args and not kwargs:
            meta = self.shortcuts.get((name, tuple(x.shape)))
            if meta is not None:
                return _map_tensors(meta, self.convert)
        self.in_call += 1
        self.outside = [_IN_CALL, 0]
        try:
            return method(twin, x, *args, **kwargs, **_frames_of(method, x, kwargs))
        finally:
            self.in_call -= 1
            self.outside = [_IN_CALL if self.in_call else _WRAPPER, 0]

    def start_job(self, traced_call: int | None) -> None:
        self.outside = [_WRAPPER, 0]
        self.job_calls = 0
        self.traced_call = traced_call


def _map_tensors(obj: Any, fn: Any, depth: int = 0) -> Any:
    """Apply ``fn`` to every tensor in ``obj``: tensors, sequences, dicts and the attributes of
    plain objects (posteriors), rebuilt as shallow copies."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if depth > 4:
        return obj
    if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields"):
        return type(obj)(_map_tensors(o, fn, depth + 1) for o in obj)
    if isinstance(obj, dict) and type(obj) is dict:
        return {k: _map_tensors(v, fn, depth + 1) for k, v in obj.items()}
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, nn.Module)):
        new = copy.copy(obj)
        new.__dict__.update({k: _map_tensors(v, fn, depth + 1) for k, v in vars(obj).items()})
        return new
    return obj


def _shortcut_outputs(twin: nn.Module, jobs: list, channels: tuple[int, int], f: int,
                      dtype: torch.dtype) -> dict[tuple, Any]:
    """Meta outputs of one call per distinct (method, input shape) of the chunked and tiled
    jobs, computed by running the twin on meta tensors (tens of ms per call, no tracing)."""
    out: dict[tuple, Any] = {}
    for job in jobs:
        if job.family == "batched":
            continue
        shape = input_shape(job.direction, job.point.features["k"], job.point.call_lat,
                             channels, f)
        key = (job.direction, shape)
        if key not in out:
            with torch.no_grad(), _ShapeOnlyNorms():
                x = torch.empty(shape, device="meta", dtype=dtype)
                method = getattr(type(twin), job.direction)
                out[key] = method(twin, x, **_frames_of(method, x, {}))
    return out


class _ShapeOnlyNorms(TorchFunctionMode):
    """Group norms of meta tensors answered by ``empty_like``: their meta kernel is a Python
    reference that takes most of a meta VAE call's time, and a shortcut needs only the call's
    output shapes and dtypes (a group norm keeps both)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.group_norm and args[0].device.type == "meta":
            return torch.empty_like(args[0])
        return func(*args, **kwargs)


def _frames_of(method: Any, x: torch.Tensor, kwargs: dict) -> dict[str, int]:
    """``num_frames=`` for a temporal decoder (the wrapper above hides its signature from the
    runtime, which would pass each call's frame count), else nothing."""
    if "num_frames" in kwargs or not takes_num_frames(method):
        return {}
    return {"num_frames": x.shape[0]}


class _OpRecorder:
    """Records, per dispatched op, its phase, the VAE calls started so far and kernel scratch.

    Listens to the :class:`Tracer` (:meth:`Tracer.listening`), so it sees exactly the ops the
    tracer's timeline lists and the two lists align one to one.
    """

    def __init__(self, where: _Where, device_type: str) -> None:
        self.where, self.device_type = where, device_type
        self.labels: list[str] = []
        self.calls: list[int] = []
        self.scratch: list[int] = []

    def __call__(self, func, args, kwargs, out) -> None:
        self.labels.append(self.where.label(func.__name__.split(".")[0]))
        self.calls.append(self.where.calls)
        size = 0
        if has_workspace(func, self.device_type):
            # The scratch models index tensors (``w[0, 0]``): on fakes that is a full fake
            # dispatch the tracer would also record, so they read plain meta stand-ins.
            with _disable_current_modes():
                margs, mkwargs, mout = tree_map_only(torch.Tensor, meta_like, (args, kwargs, out))
                size = workspace_bytes(func, margs, mkwargs, mout, self.device_type)
        self.scratch.append(allocation_bytes(size, self.device_type) if size else 0)


# ---------------------------------------------------------------- tracing the fit shapes
@dataclasses.dataclass
class TraceJob:
    direction: str
    family: str
    point: CallPoint
    mode: AEMode


@dataclasses.dataclass
class TraceSample:
    """What one traced job showed: per-phase peaks of live and live+scratch new bytes."""

    job: TraceJob
    live: dict[str, int]
    total: dict[str, int]
    peak: int
    flops: int
    overhead: int


def _run_traces(twin: nn.Module, jobs: list[TraceJob], device_type: str, dtype: torch.dtype,
                channels: tuple[int, int], f: int):
    """Trace every job in ONE tracer session (the module swap is paid once); return the
    tracer's per-job results, each job's op span, VAE call count and starting new bytes, the
    timeline, the recorder and, per job, the sizes of the tensors that had entered as
    pre-existing by its end (inputs, shortcut outputs)."""
    where = _Where(twin)
    where.shortcuts = _shortcut_outputs(twin, jobs, channels, f, dtype)
    where.instrument(twin)
    recorder = _OpRecorder(where, device_type)
    tracer = Tracer(device_type, record_timeline=True)
    results, spans, calls, bases, pre_counts, pre_sizes = [], [], [], [], [], {}

    keep: list[torch.Tensor] = []  # fakes stay alive so their ids stay unique (no memory)

    def convert(t: torch.Tensor) -> torch.Tensor:
        fake = tracer.fake(t)
        if id(fake) not in pre_sizes:
            keep.append(fake)
            pre_sizes[id(fake)] = fake.numel() * fake.element_size()
        return fake
    where.convert = convert
    # Inputs are made before the session: inside it, factory calls make fakes that count as
    # new memory (and a meta-device fake would then be copied to the planned device).
    metas = [torch.empty(input_shape(job.direction, job.point.features["n"], job.point.lat,
                                      channels, f), device="meta", dtype=dtype) for job in jobs]
    pre = nn.modules.module.register_module_forward_pre_hook(where.pre)
    post = nn.modules.module.register_module_forward_hook(where.post, always_call=True)
    try:
        with torch.no_grad(), tracer:
            tracer.track_modules(twin)
            with tracer.listening(recorder):
                for job, meta in zip(jobs, metas):
                    x = convert(meta)
                    run = decode_frames if job.direction == "decode" else encode_frames
                    where.start_job(None if job.family == "batched" else 2)
                    start = len(recorder.labels)
                    # new bytes still alive from earlier jobs (none expected)
                    bases.append(tracer.snapshot("current")[MemKind.ACTIVATIONS])
                    tracer.reset_peak()
                    out = run(twin, x, job.mode)
                    del out  # its bytes belong to this job's peak, not to the next job
                    results.append(tracer.result())
                    spans.append((start, len(recorder.labels)))
                    calls.append(where.job_calls)
                    pre_counts.append(len(pre_sizes))
            timeline = tracer.result().timeline
    finally:
        pre.remove()
        post.remove()
    if len(timeline) != len(recorder.labels):
        raise RuntimeError("the phase recorder and the tracer saw different op counts; this is "
                           "a bug in engine.estimate.vae, please report it.")
    sizes = list(pre_sizes.values())
    pre = [sizes[:count] for count in pre_counts]  # what existed before each job's peak
    return results, spans, calls, bases, timeline, recorder, pre


def _phase_peaks(span: tuple[int, int], base: int, timeline, recorder: _OpRecorder):
    """Per-phase maxima of live and live+scratch new bytes (above ``base``) over one job."""
    a, b = span
    last_calls = recorder.calls[b - 1] if b > a else 0
    live: dict[str, int] = {}
    total: dict[str, int] = {}
    for i in range(a, b):
        label = recorder.labels[i]
        if label.startswith(_WRAPPER + "#") and recorder.calls[i] == last_calls:
            # after the last VAE call: other buffers are live than between calls
            label = _WRAPPER_END + label[len(_WRAPPER):]
        now = timeline[i][1] - base
        live[label] = max(live.get(label, 0), now)
        total[label] = max(total.get(label, 0), now + recorder.scratch[i])
    return live, total


def trace_samples(twin: nn.Module, jobs: list[TraceJob], device_type: str, dtype: torch.dtype,
                   channels: tuple[int, int], f: int) -> list[TraceSample]:
    """Trace the jobs and split each one's memory by phase (see the module docstring)."""
    results, spans, calls, bases, timeline, recorder, pre_sizes = _run_traces(
        twin, jobs, device_type, dtype, channels, f)
    weights = [allocation_bytes(t.numel() * t.element_size(), device_type)
               for t in itertools.chain(twin.parameters(), twin.buffers())]
    samples, flops_before = [], 0
    for job, res, span, count, base, pre in zip(jobs, results, spans, calls, bases, pre_sizes):
        live, total = _phase_peaks(span, base, timeline, recorder)
        peak = res.peak_new_bytes - base
        if max(total.values(), default=0) != peak:
            logger.warning("phase split of %s %s misses the traced peak (%d vs %d bytes)",
                           job.direction, job.point.features, max(total.values(), default=0),
                           peak)
        # One of ``count`` equal calls was traced in chunked and tiled jobs.
        flops = (res.flops - flops_before) * (1 if job.family == "batched" else count)
        flops_before = res.flops
        overhead = 0
        if device_type == "cuda":
            # The tracer's overhead also rounds weights, inputs and shortcut outputs: keep the
            # part the new blocks add (approximate: small blocks share segments).
            pre_blocks = weights + [allocation_bytes(size, device_type) for size in pre]
            overhead = max(0, res.allocator_overhead_bytes - segment_overhead_bytes(pre_blocks))
        samples.append(TraceSample(job, live, total, peak, int(flops), overhead))
    return samples

