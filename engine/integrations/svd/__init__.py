"""Plan and apply memory settings for a diffusers ``StableVideoDiffusionPipeline`` (docs/svd.md).

``settings`` (torch-free vocabulary and the stage table), ``inputs`` (argument checks, before any
tracing), ``estimate`` (per-stage traces of the pipeline's own modules on meta twins), ``plan``
(``plan_svd``, ``SVDPlan``), ``apply`` (``apply_svd_plan``, ``remove_svd_plan``).
"""
