"""VAE memory and FLOPs model, fitted from fake traces of THIS VAE run through the runtime.

:meth:`VAEMemoryModel.for_vae` traces :func:`engine.runtime.autoencode.decode_frames` and
:func:`~engine.runtime.autoencode.encode_frames` of a meta-device twin of the VAE on fake
tensors (no real memory, no published constants) at a few shapes per direction and family,
fits scaling laws and caches them on disk. :meth:`VAEMemoryModel.predict` then answers the
planner in microseconds for any frame count, resolution, chunk and tile.

Features (latent units; ``f`` is the downsample factor): ``n`` frames in the call, ``k`` frames
per VAE call (``n`` when batched), ``hw`` latent pixels of the whole frame, ``thw`` latent
pixels of one tile (``hw`` untiled), ``tp`` the tile's latent perimeter ``th + tw`` and ``T``
tiles per frame. Terms, read off the graph:

* ``k*thw``: every activation of one VAE call is ``k`` frames x channels x a resolution that is
  a fixed multiple of the tile (convolutions, GroupNorm, up/downsampling);
* ``k*thw^2``: the mid-block attention's score matrix (and its softmax) is quadratic in the
  tokens of one frame;
* ``k*tp``: the encoder's ``Downsample`` pads by one row and column, ``(H+1)(W+1) = HW + H + W
  + 1``, so padded activations carry a perimeter term;
* ``n*hw``: buffers the runtime holds for the whole clip while calls run (the assembled output
  of a chunked or tiled call, the posterior moments and sampling temporaries of an encode);
* ``thw`` (tiled): the per-tile blend weights; ``1``: weight-sized scratch (oneDNN reorders of
  convolution weights).

Families, each with its own laws so that no term is ambiguous: ``batched`` (one call, ``k = n``:
``1, k*thw, k*thw^2, k*tp``), ``chunked`` (``k < n``, untiled: adds ``n*hw``) and ``tiled`` (adds
``n*hw`` and ``thw``).

Why a maximum of laws: the peak moves between layers as the shape changes (the full-resolution
blocks at ordinary sizes, the attention's softmax at very large ones, the runtime's buffers when
``k << n``), and one polynomial fitted across such a switch is off by several percent at large
shapes. So every dispatched op of a trace is a *phase*, keyed by the innermost running submodule,
the op's position inside that module's invocation and its name (``decoder.mid.attn_1#3:_softmax``),
or by the runtime's own code between and after the VAE calls. The live bytes at one op are a sum
of live tensors whose sizes are monomials of the features, so each phase's law is exact up to
rounding, and the prediction is the maximum over phases (which also names where the peak is, for
the planner's explanation). Each phase has two laws: live tensor bytes (``activation_bytes``) and
live bytes plus the op's kernel scratch from :mod:`engine.estimate.kernels` (oneDNN's blocked
copies, im2col columns); their difference at the maxima is ``workspace_bytes``.

Chunks of unequal size (``n % k != 0``): with two or more full chunks the peak is a full chunk
with the output buffer present, which the laws describe; with one full chunk the prediction is
the larger of that chunk without the buffer (the batched laws) and the smaller last chunk with it.

Known limitations: below ~5k latent pixels per tile and with one frame per call, oneDNN hands
small convolutions to the native kernels, so non-peak phases there are approximate; CUDA kernel
workspaces (cuDNN, cuBLAS) are not modelled (``workspace_bytes`` = 0, flagged by
``workspace_modelled``) and ``allocator_bytes`` on CUDA is the tracer's no-reuse segment-rounding
approximation, not measured fragmentation. The laws assume the VAE's op sequence does not branch
on size (true of LDM/diffusers KL VAEs with their own tiling switched off). Phases that never
reach 5% of a fit trace's peak are dropped, so a layer that grows >20x faster than the rest
beyond the fitted sizes would be missed. Only the second VAE call of each chunked or tiled fit
job is traced (the others repeat its input shape and hold no more memory; see ``_Where``).

Example:
    >>> model = VAEMemoryModel.for_vae(vae, device_type="cuda", dtype=torch.float16)
    >>> model.predict("decode", 16, 576, 1024, "per-frame").allocated_bytes
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import inspect
import itertools
import logging
import math
import time
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_map_only

from ..runtime import autoencode as _autoencode
from ..runtime import tiling as _tiling
from ..runtime.aemode import AEMode
from ..runtime.autoencode import decode_frames, encode_frames, remove_autoencode_policy
from ..runtime.vae_adapter import downsample_factor
from .allocator import allocation_bytes, segment_overhead_bytes
from .cache import SCHEMA_VERSION, FitCache, architecture_hash
from .kernels import _WORKSPACES, workspace_bytes
from .scaling import ScalingLaw, fit_scaling_law, parse_term
from .trace import MemKind, Tracer, TraceResult, trace_call

logger = logging.getLogger(__name__)

__all__ = ["DIRECTIONS", "FAMILIES", "VAEMemoryModel", "VAEStageMemory"]

DIRECTIONS = ("decode", "encode")
FAMILIES = ("batched", "chunked", "tiled")
# Bump when the sampled shapes, terms or phase rules change: cached fits then refit.
SCHEME_VERSION = 2
_WRAPPER, _WRAPPER_END, _IN_CALL = "(runtime)", "(runtime, after calls)", "(call)"

_TERMS = {
    "batched": ("1", "k*thw", "k*thw^2", "k*tp"),
    "chunked": ("1", "n*hw", "k*thw", "k*thw^2", "k*tp"),
    "tiled": ("1", "n*hw", "thw", "k*thw", "k*thw^2", "k*tp"),
}
# FLOPs are counted on convolutions and matmuls: every layer is proportional to the pixels it
# processes (n*T*thw) except the attention scores and their product with v (n*T*thw^2).
_FLOP_TERMS = ("n*T*thw", "n*T*thw^2")

# Fit shapes in LATENT units: (n, k, h, w, tile_h, tile_w), one more than the family's terms
# for batched, exactly as many for the others (held-out checks live in the tests). Fakes cost
# the same at any size, so they reach medium sizes (1-6k latent pixels per call) where the
# kernels' size-dependent choices have settled; aspect ratios vary so that ``k*tp`` separates
# from ``k*thw``, and ``n/k`` varies so that ``n*hw`` separates from ``k*thw``. Tracing costs
# ~1 ms per op (~130 ops per VAE call) and each shape traces ONE call (see ``_Where``).
_FIT_SHAPES = {
    "batched": ((1, 1, 40, 64, 0, 0), (2, 2, 48, 48, 0, 0), (1, 1, 64, 96, 0, 0),
                (3, 3, 32, 40, 0, 0), (2, 2, 72, 56, 0, 0)),
    "chunked": ((2, 1, 40, 64, 0, 0), (3, 1, 32, 48, 0, 0), (4, 2, 48, 40, 0, 0),
                (2, 1, 64, 96, 0, 0), (4, 2, 72, 56, 0, 0)),
    "tiled": ((1, 1, 40, 64, 40, 40), (2, 2, 32, 48, 32, 32), (2, 2, 48, 40, 32, 40),
              (3, 3, 64, 48, 48, 48), (1, 1, 80, 64, 64, 64), (2, 2, 24, 64, 24, 40)),
}
# Phases that never reach this share of a trace's peak are dropped: they cannot become the
# peak inside the fitted range, and fewer phases keep the cache small and predict() fast.
_MIN_PHASE_SHARE = 0.05

_DEFAULT_CACHE: Any = object()


@dataclasses.dataclass(frozen=True)
class VAEStageMemory:
    """Predicted memory of one VAE encode or decode call, split into named terms (bytes).

    Attributes:
        direction: ``"decode"`` or ``"encode"``.
        mode: the :class:`AEMode` string.
        activation_bytes: peak of NEW tensor bytes during the call (activations, temporaries,
            the output buffer).
        weights_bytes: the VAE's parameters and buffers in the planned dtype.
        input_bytes: the latents (decode) or images (encode) handed to the call.
        workspace_bytes: kernel scratch on top of ``activation_bytes`` at the peak (CPU: the
            modelled oneDNN/im2col buffers; CUDA: 0, see ``workspace_modelled``).
            ``activation_bytes + workspace_bytes`` is what ``measure_cpu_peak_bytes`` measures.
        allocator_bytes: CUDA caching-allocator segment rounding (approximate); 0 on CPU.
        peak_phase: where the peak happens: submodule, op position and op
            (``decoder.up.0.block.0#5:add``), or the runtime's own code.
        workspace_modelled: False where kernel scratch exists but is not modelled (CUDA).
        extrapolated: a feature lies outside the range the laws were fitted on.
    """

    direction: str
    mode: str
    activation_bytes: int
    weights_bytes: int
    input_bytes: int
    workspace_bytes: int = 0
    allocator_bytes: int = 0
    peak_phase: str = ""
    workspace_modelled: bool = True
    extrapolated: bool = False

    @property
    def allocated_bytes(self) -> int:
        """Tensor bytes alive at the peak: weights + input + activations + workspace."""
        return self.weights_bytes + self.input_bytes + self.activation_bytes + self.workspace_bytes

    @property
    def peak_new_bytes(self) -> int:
        """Bytes allocated on top of weights and input at the peak (activations + workspace)."""
        return self.activation_bytes + self.workspace_bytes

    @property
    def reserved_bytes(self) -> int:
        """``allocated_bytes`` plus the allocator's segment slack (CUDA)."""
        return self.allocated_bytes + self.allocator_bytes

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict including the derived totals."""
        out = dataclasses.asdict(self)
        out.update(allocated_bytes=self.allocated_bytes, peak_new_bytes=self.peak_new_bytes,
                   reserved_bytes=self.reserved_bytes)
        return out


# ---------------------------------------------------------------- shapes and features
@dataclasses.dataclass(frozen=True)
class _Point:
    """One call as the laws see it: its family, features and latent size."""

    family: str
    features: dict
    lat: tuple[int, int]
    call_lat: tuple[int, int]  # latent size of one VAE call's input (the tile when tiled)


def _classify(frames: int, lat_h: int, lat_w: int, mode: AEMode, f: int) -> _Point:
    """Family and features of a call, following the runtime's own chunk and tile rules."""
    n = frames
    k = min(mode.chunk or n, n)
    hw = float(lat_h * lat_w)
    if mode.tile is not None:
        # The runtime's grid rule (private there; used directly so both always agree).
        grid = _autoencode._tile_grid(mode, lat_h, lat_w, f, "mode")
        if grid is not None:
            spans_h, spans_w = grid
            th, tw = spans_h[0][1] - spans_h[0][0], spans_w[0][1] - spans_w[0][0]
            feats = dict(n=n, k=k, hw=hw, thw=float(th * tw), tp=float(th + tw),
                         T=len(spans_h) * len(spans_w))
            return _Point("tiled", feats, (lat_h, lat_w), (th, tw))
    family = "batched" if k >= n else "chunked"
    feats = dict(n=n, k=k, hw=hw, thw=hw, tp=float(lat_h + lat_w), T=1)
    return _Point(family, feats, (lat_h, lat_w), (lat_h, lat_w))


def _fit_point(shape: tuple[int, ...], f: int) -> tuple[_Point, AEMode]:
    n, k, h, w, th, tw = shape
    mode = AEMode(chunk=k if k < n else None, tile=(th * f, tw * f) if th else None)
    return _classify(n, h, w, mode, f), mode


def _channels(vae: nn.Module) -> tuple[int, int]:
    """(latent channels, image channels): ours (``params``), diffusers (``config``), else the
    convolutions the calls start with, else the KL-f8 defaults (4, 3)."""
    params = getattr(vae, "params", None) or getattr(vae, "config", None)
    latent = getattr(params, "embed_dim", None) or getattr(params, "latent_channels", None)
    image = getattr(params, "in_channels", None)
    if latent is None and isinstance(getattr(vae, "post_quant_conv", None), nn.Conv2d):
        latent = vae.post_quant_conv.in_channels
    conv_in = getattr(getattr(vae, "encoder", None), "conv_in", None)
    if image is None and isinstance(conv_in, nn.Conv2d):
        image = conv_in.in_channels
    return int(latent or 4), int(image or 3)


def _input_shape(direction: str, n: int, lat: tuple[int, int], channels: tuple[int, int],
                 f: int) -> tuple[int, ...]:
    if direction == "decode":
        return (n, channels[0], lat[0], lat[1])
    return (n, channels[1], lat[0] * f, lat[1] * f)


# ---------------------------------------------------------------- meta twin and phases
def _meta_twin(vae: nn.Module, dtype: torch.dtype) -> nn.Module:
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
            return method(twin, x, *args, **kwargs)
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
        shape = _input_shape(job.direction, job.point.features["k"], job.point.call_lat,
                             channels, f)
        key = (job.direction, shape)
        if key not in out:
            with torch.no_grad():
                x = torch.empty(shape, device="meta", dtype=dtype)
                out[key] = getattr(type(twin), job.direction)(twin, x)
    return out


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


class _OpRecorder(TorchDispatchMode):
    """Records, per dispatched op, its phase, the VAE calls started so far and kernel scratch.

    Entered inside the :class:`Tracer`, so it sees exactly the ops the tracer's timeline lists
    (both skip ``prim`` metadata queries) and the two lists align one to one.
    """

    def __init__(self, where: _Where, device_type: str) -> None:
        super().__init__()
        self.where, self.device_type = where, device_type
        self.labels: list[str] = []
        self.calls: list[int] = []
        self.scratch: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace != "prim":
            self.labels.append(self.where.label(func.__name__.split(".")[0]))
            self.calls.append(self.where.calls)
            size = 0
            if (self.device_type, func) in _WORKSPACES:
                # The scratch models index tensors (``w[0, 0]``): on fakes that is a full fake
                # dispatch the tracer would also record, so they read plain meta stand-ins.
                with _disable_current_modes():
                    margs, mkwargs, mout = tree_map_only(torch.Tensor, _meta_like,
                                                         (args, kwargs, out))
                    size = workspace_bytes(func, margs, mkwargs, mout, self.device_type)
            self.scratch.append(allocation_bytes(size, self.device_type) if size else 0)
        return out


# ---------------------------------------------------------------- tracing the fit shapes
@dataclasses.dataclass
class _Job:
    direction: str
    family: str
    point: _Point
    mode: AEMode


@dataclasses.dataclass
class _Sample:
    """What one traced job showed: per-phase peaks of live and live+scratch new bytes."""

    job: _Job
    live: dict[str, int]
    total: dict[str, int]
    peak: int
    flops: int
    overhead: int


def _run_traces(twin: nn.Module, jobs: list[_Job], device_type: str, dtype: torch.dtype,
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
    metas = [torch.empty(_input_shape(job.direction, job.point.features["n"], job.point.lat,
                                      channels, f), device="meta", dtype=dtype) for job in jobs]
    pre = nn.modules.module.register_module_forward_pre_hook(where.pre)
    post = nn.modules.module.register_module_forward_hook(where.post, always_call=True)
    try:
        with torch.no_grad(), tracer:
            tracer.track_modules(twin)
            with recorder:
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


def _trace_samples(twin: nn.Module, jobs: list[_Job], device_type: str, dtype: torch.dtype,
                   channels: tuple[int, int], f: int) -> list[_Sample]:
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
        samples.append(_Sample(job, live, total, peak, int(flops), overhead))
    return samples


# ---------------------------------------------------------------- laws of one family
@dataclasses.dataclass
class _FamilyLaws:
    """The fitted laws of one (direction, family): one row of coefficients per phase."""

    terms: tuple[str, ...]
    phases: tuple[str, ...]
    live: np.ndarray  # phases x terms
    total: np.ndarray  # phases x terms
    flops: ScalingLaw
    allocator: float
    ranges: dict[str, tuple[float, float]]

    def __post_init__(self) -> None:
        self._parsed = [parse_term(t) for t in self.terms]

    def _terms_at(self, features: Mapping[str, float]) -> np.ndarray:
        return np.array([math.prod(features[name] ** power for name, power in factors)
                         for factors in self._parsed])

    def evaluate(self, features: Mapping[str, float]) -> tuple[float, float, str]:
        """Max over phases of live bytes, of live+scratch bytes, and the live peak's phase."""
        values = self._terms_at(features)
        live, total = self.live @ values, self.total @ values
        at = int(np.argmax(live))
        return float(live[at]), float(max(total.max(), live[at])), self.phases[at]

    def extrapolates(self, features: Mapping[str, float]) -> bool:
        return any(not lo <= features[name] <= hi for name, (lo, hi) in self.ranges.items())

    def to_payload(self) -> dict[str, Any]:
        return {"terms": list(self.terms), "phases": list(self.phases),
                "live": self.live.tolist(), "total": self.total.tolist(),
                "allocator": self.allocator, "ranges": {k: list(v) for k, v in self.ranges.items()}}

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], flops: ScalingLaw) -> _FamilyLaws:
        return cls(tuple(data["terms"]), tuple(data["phases"]),
                   np.asarray(data["live"], dtype=np.float64).reshape(-1, len(data["terms"])),
                   np.asarray(data["total"], dtype=np.float64).reshape(-1, len(data["terms"])),
                   flops, float(data["allocator"]),
                   {k: (float(v[0]), float(v[1])) for k, v in data["ranges"].items()})


def _candidate_phases(samples: list[_Sample]) -> list[str]:
    """Phases seen (with live bytes) in every sample and reaching ``_MIN_PHASE_SHARE`` of a peak."""
    keep = []
    for phase in sorted({p for s in samples for p in s.total}):
        share = max(s.total.get(phase, 0) / max(s.peak, 1) for s in samples)
        if share < _MIN_PHASE_SHARE:
            continue
        if any(s.live.get(phase, 0) <= 0 for s in samples):
            if share > 0.5:
                logger.warning("phase %s (up to %.0f%% of the peak) is missing from some fit "
                               "traces and was left out of the law", phase, 100 * share)
            continue
        keep.append(phase)
    return keep


def _fit_family(samples: list[_Sample], family: str) -> tuple[_FamilyLaws, float]:
    """Fit every candidate phase's live and total laws; returns the laws and the worst
    per-phase fit residual."""
    terms = _TERMS[family]
    phases = _candidate_phases(samples)
    if not phases:
        raise RuntimeError(f"no {family} trace allocated any memory; `vae` must allocate "
                           "tensors in encode/decode for a memory model to exist.")
    rows: dict[str, list[list[float]]] = {"live": [], "total": []}
    worst = 0.0
    for phase in phases:
        for kind in rows:
            points = [(s.job.point.features, float(getattr(s, kind)[phase])) for s in samples]
            law = fit_scaling_law(points, terms)
            rows[kind].append(list(law.coefficients))
            worst = max(worst, law.max_rel_residual)
    flops = fit_scaling_law([(s.job.point.features, float(s.flops)) for s in samples],
                            _FLOP_TERMS)
    names = sorted({name for t in terms for name, _ in parse_term(t)})
    ranges = {n: (min(s.job.point.features[n] for s in samples),
                  max(s.job.point.features[n] for s in samples)) for n in names}
    # Segment rounding is a sum of per-block remainders, not a function of the shape: keep the
    # worst seen (0 on CPU).
    laws = _FamilyLaws(terms, tuple(phases), np.array(rows["live"]).reshape(-1, len(terms)),
                       np.array(rows["total"]).reshape(-1, len(terms)), flops,
                       float(max(s.overhead for s in samples)), ranges)
    return laws, worst


def _fit_all(twin: nn.Module, wanted: list[tuple[str, str]], device_type: str,
             dtype: torch.dtype, channels: tuple[int, int], f: int):
    """Trace the fit shapes of every wanted (direction, family) in one session and fit them;
    returns ``{(direction, family): (laws, meta)}``."""
    start = time.perf_counter()
    jobs = []
    for direction, family in wanted:
        for shape in _FIT_SHAPES[family]:
            point, mode = _fit_point(shape, f)
            if point.family != family:  # e.g. a tile that covers the image runs untiled
                raise RuntimeError(f"fit shape {shape} is not {family}; fix _FIT_SHAPES.")
            jobs.append(_Job(direction, family, point, mode))
    samples = _trace_samples(twin, jobs, device_type, dtype, channels, f)
    seconds = time.perf_counter() - start
    out = {}
    for key in wanted:
        mine = [s for s in samples if (s.job.direction, s.job.family) == key]
        laws, worst = _fit_family(mine, key[1])
        errors = [abs(laws.evaluate(s.job.point.features)[1] - s.peak) / max(s.peak, 1)
                  for s in mine]
        meta = {"direction": key[0], "family": key[1], "trace_seconds": round(seconds, 3),
                "fit_max_rel_error": max(errors), "phase_max_rel_residual": worst,
                "phases": len(laws.phases), "samples": len(mine),
                "shapes": [s.job.point.features for s in mine]}
        logger.debug("fitted %s/%s: %d phases, max fit error %.2e", *key, len(laws.phases),
                     max(errors))
        out[key] = (laws, meta)
    return out


def _source_digest(*modules: Any) -> str:
    """Digest of the runtime code whose memory the fits describe: edit it and the fits refit."""
    text = "".join(inspect.getsource(m) for m in modules)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _hash_extra(dtype: torch.dtype, device_type: str) -> dict[str, Any]:
    extra = {"dtype": str(dtype), "device_type": device_type, "torch": torch.__version__,
             "scheme": SCHEME_VERSION, "runtime": _runtime_digest()}
    if device_type == "cpu":
        # oneDNN's layout blocks and its use for small convolutions depend on these
        extra.update(isa=torch.backends.cpu.get_cpu_capability(),
                     threaded=torch.get_num_threads() > 1,
                     onednn=bool(torch.backends.mkldnn.is_available()
                                 and torch.backends.mkldnn.enabled))
    return extra


@functools.lru_cache(maxsize=1)
def _runtime_digest() -> str:
    return _source_digest(_autoencode, _tiling)


# ---------------------------------------------------------------- the model
class VAEMemoryModel:
    """Fitted memory and FLOPs model of one VAE's encode and decode under every :class:`AEMode`.

    Build it with :meth:`for_vae`; the constructor takes already fitted laws.

    Args:
        laws: ``{(direction, family): _FamilyLaws}`` as fitted or loaded by :meth:`for_vae`.
        weights_bytes: the VAE's parameters and buffers in ``dtype``.
        channels: ``(latent channels, image channels)``.
        factor: the spatial downsample factor.
        dtype: the planned dtype.
        device_type: ``"cpu"`` or ``"cuda"``.
        vae: the source module (kept by weak reference, for :meth:`trace`).
        report: per ``"direction/family"``: where the laws came from and their fit errors.
    """

    def __init__(self, laws: Mapping[tuple[str, str], _FamilyLaws], *, weights_bytes: int,
                 channels: tuple[int, int], factor: int, dtype: torch.dtype, device_type: str,
                 vae: nn.Module | None = None, report: Mapping[str, Any] | None = None) -> None:
        self.laws = dict(laws)
        self.weights_bytes = int(weights_bytes)
        self.channels, self.factor = (int(channels[0]), int(channels[1])), int(factor)
        self.dtype, self.device_type = dtype, device_type
        self.report = dict(report or {})
        self._vae_ref = weakref.ref(vae) if vae is not None else None
        self._trace_twin: nn.Module | None = None

    @property
    def directions(self) -> tuple[str, ...]:
        """The directions the VAE supports (``decode`` and/or ``encode``)."""
        return tuple(d for d in DIRECTIONS if any(key[0] == d for key in self.laws))

    @classmethod
    def for_vae(cls, vae: nn.Module, *, device_type: str = "cpu",
                dtype: torch.dtype = torch.float32,
                cache: FitCache | None = _DEFAULT_CACHE) -> VAEMemoryModel:
        """Fit (or load from ``cache``) the model of ``vae`` for ``device_type`` and ``dtype``.

        A meta-device twin of ``vae`` in ``dtype`` is traced on fake tensors, so ``vae`` may be
        real or on the meta device and is never run or modified. A cold fit traces 16 VAE
        calls per direction in one session (~4 s for the full-size KL-f8 on two busy CPU
        cores); a warm load reads six small JSON files (~15 ms).

        Args:
            vae: any module with ``encode`` and/or ``decode`` (ours or diffusers-style).
            device_type: the device to plan for, ``"cpu"`` or ``"cuda"`` (no GPU needed).
            dtype: the dtype the VAE will run in.
            cache: where fits are kept; default :class:`FitCache` (``$ENGINE_CACHE_DIR``);
                ``None`` always refits and stores nothing.

        Example:
            >>> model = VAEMemoryModel.for_vae(vae, device_type="cuda", dtype=torch.float16)
            >>> model.predict("decode", 16, 576, 1024, "per-frame").allocated_bytes
        """
        directions = _check_for_vae(vae, device_type, dtype)
        cache = FitCache() if cache is _DEFAULT_CACHE else cache
        extra = _hash_extra(dtype, device_type)
        keys = {(d, fam): architecture_hash(vae, f"{d}/{fam}", extra=extra)
                for d in directions for fam in FAMILIES}
        laws, report = {}, {}
        for key, digest in keys.items():
            loaded = _load(cache, digest) if cache is not None else None
            if loaded is not None:
                laws[key], meta = loaded
                report["/".join(key)] = {"source": "cache", **meta}
        missing = [key for key in keys if key not in laws]
        f, channels = downsample_factor(vae), _channels(vae)
        if missing:
            fitted = _fit_all(_meta_twin(vae, dtype), missing, device_type, dtype, channels, f)
            for key, (fam_laws, meta) in fitted.items():
                laws[key] = fam_laws
                report["/".join(key)] = {"source": "fit", **meta}
                if cache is not None:
                    _store(cache, keys[key], fam_laws, meta)
        weights = sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
                      for t in itertools.chain(vae.parameters(), vae.buffers()))
        return cls(laws, weights_bytes=weights, channels=channels, factor=f, dtype=dtype,
                   device_type=device_type, vae=vae, report=report)

    # -- evaluation --------------------------------------------------------------------------
    def _point(self, direction: str, frames: int, height: int, width: int,
               mode: AEMode | str) -> tuple[_Point, AEMode]:
        if direction not in self.directions:
            raise ValueError(f"`direction` must be one of {', '.join(self.directions)} (got "
                             f"{direction!r}); the VAE has no other method.")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"`frames` must be a positive int (got {frames!r}); pass the "
                             "number of frames folded into the batch.")
        f = self.factor
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < f or value % f:
                raise ValueError(f"`{name}` must be a positive multiple of the VAE's downsample "
                                 f"factor {f} (got {value!r}); round it to a multiple of {f}.")
        mode = AEMode.parse(mode, "mode")
        return _classify(frames, height // f, width // f, mode, f), mode

    def predict(self, direction: str, frames: int, height: int, width: int,
                mode: AEMode | str = "batched") -> VAEStageMemory:
        """Predicted memory of one ``encode_frames``/``decode_frames`` call.

        Args:
            direction: ``"decode"`` or ``"encode"``.
            frames: frames in the call (batch and time folded together).
            height: image height in PIXELS (for decode too), a multiple of the factor.
            width: image width in pixels.
            mode: an :class:`AEMode` or its string (``"per-frame"``, ``"chunk:4+tile:256x256"``).

        Example:
            >>> model.predict("decode", 16, 320, 512, "chunk:4").peak_new_bytes
        """
        point, mode = self._point(direction, frames, height, width, mode)
        laws = self.laws[(direction, point.family)]
        live, total, phase = self._memory(direction, point)
        pixels = point.lat[0] * point.lat[1]
        if direction == "decode":
            inputs = frames * self.channels[0] * pixels
        else:
            inputs = frames * self.channels[1] * pixels * self.factor ** 2
        cuda = self.device_type == "cuda"
        return VAEStageMemory(
            direction=direction, mode=str(mode), activation_bytes=int(math.ceil(live)),
            weights_bytes=self.weights_bytes, input_bytes=inputs * self.dtype.itemsize,
            workspace_bytes=int(math.ceil(total - live)),
            allocator_bytes=int(laws.allocator) if cuda else 0, peak_phase=phase,
            workspace_modelled=not cuda, extrapolated=laws.extrapolates(point.features))

    def _memory(self, direction: str, point: _Point) -> tuple[float, float, str]:
        """Live bytes, live+scratch bytes and the peak's phase of one call."""
        feats = point.features
        live, total, phase = self.laws[(direction, point.family)].evaluate(feats)
        n, k = feats["n"], feats["k"]
        if point.family == "chunked" and n < 2 * k:
            # One full chunk runs before the output buffer exists, then a smaller one with it;
            # the laws (fitted on equal chunks) describe each of the two calls.
            live, total, phase = self.laws[(direction, "chunked")].evaluate({**feats, "k": n - k})
            first = self.laws[(direction, "batched")].evaluate(feats)
            if first[0] > live:
                live, phase = first[0], first[2]
            total = max(total, first[1])
        return live, total, phase

    def flops(self, direction: str, frames: int, height: int, width: int,
              mode: AEMode | str = "batched") -> float:
        """Predicted FLOPs (convolutions and matmuls, 2 per multiply-add) of one call.

        Args:
            direction, frames, height, width, mode: as in :meth:`predict`.
        """
        point, _ = self._point(direction, frames, height, width, mode)
        law = self.laws[(direction, point.family)].flops
        return max(0.0, law.predict(point.features))

    def trace(self, direction: str, frames: int, height: int, width: int,
              mode: AEMode | str = "batched") -> TraceResult:
        """Trace the call directly on fake tensors (no laws): the ground truth the laws
        approximate, for validation. Costs about 1 ms per dispatched op.

        Args:
            direction, frames, height, width, mode: as in :meth:`predict`.
        """
        point, mode = self._point(direction, frames, height, width, mode)
        if self._trace_twin is None:
            vae = self._vae_ref() if self._vae_ref is not None else None
            if vae is None:
                raise RuntimeError("`trace` needs the VAE this model was built from, which is "
                                   "gone; rebuild the model with `VAEMemoryModel.for_vae`.")
            self._trace_twin = _meta_twin(vae, self.dtype)
        shape = _input_shape(direction, frames, point.lat, self.channels, self.factor)
        run = decode_frames if direction == "decode" else encode_frames
        x = torch.empty(shape, device="meta", dtype=self.dtype)
        with torch.no_grad():
            # a partial, so the tracer finds the twin and counts its weights from the start
            return trace_call(functools.partial(run, self._trace_twin, mode=mode), x,
                              device=self.device_type)


def _check_for_vae(vae: Any, device_type: str, dtype: Any) -> list[str]:
    """Validate :meth:`VAEMemoryModel.for_vae` arguments; return the VAE's directions."""
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"`device_type` must be 'cpu' or 'cuda' (got {device_type!r}); plan "
                         "other accelerators as 'cuda'.")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"`dtype` must be a floating torch dtype (got {dtype!r}); pass e.g. "
                         "torch.float16.")
    directions = [d for d in DIRECTIONS if callable(getattr(vae, d, None))]
    if not isinstance(vae, nn.Module) or not directions:
        raise ValueError(f"`vae` ({type(vae).__name__}) must be an nn.Module with `encode` "
                         "and/or `decode`; pass the autoencoder module itself.")
    return directions


def _load(cache: FitCache, key: str) -> tuple[_FamilyLaws, dict] | None:
    payload = cache.get(key)
    try:
        flops = ScalingLaw.from_dict(payload["laws"]["flops"])
        return _FamilyLaws.from_payload(payload["phases"], flops), dict(payload.get("meta", {}))
    except (TypeError, KeyError, ValueError) as err:
        if payload is not None:
            logger.warning("ignoring malformed VAE fit %s in the cache (%s); refitting", key, err)
        return None


def _store(cache: FitCache, key: str, laws: _FamilyLaws, meta: Mapping[str, Any]) -> None:
    cache.put(key, {"schema": SCHEMA_VERSION, "meta": dict(meta),
                    "laws": {"flops": laws.flops.to_dict()}, "phases": laws.to_payload()})
