"""The UNet step and its conditioning encoders (CLIP text, CLIP image + resampler): the non-VAE
stages, as monomial laws fitted from two fake traces per family.

``estimator`` (:class:`StageEstimator`, the public model), ``fits`` (tracing and fitting one
family, cache keys), ``modules`` (building the stages' modules on meta, precision and attention
families), ``weights`` (weight bytes per component and precision).
"""
from __future__ import annotations

from .estimator import STAGES, StageEstimate, StageEstimator, component_weight_bytes

__all__ = ["STAGES", "StageEstimate", "StageEstimator", "component_weight_bytes"]
