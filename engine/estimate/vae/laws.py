"""Law families of the VAE memory model and their fitting (see :mod:`engine.estimate.vae`).

Each (direction, family) gets one live and one live+scratch law per phase over the family's
terms, plus a FLOPs law; :func:`fit_families` traces the fit shapes and fits them all.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..laws.cache import FitCache
from ..laws.scaling import ScalingLaw, fit_scaling_law, parse_term
from .shapes import fit_point

if TYPE_CHECKING:  # loading laws needs no torch; fitting them traces (imported in fit_families)
    import torch
    from torch import nn

    from .trace import TraceSample

logger = logging.getLogger(__name__)

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
# ~1 ms per op (~130 ops per VAE call) and each shape traces ONE call (see ``_Where`` in :mod:`engine.estimate.vae.trace`).
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


@dataclasses.dataclass
class FamilyLaws:
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

    def store(self, cache: FitCache, key: str, meta: Mapping[str, Any]) -> None:
        """Write these laws to ``cache`` under ``key`` (:meth:`load` reads them back)."""
        cache.put_fit(key, laws={"flops": self.flops}, meta=meta, phases=self.to_payload())

    @classmethod
    def load(cls, cache: FitCache, key: str) -> tuple[FamilyLaws, dict] | None:
        """The laws and fit details stored under ``key`` by :meth:`store`, or None."""
        fit = cache.get_fit(key)
        if fit is None:
            return None
        try:
            return cls.from_payload(fit.sections["phases"], fit.laws["flops"]), dict(fit.meta)
        except (TypeError, KeyError, ValueError) as err:
            logger.warning("ignoring malformed VAE fit %s in the cache (%s); refitting", key, err)
            return None

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], flops: ScalingLaw) -> FamilyLaws:
        return cls(tuple(data["terms"]), tuple(data["phases"]),
                   np.asarray(data["live"], dtype=np.float64).reshape(-1, len(data["terms"])),
                   np.asarray(data["total"], dtype=np.float64).reshape(-1, len(data["terms"])),
                   flops, float(data["allocator"]),
                   {k: (float(v[0]), float(v[1])) for k, v in data["ranges"].items()})


def _candidate_phases(samples: list[TraceSample]) -> list[str]:
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


def _fit_family(samples: list[TraceSample], family: str) -> tuple[FamilyLaws, float]:
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
    laws = FamilyLaws(terms, tuple(phases), np.array(rows["live"]).reshape(-1, len(terms)),
                       np.array(rows["total"]).reshape(-1, len(terms)), flops,
                       float(max(s.overhead for s in samples)), ranges)
    return laws, worst


def fit_families(twin: nn.Module, wanted: list[tuple[str, str]], device_type: str,
             dtype: torch.dtype, channels: tuple[int, int], f: int):
    """Trace the fit shapes of every wanted (direction, family) in one session and fit them;
    returns ``{(direction, family): (laws, meta)}``."""
    from .trace import TraceJob, trace_samples

    start = time.perf_counter()
    jobs = []
    for direction, family in wanted:
        for shape in _FIT_SHAPES[family]:
            point, mode = fit_point(shape, f)
            if point.family != family:  # e.g. a tile that covers the image runs untiled
                raise RuntimeError(f"fit shape {shape} is not {family}; fix _FIT_SHAPES.")
            jobs.append(TraceJob(direction, family, point, mode))
    samples = trace_samples(twin, jobs, device_type, dtype, channels, f)
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
