"""How a precision and an attention setting are traced, in names only (no torch import).

Precision regimes (``precision`` names): ``fp32-autocast`` keeps fp32 weights and computes under
fp16 autocast (DynamiCrafter's own inference); ``fp16`` and ``bf16`` are half-precision weights
and activations (equal byte counts, traced as fp16); ``fp32`` is full precision. The torch dtypes
are resolved on access, so reading cached laws never imports torch; tracing does.
"""
from __future__ import annotations

import dataclasses

from ...plan.settings import parse_attention

__all__ = ["PRECISIONS", "Precision", "attention_family", "precision_of"]

_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


def _dtype(name: str | None):
    if name is None:
        return None
    import torch  # only tracing asks for the dtype itself

    return getattr(torch, name)


@dataclasses.dataclass(frozen=True)
class Precision:
    """How a precision name is traced: weight, activation and autocast dtypes, by torch name."""

    family: str
    weight: str
    act: str
    autocast: str | None = None

    @property
    def weight_bytes(self) -> int:
        """Bytes of one floating weight element."""
        return _ITEMSIZE[self.weight]

    @property
    def weight_dtype(self):
        return _dtype(self.weight)

    @property
    def act_dtype(self):
        return _dtype(self.act)

    @property
    def autocast_dtype(self):
        return _dtype(self.autocast)


PRECISIONS = {
    "fp32-autocast": Precision("amp16", "float32", "float32", "float16"),
    "fp16": Precision("half", "float16", "float16"),
    "bf16": Precision("half", "float16", "float16"),  # bf16 bytes equal fp16 bytes
    "fp32": Precision("fp32", "float32", "float32"),
}


def precision_of(name: str) -> Precision:
    """The :class:`Precision` for ``name``; raises for unknown names."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"`precision` {name!r} is unknown; use one of "
                         f"{', '.join(PRECISIONS)}.") from None


def attention_family(attention: str, device_type: str) -> tuple[str, str]:
    """``(spatial, temporal)`` backend kinds for an ``attention`` setting.

    ``attention`` is one backend for every attention layer (``naive``, ``sdpa``, ``xformers``,
    ``chunked:N``) or ``SPATIAL/TEMPORAL``, e.g. ``xformers/naive`` for DynamiCrafter's own run
    (xformers in spatial layers, the plain path in temporal ones). The chunk size is dropped:
    with fused kernels chunking changes only per-chunk scratch, bounded by the one-chunk trace.
    """
    parts = attention.split("/")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError(f"`attention` {attention!r} has more than one '/'; write one backend or "
                         "SPATIAL/TEMPORAL such as 'xformers/naive'.")
    kinds = tuple(parse_attention(p, "attention")[0].value for p in parts)
    if "xformers" in kinds and device_type != "cuda":
        raise ValueError(f"`attention` {attention!r} needs CUDA (xformers has no CPU kernels); "
                         "use 'sdpa' or 'naive' for device type 'cpu'.")
    return kinds  # type: ignore[return-value]
