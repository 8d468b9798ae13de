"""Scaling laws: a cost (peak bytes, FLOPs, seconds) as a linear sum of monomials in features.

A few traces at small shapes pin down a formula such as::

    peak = a + b * n*hw + c * n*hw^2      (n frames in flight, hw latent pixels per frame)

where the ``hw^2`` term is attention's score matrix (quadratic in tokens per frame). Terms are
written in a tiny syntax: ``"1"`` for the constant, otherwise factors joined by ``*``, each a
feature name with an optional integer or decimal power (``"n*hw^2"``, ``"k*tile^1.5"``). The fit
is least squares on relative residuals by default, since costs span orders of magnitude and the
planner cares about the ratio predicted/real; columns are rescaled first so that ``hw^2`` (1e10)
and ``1`` do not ruin the conditioning.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["ScalingLaw", "fit_scaling_law", "parse_term"]

_FACTOR = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\^(\d+(?:\.\d+)?))?$")

Factors = tuple[tuple[str, float], ...]
Sample = tuple[Mapping[str, float], float]


def parse_term(term: str) -> Factors:
    """Parse ``"n*hw^2"`` into ``(("n", 1.0), ("hw", 2.0))``; ``"1"`` is the empty product.

    Args:
        term: ``"1"`` or feature names with optional ``^power`` joined by ``*``.
    """
    text = term.replace(" ", "")
    if text == "1":
        return ()
    factors = []
    for part in text.split("*"):
        match = _FACTOR.match(part)
        if match is None:
            raise ValueError(f"`terms` entry {term!r} is not '1' or names with optional ^power "
                             "joined by '*' (e.g. 'n*hw^2').")
        factors.append((match.group(1), float(match.group(2) or 1)))
    return tuple(factors)


def _evaluate(factors: Factors, features: Mapping[str, float]) -> float:
    value = 1.0
    for name, power in factors:
        try:
            x = features[name]
        except KeyError:
            raise KeyError(f"`features` lacks {name!r}; pass every feature the law's terms use "
                           f"({', '.join(sorted({n for n, _ in factors}))}).") from None
        value *= x if power == 1.0 else x ** power
    return value


@dataclasses.dataclass(frozen=True)
class ScalingLaw:
    """A fitted ``sum(coef * term)``; cheap to evaluate, JSON round-trippable.

    Attributes:
        terms: the term strings, as given to :func:`fit_scaling_law`.
        coefficients: one coefficient per term.
        max_rel_residual: largest ``|pred - y| / |y|`` over the fitting samples.
        holdout_max_rel_residual: the same over held-out samples, or None when none were given.
        feature_ranges: min and max of each feature seen while fitting (to spot extrapolation).
    """

    terms: tuple[str, ...]
    coefficients: tuple[float, ...]
    max_rel_residual: float = 0.0
    holdout_max_rel_residual: float | None = None
    feature_ranges: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.terms) != len(self.coefficients):
            raise ValueError("`coefficients` must have one entry per term; got "
                             f"{len(self.coefficients)} for {len(self.terms)} terms.")
        # Parsed once: predict() is called inside the planner's search loops.
        object.__setattr__(self, "_parsed", tuple(parse_term(t) for t in self.terms))

    def predict(self, features: Mapping[str, float]) -> float:
        """Evaluate the law at ``features`` (a mapping from feature name to value).

        Args:
            features: values for every name the terms use; extra names are ignored.
        """
        return sum(c * _evaluate(f, features) for c, f in zip(self.coefficients, self._parsed))

    def max_relative_error(self, samples: Iterable[Sample]) -> float:
        """Largest ``|predict(x) - y| / |y|`` over ``samples`` (pairs of features and value)."""
        return max((abs(self.predict(x) - y) / max(abs(y), 1e-300) for x, y in samples),
                   default=0.0)

    def extrapolates(self, features: Mapping[str, float]) -> bool:
        """Whether any feature lies outside the range the law was fitted on."""
        return any(not lo <= features.get(name, lo) <= hi
                   for name, (lo, hi) in self.feature_ranges.items())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` inverts it."""
        return {"terms": list(self.terms), "coefficients": list(self.coefficients),
                "max_rel_residual": self.max_rel_residual,
                "holdout_max_rel_residual": self.holdout_max_rel_residual,
                "feature_ranges": {k: list(v) for k, v in self.feature_ranges.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScalingLaw:
        """Rebuild a law from :meth:`to_dict` output."""
        return cls(terms=tuple(data["terms"]),
                   coefficients=tuple(float(c) for c in data["coefficients"]),
                   max_rel_residual=float(data.get("max_rel_residual", 0.0)),
                   holdout_max_rel_residual=data.get("holdout_max_rel_residual"),
                   feature_ranges={k: (float(v[0]), float(v[1]))
                                   for k, v in data.get("feature_ranges", {}).items()})


def fit_scaling_law(samples: Sequence[Sample], terms: Sequence[str], *,
                    holdout: Sequence[Sample] = (), relative: bool = True) -> ScalingLaw:
    """Least-squares fit of ``value ~ sum(coef * term(features))``.

    Args:
        samples: ``(features, value)`` pairs, e.g. ``({"n": 16, "hw": 40 * 64}, peak_bytes)``;
            at least as many as there are terms, varied enough to separate them.
        terms: term strings such as ``["1", "n*hw", "n*hw^2"]`` (see :func:`parse_term`).
        holdout: extra pairs not used for fitting; their worst relative error is recorded.
        relative: minimise relative residuals (rows weighted by ``1/|value|``); False minimises
            absolute residuals.

    Example::

        law = fit_scaling_law(samples, ["1", "n*hw", "n*hw^2"])
        law.predict({"n": 16, "hw": 72 * 128})
    """
    if not terms:
        raise ValueError("`terms` is empty; give at least one term such as '1' or 'n*hw'.")
    if len(samples) < len(terms):
        raise ValueError(f"`samples` has {len(samples)} entries for {len(terms)} terms; trace "
                         "at least as many shapes as there are terms.")
    parsed = [parse_term(t) for t in terms]
    design = np.array([[_evaluate(f, x) for f in parsed] for x, _ in samples], dtype=np.float64)
    target = np.array([y for _, y in samples], dtype=np.float64)
    weights = 1.0 / np.maximum(np.abs(target), 1e-300) if relative else np.ones_like(target)
    scale = np.max(np.abs(design), axis=0)
    scale[scale == 0] = 1.0
    solution, _, rank, _ = np.linalg.lstsq(design * weights[:, None] / scale, target * weights,
                                           rcond=None)
    if rank < len(terms):
        logger.warning("scaling fit is rank deficient (%d of %d terms separable); vary the "
                       "sampled shapes more", rank, len(terms))
    names = {name for f in parsed for name, _ in f}
    ranges = {n: (min(float(x[n]) for x, _ in samples), max(float(x[n]) for x, _ in samples))
              for n in sorted(names)}
    law = ScalingLaw(tuple(terms), tuple(float(c) for c in solution / scale),
                     feature_ranges=ranges)
    fit_err = law.max_relative_error(samples)
    hold_err = law.max_relative_error(holdout) if holdout else None
    return dataclasses.replace(law, max_rel_residual=fit_err, holdout_max_rel_residual=hold_err)
