"""What real kernels allocate that fake tensors do not show, and where fakes take another path.

Two corrections keep a fake trace faithful to the real allocator:

* **Workspaces.** Some kernels allocate scratch memory inside one op (the im2col ``columns`` of
  the native CPU convolution, the per-thread buffers of CPU flash attention). A dispatch-level
  tracer only sees op outputs, so :func:`workspace_bytes` adds these as a transient within the op.
  Entries are registered per device type with :func:`register_workspace`; only kernels whose
  allocations were checked against the profiler are modelled. oneDNN (mkldnn) convolutions
  reorder inputs, weights and outputs to blocked layouts whose sizes depend on the CPU's ISA;
  they follow a layout heuristic checked on AVX-512 (see ``_mkldnn_conv_scratch``).
* **Layouts.** Where a real kernel picks another output layout than its meta kernel (CPU
  ``native_group_norm`` keeps a channels-last input channels-last) or ATen strides size-1 dims
  otherwise than fakes do, :func:`real_layout` restrides the fake output (same storage), so
  later layout-dependent choices (copies, oneDNN's NHWC path) follow the real run.
* **Composite-compliance branches.** ATen's composite ops take out-of-place paths when an
  argument is a tensor subclass, which fake tensors are: ``linear`` on a non-contiguous input
  adds its bias out of place (an extra output-sized allocation) where real tensors use ``add_``.
  :class:`FidelityMode` reroutes such calls to what real tensors do. It also picks the
  attention kernel: without a GPU, PyTorch sends fake CUDA tensors down the math path, which
  materialises the score matrix a real card never would with flash or memory-efficient SDPA.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch._prims_common import make_channels_last_strides_for, suggest_memory_format
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_map_only

logger = logging.getLogger(__name__)

__all__ = ["SDPA_BACKENDS", "FidelityMode", "has_workspace", "meta_like", "real_layout",
           "register_workspace", "workspace_bytes"]

WorkspaceFn = Callable[[tuple, dict, Any], int]
_WORKSPACES: dict[tuple[str, Any], WorkspaceFn] = {}

aten = torch.ops.aten


def register_workspace(device_type: str, op: Any) -> Callable[[WorkspaceFn], WorkspaceFn]:
    """Decorator registering ``fn(args, kwargs, out) -> bytes`` as ``op``'s workspace model.

    Args:
        device_type: the device type the kernel runs on, e.g. ``"cpu"`` or ``"cuda"``.
        op: the ATen overload as the tracer sees it, e.g. ``torch.ops.aten.convolution.default``.
    """
    def wrap(fn: WorkspaceFn) -> WorkspaceFn:
        _WORKSPACES[(device_type, op)] = fn
        return fn
    return wrap


def has_workspace(func: Any, device_type: str) -> bool:
    """Whether a workspace model is registered for ``func`` on ``device_type``."""
    return (device_type, func) in _WORKSPACES


def workspace_bytes(func: Any, args: tuple, kwargs: dict, out: Any, device_type: str) -> int:
    """Scratch bytes ``func`` allocates and frees inside itself on ``device_type`` (0 if unknown).

    Args:
        func: the ATen overload that ran.
        args: its positional arguments (fake tensors).
        kwargs: its keyword arguments.
        out: what it returned.
        device_type: the device type being planned for.
    """
    fn = _WORKSPACES.get((device_type, func))
    return int(fn(args, kwargs, out)) if fn is not None else 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """ATen's ``suggest_memory_format`` (the layout CPU kernels pick for their outputs)."""
    return suggest_memory_format(t) if t.dim() in (4, 5) else torch.contiguous_format


def _cpu_conv_uses_mkldnn(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation,
                          transposed: bool, groups: int) -> bool:
    """Mirror of ATen's ``ConvParams::use_mkldnn`` for CPU tensors (2-D and 3-D convolutions)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if x.dtype in (torch.bfloat16, torch.float16):
        return True
    if x.dtype != torch.float32:
        return False
    strided = any(s != 1 for s in stride)
    dilated = any(d != 1 for d in dilation)
    n, kh, kw = x.shape[0], w.shape[-2], w.shape[-1]
    not_1x1_single = (strided or dilated or n >= 16 or kw != 1 or kh != 1
                      or torch.get_num_threads() > 1)
    # ATen multiplies the first FOUR sizes (for a 3-D convolution: N*C*T*H, not the numel)
    lead = x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3]
    big_enough = groups > 1 or (kw > 3 and kh > 3) or n > 1 or lead > 20480
    return not_1x1_single and big_enough


def _mkldnn_conv_scratch(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> int:
    # oneDNN computes in channel-blocked layouts (16 channels per block with AVX-512, else 8):
    # all weights are reordered blocked. On the plain (NCHW) path inputs with at least a block
    # of channels are reordered too, and the output is produced blocked (padded channels) and
    # then copied to the plain output. On the channels-last path (either operand channels-last,
    # ``mkldnn_conv_use_channels_last``) oneDNN reads and writes NHWC directly; ATen first makes
    # input and weight contiguous in that layout (a copy of the weight unless it is 1x1).
    block = 16 if "AVX512" in torch.backends.cpu.get_cpu_capability() else 8
    pad = lambda c: -(-c // block) * block  # noqa: E731
    es = x.element_size()
    c_in, c_out = x.shape[1], out.shape[1]
    w_copy = pad(c_out) * (pad(c_in) if c_in >= block else c_in) * w[0, 0].numel() * es
    fmt = _memory_format(x)
    if fmt == torch.contiguous_format:
        fmt = _memory_format(w)
    if fmt != torch.contiguous_format:
        x_layout = 0 if x.is_contiguous(memory_format=fmt) else _nbytes(x)
        w_layout = 0 if w.is_contiguous(memory_format=fmt) else _nbytes(w)
        # plus oneDNN's scratchpad on this path: 4 KiB per thread and one more (measured)
        threads = torch.get_num_threads()
        return x_layout + w_layout + w_copy + 4096 * (threads + 1) + 24 * threads
    x_copy = x.numel() // c_in * pad(c_in) * es if c_in >= block else 0
    out_tmp = out.numel() // c_out * pad(c_out) * es
    return max(x_copy + w_copy + out_tmp - _nbytes(out), out_tmp)


@register_workspace("cpu", aten.convolution.default)
def _cpu_convolution(args: tuple, kwargs: dict, out: Any) -> int:
    x, w, _, stride, padding, dilation, transposed, _, groups = args[:9]
    if transposed or x.dim() not in (4, 5):
        return 0  # only the 2-D and 3-D forward convolutions are modelled
    if _cpu_conv_uses_mkldnn(x, w, stride, padding, dilation, transposed, groups):
        return _mkldnn_conv_scratch(x, w, out)
    if x.dim() == 5 and any(d != 1 for d in dilation):
        return 0  # slow_conv_dilated3d: not modelled
    # slow_conv2d follows a channels-last input (copying the weight to match); slow_conv3d
    # has no channels-last path and copies every non-contiguous input.
    fmt = _memory_format(x) if x.dim() == 4 else torch.contiguous_format
    copy = 0 if x.is_contiguous(memory_format=fmt) else _nbytes(x)
    if fmt != torch.contiguous_format and not w.is_contiguous(memory_format=fmt):
        copy += _nbytes(w)
    kernel = w.shape[2:]
    if (all(k == 1 for k in kernel) and all(s == 1 for s in stride)
            and all(p == 0 for p in padding)):
        return copy  # a 1x1 convolution uses the input as its columns
    # im2col columns for the whole batch: (N, C_in * prod(kernel), prod(output spatial))
    columns = x.shape[0] * x.shape[1] * math.prod(kernel) * math.prod(out.shape[2:])
    return copy + columns * x.element_size()


@register_workspace("cpu", aten.native_layer_norm.default)
def _cpu_layer_norm(args: tuple, kwargs: dict, out: Any) -> int:
    # the CPU kernel reads ``input.expect_contiguous()``: a strided input is copied first
    x = args[0]
    return 0 if x.is_contiguous() else _nbytes(x)


@register_workspace("cpu", aten._scaled_dot_product_flash_attention_for_cpu.default)
def _cpu_flash_attention(args: tuple, kwargs: dict, out: Any) -> int:
    q, k = args[0], args[1]
    q_len, kv_len, head = q.shape[2], k.shape[2], q.shape[3]
    q_split = 256 if q_len >= 768 else 64 if q_len >= 192 else 32
    qs, kvs = min(q_split, q_len), min(512, kv_len)
    accum = 8 if q.dtype == torch.float64 else 4
    per_thread = qs * kvs + 2 * qs + qs * head
    reduced = qs * kvs * q.element_size() if q.dtype in (torch.bfloat16, torch.float16) else 0
    return torch.get_num_threads() * (per_thread * accum + reduced)


def _cpu_group_norm_layout(args: tuple, out: Any) -> Any:
    # The CPU kernel writes its output in the input's suggested layout (``native_group_norm``:
    # ``empty_like(X, memory_format=X.suggest_memory_format())``); the meta kernel always
    # returns a contiguous tensor. A channels-last input (diffusers' attention blocks hand one
    # to the next GroupNorm) stays channels-last for real, so everything after it would be
    # traced in the wrong layout: copies and oneDNN reorders that never happen.
    y, mean, rstd = out
    fmt = _memory_format(args[0])
    if fmt == torch.contiguous_format or y.is_contiguous(memory_format=fmt):
        return out
    # Same storage, restrided: the allocation the tracer follows is unchanged.
    return aten.as_strided.default(y, y.shape, make_channels_last_strides_for(y.shape)), mean, rstd


_LAYOUTS: dict[tuple[str, Any], Callable[[tuple, Any], Any]] = {
    ("cpu", aten.native_group_norm.default): _cpu_group_norm_layout,
}


def meta_like(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor with ``t``'s shape, strides and dtype (a stand-in no dispatch mode sees)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


_META_STRIDES: dict[tuple, tuple] = {}  # metadata key -> per output (shape, strides) or None
_META_STRIDES_MAX = 200_000
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


def _metadata_key(obj: Any) -> Any:
    """A hashable key of what an op's output strides can depend on (tensors by shape, strides,
    offset and dtype), or None when ``obj`` holds something else."""
    if isinstance(obj, torch.Tensor):
        return ("T", tuple(obj.shape), obj.stride(), obj.storage_offset(), obj.dtype)
    if isinstance(obj, (tuple, list)):
        parts = tuple(_metadata_key(o) for o in obj)
        return None if any(p is None and o is not None for p, o in zip(parts, obj)) else (type(obj), parts)
    if isinstance(obj, dict):
        return _metadata_key(tuple(sorted(obj.items())))
    if isinstance(obj, _PLAIN) or isinstance(obj, torch._ops.OpOverload):
        return obj
    return None


def _meta_strides(func: Any, args: tuple, kwargs: dict) -> tuple:
    """Per output of ``func``: ``(shape, strides)`` ATen's C++ gives it on meta stand-ins of the
    arguments, or None (not a tensor, or no meta kernel)."""
    try:
        with _disable_current_modes():
            margs, mkwargs = tree_map_only(torch.Tensor, meta_like, (args, kwargs))
            # a Python number where the schema takes a Tensor is a 0-dim CPU tensor for real
            # (and TensorIterator orders dims differently for it than for a CPU scalar next
            # to meta tensors): give the meta run a 0-dim meta tensor instead
            margs = tuple(torch.tensor(a, device="meta")
                          if isinstance(a, (int, float)) and not isinstance(a, bool)
                          and isinstance(arg.type, torch.TensorType) else a
                          for a, arg in zip(margs, func._schema.arguments))
            mout = func(*margs, **mkwargs)
    except Exception:  # noqa: BLE001 - no meta kernel: keep the fake's strides
        return ()
    mouts = mout if isinstance(mout, (tuple, list)) else (mout,)
    return tuple((tuple(m.shape), m.stride()) if isinstance(m, torch.Tensor) else None for m in mouts)


def _aten_strides(func: Any, args: tuple, kwargs: dict, out: Any) -> Any:
    # Fake tensors compute output strides with Python references (``_prims_common``) that give
    # size-1 dims other strides than ATen's C++ (``computeStride`` for views, TensorIterator's
    # dimension order for pointwise ops): a (1, C, H, W) view of a transposed (1, HW, C)
    # tensor has N-stride C for real, C*H*W fake. ``suggest_memory_format`` reads those
    # strides (the real batch-1 tensor is NOT channels-last, the fake is), and with it
    # ``group_norm``'s copy and every later kernel's layout. Meta tensors run ATen's own C++
    # stride logic, so the op is re-run on meta stand-ins and size-1 strides are taken from it.
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if not any(isinstance(t, torch.Tensor) and t.dim() in (4, 5) and 1 in t.shape
               for t in outs) or func._schema.is_mutable:
        return out
    # the same op on the same metadata gives the same strides: a VAE or UNet repeats its layers
    key = _metadata_key((func, args, kwargs))
    meta = _META_STRIDES.get(key) if key is not None else None
    if meta is None:
        meta = _meta_strides(func, args, kwargs)
        if key is not None:
            if len(_META_STRIDES) > _META_STRIDES_MAX:
                _META_STRIDES.clear()
            _META_STRIDES[key] = meta
    if not meta:
        return out  # no meta kernel: keep the fake's strides
    fixed = []
    for t, m in zip(outs, meta):
        if (isinstance(t, torch.Tensor) and m is not None and tuple(t.shape) == m[0]
                and t.stride() != m[1]
                and all(a == b or n == 1 for a, b, n in zip(t.stride(), m[1], t.shape))):
            t = aten.as_strided.default(t, t.shape, m[1], t.storage_offset())
        fixed.append(t)
    if not isinstance(out, (tuple, list)):
        return fixed[0]
    # a plain tuple also for ATen's named return types: what the dispatcher hands back anyway
    return tuple(fixed) if isinstance(out, tuple) else fixed


def real_layout(func: Any, args: tuple, kwargs: dict, out: Any, device_type: str) -> Any:
    """``out`` with the strides the real kernel of ``func`` gives on ``device_type``.

    Meta kernels pick output layouts that some real kernels do not (checked on CPU for the
    normalisation, pooling, interpolation, padding, convolution and pointwise ops a VAE or a
    ResNet uses: only ``native_group_norm`` differs), and fakes stride size-1 dims otherwise
    than ATen does. The output storage is kept, so sizes and lifetimes are unchanged; only
    later ops see the layout the real run has.

    Args:
        func: the ATen overload that ran.
        args: its positional arguments (fake tensors).
        out: what the fake kernel returned.
        device_type: the device type being planned for.
    """
    out = _aten_strides(func, args, kwargs, out)
    fix = _LAYOUTS.get((device_type, func))
    return fix(args, out) if fix is not None else out


SDPA_BACKENDS = ("auto", "native", "flash", "efficient", "math")


class FidelityMode(TorchFunctionMode):
    """Route composite calls that branch on tensor subclasses to the path real tensors take.

    Args:
        device_type: the device type being planned for.
        sdpa_backend: which kernel ``F.scaled_dot_product_attention`` should be traced with:
            ``"native"`` lets PyTorch choose for the fake tensors (without a GPU, CUDA fakes get
            the math path, which materialises the score matrix); ``"auto"`` is native on CPU
            and on CUDA picks flash for fp16/bf16 without a mask (head dim <= 256), else
            memory-efficient, as PyTorch does on sm80+ cards; ``"flash"``, ``"efficient"`` and
            ``"math"`` force one kernel.
    """

    def __init__(self, device_type: str = "cpu", sdpa_backend: str = "auto") -> None:
        super().__init__()
        if sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"`sdpa_backend` {sdpa_backend!r} is unknown; use one of "
                             f"{', '.join(SDPA_BACKENDS)}.")
        self.device_type = device_type
        self.sdpa_backend = sdpa_backend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is torch._C._nn.linear:
            return _linear(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        return func(*args, **kwargs)

    def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              **extra):
        backend = self._pick_sdpa(q, attn_mask, extra)
        if backend == "native":
            return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal,
                                                  scale=scale, **extra)
        if backend == "math":
            return aten._scaled_dot_product_attention_math(
                q, k, v, attn_mask, dropout_p, is_causal, scale=scale)[0]
        if backend == "efficient":
            return aten._scaled_dot_product_efficient_attention(
                q, k, v, attn_mask, False, dropout_p, is_causal, scale=scale)[0]
        if q.device.type == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
        return aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p, is_causal, scale=scale)[0]

    def _pick_sdpa(self, q: torch.Tensor, attn_mask: Any, extra: dict) -> str:
        backend = self.sdpa_backend
        if extra.get("enable_gqa") or q.device.type not in ("cpu", "cuda"):
            return "native"  # grouped-query attention: leave kernel choice to PyTorch
        if backend == "auto":
            if q.device.type != "cuda":
                return "native"
            half = q.dtype in (torch.float16, torch.bfloat16)
            return "flash" if half and attn_mask is None and q.shape[-1] <= 256 else "efficient"
        if backend == "efficient" and q.device.type == "cpu":
            return "native"  # no memory-efficient kernel on CPU
        if backend == "flash" and q.device.type == "cuda" and attn_mask is not None:
            return "efficient"  # flash takes no mask; PyTorch falls back the same way
        return backend


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    # Real tensors take ``matmul`` + in-place ``add_`` exactly when the fused flatten path is
    # refused (non-contiguous input of rank > 2); fakes would add out of place.
    if bias is None or input.dim() <= 2 or input.is_contiguous():
        return F.linear(input, weight, bias)
    output = torch.matmul(input, weight.t())
    return output.add_(bias)
