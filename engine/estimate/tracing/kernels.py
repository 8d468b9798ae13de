"""What real kernels allocate that fake tensors do not show, and where fakes take another path.

Two corrections keep a fake trace faithful to the real allocator:

* **Workspaces.** Some kernels allocate scratch memory inside one op (the im2col ``columns`` of
  the native CPU convolution, the per-thread buffers of CPU flash attention). A dispatch-level
  tracer only sees op outputs, so :func:`workspace_bytes` adds these as a transient within the op.
  Entries are registered per device type with :func:`register_workspace`; only kernels whose
  allocations were checked against the profiler are modelled. oneDNN (mkldnn) convolutions
  reorder inputs, weights and outputs to blocked layouts whose sizes depend on the CPU's ISA;
  they follow a layout heuristic checked on AVX-512 (see ``_mkldnn_conv_scratch``).
* **Composite-compliance branches.** ATen's composite ops take out-of-place paths when an
  argument is a tensor subclass, which fake tensors are: ``linear`` on a non-contiguous input
  adds its bias out of place (an extra output-sized allocation) where real tensors use ``add_``.
  :class:`FidelityMode` reroutes such calls to what real tensors do. It also picks the
  attention kernel: without a GPU, PyTorch sends fake CUDA tensors down the math path, which
  materialises the score matrix a real card never would with flash or memory-efficient SDPA.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

__all__ = ["SDPA_BACKENDS", "FidelityMode", "has_workspace", "register_workspace", "workspace_bytes"]

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


def _cpu_conv_uses_mkldnn(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation,
                          transposed: bool, groups: int) -> bool:
    """Mirror of ATen's ``ConvParams::use_mkldnn`` for float32 CPU tensors."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if x.dtype != torch.float32 or x.dim() != 4:
        return x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 4
    strided = any(s != 1 for s in stride)
    dilated = any(d != 1 for d in dilation)
    n, kh, kw = x.shape[0], w.shape[-2], w.shape[-1]
    not_1x1_single = (strided or dilated or n >= 16 or kw != 1 or kh != 1
                      or torch.get_num_threads() > 1)
    big_enough = groups > 1 or (kw > 3 and kh > 3) or n > 1 or x.numel() > 20480
    return not_1x1_single and big_enough


def _mkldnn_conv_scratch(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> int:
    # oneDNN computes in channel-blocked layouts (16 channels per block with AVX-512, else 8):
    # inputs with at least a block of channels and all weights are reordered, the output is
    # produced blocked (padded channels) and then copied to the plain output.
    block = 16 if "AVX512" in torch.backends.cpu.get_cpu_capability() else 8
    pad = lambda c: -(-c // block) * block  # noqa: E731
    es = x.element_size()
    c_in, c_out = x.shape[1], out.shape[1]
    x_copy = x.numel() // c_in * pad(c_in) * es if c_in >= block else 0
    w_copy = pad(c_out) * (pad(c_in) if c_in >= block else c_in) * w[0, 0].numel() * es
    out_tmp = out.numel() // c_out * pad(c_out) * es
    return max(x_copy + w_copy + out_tmp - _nbytes(out), out_tmp)


@register_workspace("cpu", aten.convolution.default)
def _cpu_convolution(args: tuple, kwargs: dict, out: Any) -> int:
    x, w, _, stride, padding, dilation, transposed, _, groups = args[:9]
    if transposed or x.dim() != 4:
        return 0  # only the 2-D forward convolution is modelled
    if _cpu_conv_uses_mkldnn(x, w, stride, padding, dilation, transposed, groups):
        return _mkldnn_conv_scratch(x, w, out)
    copy = 0 if x.is_contiguous() else _nbytes(x)
    kh, kw = w.shape[-2:]
    if kh == kw == 1 and all(s == 1 for s in stride) and all(p == 0 for p in padding):
        return copy  # a 1x1 convolution uses the input as its columns
    # slow_conv2d builds im2col columns: (N, C_in * kh * kw, H_out * W_out)
    columns = x.shape[0] * x.shape[1] * kh * kw * out.shape[-2] * out.shape[-1]
    return copy + columns * x.element_size()


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
