"""Attention backend as a removable execution policy, and an honest xformers availability probe.

Every :class:`~engine.models.transformers.CrossAttention` reads its ``backend`` attribute on each
call (``naive`` | ``sdpa`` | ``xformers`` | ``chunked:N``, see :mod:`engine.models.attention_ops`).
This module sets that attribute from outside -- globally, or separately for the attentions inside
``SpatialTransformer`` and ``TemporalTransformer`` -- and hands back the previous values so the
change can be undone exactly. The reference plan (DynamiCrafter's own inference) is
``spatial="xformers", temporal="naive"``.

``xformers`` only counts as available when a tiny real ``memory_efficient_attention`` call runs
on the target device (an importable wheel built for another CUDA/torch, or a CPU-only machine,
fails with "No operator found" only at call time). The answer is cached per device and dtype.

Example:
    >>> backend = resolve_attention("auto", "cuda")          # 'xformers' if its kernels run, else 'sdpa'
    >>> previous = set_attention_backend(unet, backend, temporal="naive")
    >>> ...                                                  # run the UNet
    >>> restore_attention_backend(unet, previous)
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from ..models.attention_ops import parse_backend
from ..models.transformers import CrossAttention, SpatialTransformer, TemporalTransformer

logger = logging.getLogger(__name__)

__all__ = ["resolve_attention", "restore_attention_backend", "set_attention_backend",
           "xformers_kernels_work"]


def _device_key(device: str | torch.device) -> str:
    """A canonical cache key: ``cuda`` and ``cuda:<current>`` are the same device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


@functools.lru_cache(maxsize=None)
def _probe_xformers(device: str, dtype: torch.dtype) -> tuple[bool, str]:
    """(works, reason): import xformers and run one tiny attention call on ``device``."""
    try:
        import xformers.ops as xops
    except Exception as exc:  # ImportError, or a broken build failing while loading its kernels
        return False, f"xformers does not import ({type(exc).__name__}: {exc})"
    try:
        q = torch.randn(1, 8, 1, 32, device=device, dtype=dtype)  # [batch, tokens, heads, dim]
        out = xops.memory_efficient_attention(q, q, q)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)  # kernel launch errors surface only at a sync
        if out.shape != q.shape or not torch.isfinite(out).all():
            return False, "xformers returned a wrong result on a tiny probe"
    except Exception as exc:  # NotImplementedError('No operator found ...'), RuntimeError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, f"xformers kernels do not run on {device} ({first})"
    return True, "xformers kernels run"


def xformers_kernels_work(device: str | torch.device, dtype: torch.dtype = torch.float16) -> bool:
    """Whether xformers' ``memory_efficient_attention`` really runs on ``device`` (cached).

    Args:
        device: the device attention will run on (``"cuda"``, ``"cuda:1"``, ``"cpu"``).
        dtype: the dtype of q/k/v (fp16 covers the fp16 and fp32-autocast plans).

    Returns:
        ``True`` only when xformers imports AND a tiny real call succeeds; every failure
        (ImportError, "No operator found", CUDA errors) gives ``False``, never an exception.

    Example:
        >>> xformers_kernels_work("cpu")
        False
    """
    works, reason = _probe_xformers(_device_key(device), dtype)
    logger.debug("xformers probe on %s (%s): %s", device, dtype, reason)
    return works


def resolve_attention(requested: str, device: str | torch.device,
                      dtype: torch.dtype = torch.float16) -> str:
    """Turn a requested backend into one that runs on ``device``.

    Args:
        requested: ``"auto"``, ``"naive"``, ``"sdpa"``, ``"xformers"`` or ``"chunked:N"``.
        device: the device attention will run on.
        dtype: the dtype of q/k/v, for the xformers probe.

    Returns:
        ``"auto"`` becomes ``"xformers"`` when its kernels really run, else ``"sdpa"``; other
        names are validated and returned unchanged.

    Raises:
        ModuleNotFoundError: ``"xformers"`` was forced and xformers does not import.
        RuntimeError: ``"xformers"`` was forced, imports, but its kernels do not run on ``device``.

    Example:
        >>> resolve_attention("auto", "cpu")
        'sdpa'
    """
    if requested == "auto":
        return "xformers" if xformers_kernels_work(device, dtype) else "sdpa"
    kind, _ = parse_backend(requested)
    if kind == "xformers":
        works, reason = _probe_xformers(_device_key(device), dtype)
        if not works:
            exc = ModuleNotFoundError if "does not import" in reason else RuntimeError
            raise exc(f"`attention` 'xformers' was forced but {reason}; install a matching build "
                      f"with `pip install engine[xformers]` or use `attention=auto` (falls back to sdpa).")
    return requested


def _classify(module: nn.Module) -> dict[str, str]:
    """Qualified name -> 'spatial' | 'temporal' | 'other' for every CrossAttention under ``module``."""
    owner: dict[int, str] = {}
    for mod in module.modules():
        kind = ("spatial" if isinstance(mod, SpatialTransformer)
                else "temporal" if isinstance(mod, TemporalTransformer) else None)
        if kind is not None:
            for sub in mod.modules():
                if isinstance(sub, CrossAttention):
                    owner[id(sub)] = kind
    return {name: owner.get(id(mod), "other") for name, mod in module.named_modules()
            if isinstance(mod, CrossAttention)}


def set_attention_backend(module: nn.Module, backend: str | None = None, *, spatial: str | None = None,
                          temporal: str | None = None,
                          device: str | torch.device | None = None) -> dict[str, str]:
    """Set the attention backend of every ``CrossAttention`` under ``module``.

    Args:
        module: a UNet, the whole container, or any module holding ``CrossAttention`` layers.
        backend: backend for every attention (``None``: leave those not covered below as they are).
        spatial: overrides ``backend`` for attentions inside ``SpatialTransformer``.
        temporal: overrides ``backend`` for attentions inside ``TemporalTransformer``.
        device: when given, each name goes through :func:`resolve_attention` for that device
            (so ``"auto"`` is allowed and a forced ``"xformers"`` is checked); without it,
            names must be concrete backends.

    Returns:
        The previous settings, ``{qualified module name: backend}``, for
        :func:`restore_attention_backend`.

    Example:
        >>> previous = set_attention_backend(model, "sdpa", spatial="xformers", temporal="naive")
        >>> restore_attention_backend(model, previous)
    """
    wanted = {"spatial": spatial or backend, "temporal": temporal or backend, "other": backend}
    for key, name in wanted.items():
        if name is None:
            continue
        if device is not None:
            wanted[key] = resolve_attention(name, device)
        elif name == "auto":
            raise ValueError("`backend` 'auto' needs a `device` to probe; pass device=... or "
                             "resolve it first with resolve_attention('auto', device).")
        else:
            parse_backend(name)
    kinds = _classify(module)
    if not kinds:
        logger.warning("set_attention_backend: %s holds no CrossAttention; nothing was changed",
                       type(module).__name__)
    previous = {}
    for name, kind in kinds.items():
        attn = module.get_submodule(name)
        previous[name] = attn.backend
        if wanted[kind] is not None:
            attn.backend = wanted[kind]
    logger.debug("attention backends on %s: %s", type(module).__name__, wanted)
    return previous


def restore_attention_backend(module: nn.Module, previous: dict[str, str]) -> None:
    """Undo :func:`set_attention_backend` with the dictionary it returned.

    Args:
        module: the same module ``set_attention_backend`` was called on.
        previous: its return value.

    Example:
        >>> restore_attention_backend(unet, set_attention_backend(unet, "naive"))
    """
    missing = [name for name in previous if not isinstance(_get(module, name), CrossAttention)]
    if missing:
        raise ValueError(f"`previous` names modules that are not CrossAttention layers of "
                         f"{type(module).__name__} ({', '.join(missing[:5])}); pass the dictionary "
                         f"returned by set_attention_backend on this same module.")
    for name, value in previous.items():
        module.get_submodule(name).backend = value


def _get(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None
