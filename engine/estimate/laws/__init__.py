"""Laws fitted to traces and the one disk cache they live in.

``scaling`` (least-squares laws over named features), ``monomials`` (exact per-allocation
monomial laws from two traces), ``cache`` (:class:`FitCache`, one :data:`SCHEMA_VERSION`).
"""
from __future__ import annotations

from .cache import (SCHEMA_VERSION, CachedFit, FitCache, architecture_hash, code_digest,
                    default_cache_dir, torch_version)
from .scaling import ScalingLaw, fit_scaling_law

__all__ = ["SCHEMA_VERSION", "CachedFit", "FitCache", "ScalingLaw", "architecture_hash",
           "code_digest", "default_cache_dir", "fit_scaling_law", "torch_version"]
