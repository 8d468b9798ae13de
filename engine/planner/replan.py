"""The planner's predictions for a run that re-plans: what one stage would need under other settings.

The runtime (:func:`engine.runtime.recovery.choose_rung`) asks this when a stage ran out of memory
or memory was taken since planning: the same estimators and stage costs the plan was chosen with
(:func:`engine.planner.search.evaluate`), for the plan's workload and device, in-process and
cached (no tracing once the plan exists: its fits are loaded).
"""
from __future__ import annotations

import functools

from ..plan.settings import Settings
from .search import evaluate

_NO_LIMIT = 1 << 62  # the settings are concrete: the budget only names what would not fit


def stage_predictor(spec, plan):
    """``predict(stage, settings) -> bytes``: the stage's predicted peak for ``plan``'s workload and
    device under ``settings``, without the CUDA context (memory the run's own allocations need)."""
    from .estimators import Estimators

    est = Estimators.for_spec(spec, plan.device)

    @functools.lru_cache(maxsize=64)
    def predict(stage: str, settings: Settings) -> int:
        _, stages, _ = evaluate(settings, plan.workload, plan.device, _NO_LIMIT, est, None)
        predicted = next(s for s in stages if s.name == stage)
        return predicted.peak_bytes - predicted.terms.get("cuda_context", 0)

    return predict
