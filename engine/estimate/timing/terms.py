"""Fitted time terms of one direction of the AE time model (see :mod:`engine.estimate.timing`)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class DirectionTiming:
    """Fitted time terms of one direction (encode or decode).

    Attributes:
        per_call_s: fixed seconds per VAE call.
        knots: ``(p, seconds per FLOP)`` pairs sorted by ``p`` (latent pixels per call), for
            one-frame calls.
        flops_hw: FLOPs per frame per latent pixel (``a``).
        flops_hw2: FLOPs per frame per latent pixel squared (``b``, attention).
        out_channels: channels of one call's output (3 for decode, 8 for encode moments).
        out_scale: output pixels per latent unit along one axis (the downsample factor for decode,
            1 for encode).
        batch_knots: ``(k, factor)`` pairs sorted by ``k``: seconds per FLOP of a ``k``-frame
            call relative to a one-frame call with the same ``p`` (1.0 when ``p`` alone decides).
    """

    per_call_s: float
    knots: tuple[tuple[float, float], ...]
    flops_hw: float
    flops_hw2: float
    out_channels: int
    out_scale: int
    batch_knots: tuple[tuple[float, float], ...] = ((1.0, 1.0),)

    def flops(self, frames: int, hw: int) -> float:
        """FLOPs of one call over ``frames`` frames of ``hw`` latent pixels."""
        return frames * (self.flops_hw * hw + self.flops_hw2 * hw * hw)

    def seconds_per_flop(self, p: float, frames: int = 1) -> float:
        """``s(p)`` times the batch factor of ``frames``: each interpolated linearly in log-log
        between knots and held flat outside them."""
        return loglog(self.knots, p) * loglog(self.batch_knots, frames)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["knots"] = [list(k) for k in self.knots]
        out["batch_knots"] = [list(k) for k in self.batch_knots]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DirectionTiming:
        pairs = lambda key, default: tuple((float(a), float(b))  # noqa: E731
                                           for a, b in data.get(key, default))
        return cls(float(data["per_call_s"]), pairs("knots", ()), float(data["flops_hw"]),
                   float(data["flops_hw2"]), int(data["out_channels"]), int(data["out_scale"]),
                   pairs("batch_knots", ((1.0, 1.0),)))


def loglog(knots: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise-linear interpolation of ``log y`` over ``log x``; flat outside the knots."""
    if x <= knots[0][0]:
        return knots[0][1]
    for (x0, y0), (x1, y1) in zip(knots, knots[1:]):
        if x <= x1:
            u = math.log(x / x0) / math.log(x1 / x0)
            return math.exp(math.log(y0) + u * (math.log(y1) - math.log(y0)))
    return knots[-1][1]

