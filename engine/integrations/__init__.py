"""Planning other people's pipelines: memory settings for third-party (diffusers) pipelines.

``svd/``: ``StableVideoDiffusionPipeline`` (``docs/svd.md``). Each integration traces the
pipeline's own modules on meta-device twins (``engine.estimate.tracing``), searches the settings
the pipeline itself offers and applies them removably.
"""
