"""Scaling laws read off two aligned trace logs: every size is a monomial in the shape features.

Each tensor a UNet call allocates has a size that is a product of its dimensions: batch ``b``,
frames ``f``, latent pixels per frame ``hw`` (divided by 4 per UNet level), and constants (channels,
heads, 77 text tokens). So the size is ``c * b^i * f^j * hw^k``: activations ``b*f*hw``, spatial
score matrices ``b*f*hw^2``, temporal score matrices ``b*f^2*hw``, per-frame context ``b*f``,
autocast's weight casts ``1``. Tracing the same call at two shapes whose feature ratios are
distinct primes (b x2, f x3, hw x5) tells every item's exponents from its size ratio alone, since
``2^i 3^j 5^k`` factors uniquely. With the exponents known, the live bytes after every allocation
become a law ``sum_t coef_t * term_t``; the peak at any shape is the largest of them (a max of
laws), of which only the Pareto-undominated few are kept. FLOPs and bytes moved are sums of per-op
monomials, so they become single laws.

The derivation needs the two logs to line up (same allocations, frees and ops in the same order);
a call whose op sequence depends on the shape (size-1 dimensions turning copies into views, a
query-chunk loop) must be traced in one regime (e.g. b == 1 apart from b >= 2).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from .scaling import ScalingLaw

if TYPE_CHECKING:  # the laws are read without torch; only deriving them reads trace logs
    from ..tracing.log import TraceLog

logger = logging.getLogger(__name__)

__all__ = ["MonomialLaws", "derive_laws", "term_name"]

_RATIO_TOL = 1e-6


def term_name(exponents: Sequence[int], features: Sequence[str]) -> str:
    """``(1, 2, 1)`` over ``("b", "f", "hw")`` -> ``"b*f^2*hw"``; all zero -> ``"1"``."""
    parts = [name if e == 1 else f"{name}^{e}" for name, e in zip(features, exponents) if e]
    return "*".join(parts) or "1"


@dataclasses.dataclass(frozen=True)
class MonomialLaws:
    """The laws of one stage in one regime, evaluated with one matrix product.

    Attributes:
        features: feature names, e.g. ``("b", "f", "hw")``.
        exponents: one exponent tuple per term (column).
        peak_rows: live new bytes at each candidate peak, one row of coefficients per candidate.
        retained: coefficients of the bytes still allocated when the call returns.
        flops: coefficients of the call's FLOPs.
        moved: coefficients of the bytes its non-view ops read and write.
        unmatched_fraction: share of the second trace's allocated bytes whose size ratio matched
            no monomial (fitted to the larger trace instead); 0 for a clean derivation.
    """

    features: tuple[str, ...]
    exponents: tuple[tuple[int, ...], ...]
    peak_rows: np.ndarray
    retained: np.ndarray
    flops: np.ndarray
    moved: np.ndarray
    unmatched_fraction: float = 0.0

    def monomials(self, values: Mapping[str, float]) -> np.ndarray:
        """The value of every term at ``values`` (a mapping feature -> value)."""
        x = np.array([float(values[name]) for name in self.features])
        return np.prod(x[None, :] ** np.array(self.exponents, dtype=float), axis=1)

    def evaluate(self, values: Mapping[str, float]) -> dict[str, float]:
        """Peak new bytes, retained bytes, FLOPs and bytes moved at ``values``.

        Args:
            values: a value for every name in :attr:`features`.
        """
        m = self.monomials(values)
        return {"peak": float(np.max(self.peak_rows @ m)), "retained": float(self.retained @ m),
                "flops": float(self.flops @ m), "moved": float(self.moved @ m)}

    def to_laws(self, ranges: Mapping[str, tuple[float, float]]) -> dict[str, ScalingLaw]:
        """Named :class:`ScalingLaw` objects (``peak.NNN``, ``retained``, ``flops``, ``moved``)."""
        terms = tuple(term_name(e, self.features) for e in self.exponents)

        def law(coefs: np.ndarray) -> ScalingLaw:
            return ScalingLaw(terms, tuple(float(c) for c in coefs), feature_ranges=dict(ranges))

        laws = {f"peak.{i:03d}": law(row) for i, row in enumerate(self.peak_rows)}
        laws.update(retained=law(self.retained), flops=law(self.flops), moved=law(self.moved))
        return laws

    @classmethod
    def from_laws(cls, laws: Mapping[str, ScalingLaw], features: Sequence[str],
                  exponents: Sequence[Sequence[int]], unmatched_fraction: float = 0.0
                  ) -> MonomialLaws:
        """Inverse of :meth:`to_laws` (``exponents`` as stored next to the laws)."""
        rows = [np.array(laws[k].coefficients) for k in sorted(laws) if k.startswith("peak.")]
        return cls(tuple(features), tuple(tuple(int(v) for v in e) for e in exponents),
                   np.array(rows), np.array(laws["retained"].coefficients),
                   np.array(laws["flops"].coefficients), np.array(laws["moved"].coefficients),
                   unmatched_fraction)


def _candidates(features: Sequence[str], max_exp: Mapping[str, int]) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(max_exp.get(name, 2) + 1) for name in features)))


def _classify(size_a: np.ndarray, size_b: np.ndarray, log_ratio: np.ndarray,
              mono_a: np.ndarray, mono_b: np.ndarray):
    """Per item: candidate index and coefficient; ``matched`` says whether the ratio was exact."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log(np.where(size_a > 0, size_b, 1.0) / np.where(size_a > 0, size_a, 1.0))
    dist = np.abs(r[:, None] - log_ratio[None, :])
    idx = np.argmin(dist, axis=1)
    matched = (dist[np.arange(len(idx)), idx] < _RATIO_TOL) & (size_a > 0)
    coef = np.where(matched, size_a / mono_a[idx], size_b / mono_b[idx])
    zero = (size_a == 0) & (size_b == 0)
    return idx, np.where(zero, 0.0, coef), matched | zero


def _check_aligned(a: TraceLog, b: TraceLog) -> None:
    if a.events != b.events or len(a.op_flops) != len(b.op_flops) or len(a.moved) != len(b.moved):
        raise ValueError("the two traces took different op sequences (a shape-dependent path); "
                         "trace both shapes in one regime, e.g. both with batch >= 2.")


def _dense(idx: np.ndarray, coef: np.ndarray, n_terms: int) -> np.ndarray:
    out = np.zeros((len(idx), n_terms))
    out[np.arange(len(idx)), idx] = coef
    return out


def _peak_rows(a: TraceLog, b: TraceLog, rec: np.ndarray, cls) -> np.ndarray:
    """Live-bytes coefficients after every allocation and at every transient."""
    ev = np.array(a.events, dtype=np.int64)
    sign = np.where(ev >= 0, 1.0, -1.0)
    rid = np.where(ev >= 0, ev, ~ev)
    live = np.cumsum(rec[rid] * sign[:, None], axis=0)
    rows = [live[ev >= 0]]
    trans_a = {(op, i): (pos, s) for i, (pos, op, s) in _ordinal(a.transients)}
    trans_b = {(op, i): (pos, s) for i, (pos, op, s) in _ordinal(b.transients)}
    if trans_a or trans_b:
        keys = sorted(set(trans_a) | set(trans_b))
        sa = np.array([trans_a.get(k, (0, 0))[1] for k in keys], dtype=float)
        sb = np.array([trans_b.get(k, (0, 0))[1] for k in keys], dtype=float)
        pos = np.array([(trans_a.get(k) or trans_b[k])[0] for k in keys])
        idx, coef, _ = cls(sa, sb)
        base = np.vstack([np.zeros((1, rec.shape[1])), live])[pos]
        rows.append(base + _dense(idx, coef, rec.shape[1]))
    return np.vstack(rows)


def _ordinal(transients):
    counts: dict[int, int] = {}
    for pos, op, size in transients:
        counts[op] = counts.get(op, -1) + 1
        yield counts[op], (pos, op, size)


def _pareto(rows: np.ndarray) -> np.ndarray:
    """Rows not dominated (coefficient by coefficient) by another row; features are >= 0."""
    rows = np.unique(np.round(rows, 6), axis=0)
    order = np.argsort(-(rows / np.maximum(np.abs(rows).max(axis=0), 1e-30)).sum(axis=1))
    kept: list[np.ndarray] = []
    for row in rows[order]:
        if not kept or not np.any(np.all(np.array(kept) >= row - 1e-6 * np.abs(row), axis=1)):
            kept.append(row)
    return np.array(kept)


def derive_laws(a: TraceLog, b: TraceLog, feats_a: Mapping[str, float],
                feats_b: Mapping[str, float], max_exp: Mapping[str, int]) -> MonomialLaws:
    """Laws for peak, retained bytes, FLOPs and traffic from two aligned logs.

    Args:
        a: the log at the smaller shape.
        b: the log at the larger shape; each varied feature's ratio to ``a`` must be a distinct
            prime (e.g. b x2, f x3, hw x5) so every monomial has its own size ratio.
        feats_a: feature values of ``a``, e.g. ``{"b": 2, "f": 2, "hw": 256}``.
        feats_b: feature values of ``b``.
        max_exp: the highest exponent to consider per feature (``{"b": 1, "f": 2, "hw": 2}``).
    """
    _check_aligned(a, b)
    features = tuple(feats_a)
    exps = _candidates(features, max_exp)
    e = np.array(exps, dtype=float)
    va = np.array([float(feats_a[n]) for n in features])
    vb = np.array([float(feats_b[n]) for n in features])
    mono_a, mono_b = np.prod(va ** e, axis=1), np.prod(vb ** e, axis=1)
    log_ratio = np.log(mono_b / mono_a)
    cls = lambda sa, sb: _classify(sa, sb, log_ratio, mono_a, mono_b)  # noqa: E731
    raw_a, raw_b = np.array(a.raw, dtype=float), np.array(b.raw, dtype=float)
    idx, coef, ok = cls(raw_a, raw_b)
    rec = _dense(idx, coef, len(exps))
    # The allocator's rounding is a per-tensor constant of at most one block: kept as a "1" term.
    rec[:, exps.index((0,) * len(features))] += np.array(b.rounded, dtype=float) - raw_b
    unmatched = float(raw_b[~ok].sum() / max(raw_b.sum(), 1.0))
    if unmatched:
        logger.debug("%.3g%% of allocated bytes matched no monomial", 100 * unmatched)
    peak = _pareto(_peak_rows(a, b, rec, cls))
    retained = rec[a.alive_at_end].sum(axis=0)
    flops = _dense(*cls(np.array(a.op_flops, float), np.array(b.op_flops, float))[:2],
                   len(exps)).sum(axis=0)
    moved = _dense(*cls(np.array(a.moved, float), np.array(b.moved, float))[:2],
                   len(exps)).sum(axis=0)
    used = np.flatnonzero(np.any(np.vstack([peak, retained, flops, moved]) != 0, axis=0))
    return MonomialLaws(features, tuple(exps[i] for i in used), peak[:, used], retained[used],
                        flops[used], moved[used], unmatched)
