"""Attention kernels behind one signature: ``op(q, k, v, heads) -> out``.

q, k, v and out are ``[batch, tokens, heads * dim_head]``. The model code calls whichever op its
``backend`` attribute names; which backend runs is an execution policy chosen by the planner and set
from outside (``engine.runtime.attention.set_attention_backend``), never decided inside a model.

Backends:
- ``naive``: the full score matrix, exactly as DynamiCrafter's plain path (einsum, scale, softmax).
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels).
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (only when its kernels really run).
- ``chunked:N``: SDPA over query chunks of N tokens, bounding the score matrix to N rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional dependency: probe once, decide per call
    import xformers.ops as _xops
except Exception:  # ImportError, or a broken build that fails while importing its kernels
    _xops = None

BACKENDS = ("naive", "sdpa", "xformers", "chunked")


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, hd = t.shape
    return t.reshape(b, n, heads, hd // heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def naive_attention(q, k, v, heads: int):
    """Full softmax(q k^T / sqrt(d)) v with the score matrix materialised (DynamiCrafter's path)."""
    q, k, v = (_split_heads(t, heads) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5
    sim = torch.matmul(q, k.transpose(-1, -2)) * scale
    sim = sim.softmax(dim=-1)
    return _merge_heads(torch.matmul(sim.to(v.dtype), v))


def sdpa_attention(q, k, v, heads: int):
    """PyTorch's fused scaled-dot-product attention."""
    q, k, v = (_split_heads(t, heads) for t in (q, k, v))
    return _merge_heads(F.scaled_dot_product_attention(q, k, v))


def xformers_attention(q, k, v, heads: int):
    """xformers' memory-efficient attention; raises ModuleNotFoundError when xformers is absent."""
    if _xops is None:
        raise ModuleNotFoundError(
            "attention backend `xformers` was forced but xformers does not import; "
            "install it with `pip install engine[xformers]` or choose `attention=sdpa`.")
    b, n, hd = q.shape
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, hd // heads).contiguous() for t in (q, k, v))
    return _xops.memory_efficient_attention(q, k, v).reshape(b, n, hd)


def chunked_attention(q, k, v, heads: int, chunk: int = 1024):
    """SDPA over query chunks: peak score memory is ``chunk`` rows instead of all queries."""
    outs = [sdpa_attention(q[:, i:i + chunk], k, v, heads) for i in range(0, q.shape[1], chunk)]
    return torch.cat(outs, dim=1)


def parse_backend(name: str) -> tuple[str, int | None]:
    """Split ``chunked:N`` into (kind, N); validate the name."""
    kind, _, arg = name.partition(":")
    if kind not in BACKENDS:
        raise ValueError(f"`attention` backend {name!r} is unknown; use one of naive, sdpa, xformers, chunked:N.")
    if kind == "chunked":
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"`attention` backend {name!r} needs a positive chunk size, e.g. `chunked:1024`.")
        return kind, int(arg)
    return kind, None


def attend(q, k, v, heads: int, backend: str = "sdpa"):
    """Dispatch to the backend named ``backend``."""
    kind, arg = parse_backend(backend)
    if kind == "naive":
        return naive_attention(q, k, v, heads)
    if kind == "xformers":
        return xformers_attention(q, k, v, heads)
    if kind == "chunked":
        return chunked_attention(q, k, v, heads, arg)
    return sdpa_attention(q, k, v, heads)


def xformers_importable() -> bool:
    return _xops is not None
