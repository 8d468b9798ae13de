"""engine: adaptive, memory-aware inference for DynamiCrafter-class image-to-video models.

For tools that embed the engine, one object loads, plans and generates (``docs/api.md``)::

    from engine import Pipeline

    pipe = Pipeline.from_config("512", "model.ckpt")          # cuda if available, else cpu
    out = pipe("cat.png", "a cat", callback_on_step_end=None) # plans for the device, cached per workload
    out.save("cat.mp4")                                       # + cat.mp4.json: prompt, seed, config, plan

The pieces underneath (imported lazily, so ``import engine`` is cheap)::

    from engine import load_spec, load_model, make_plan, catalog_device, generate, GenerateOptions

    spec = load_spec("512")                                   # or a DynamiCrafter YAML path
    plan = make_plan(spec, 320, 512, 16, catalog_device("rtx-4060-laptop"))
    print(plan.explain())                                     # or plan.to_json()
    model = load_model("512", "model.ckpt", device="cuda")
    video = generate(model, GenerateOptions(image="cat.png", prompt="a cat"), plan).video
    # [T, 3, H, W] in [-1, 1]; the plan's device kind (cuda) is where it runs

The memory-aware pieces also work on someone else's modules: ``apply_autoencode_policy`` /
``decode_frames`` / ``encode_frames`` on any VAE with ``encode``/``decode``, ``VAEMemoryModel``
to predict a VAE's peak, ``apply_offload`` on any container, ``trace_call`` on any call; and a diffusers
``StableVideoDiffusionPipeline`` is planned from traces of its own modules (``docs/svd.md``)::

    plan = plan_svd(svd_pipe, height=576, width=1024, num_frames=14, max_memory="12GiB")
    frames = svd_pipe(image, **apply_svd_plan(svd_pipe, plan)).frames
"""
import importlib
import logging

logging.getLogger("engine").addHandler(logging.NullHandler())  # a library logs; the application shows it

__version__ = "0.1.0"

_EXPORTS = {
    "load_spec": "engine.config", "ModelSpec": "engine.config",
    "load_model": "engine.pipeline.loading",
    "Pipeline": "engine.pipeline.pipe", "VideoOutput": "engine.pipeline.pipe",
    "generate": "engine.pipeline.generate", "GenerateResult": "engine.pipeline.generate",
    "GenerateOptions": "engine.pipeline.options",
    "make_plan": "engine.planner.search", "Plan": "engine.plan.plan", "Workload": "engine.plan.plan",
    "Settings": "engine.plan.settings", "Precision": "engine.plan.settings",
    "Offload": "engine.plan.settings", "CFGMode": "engine.plan.settings",
    "Attention": "engine.plan.settings", "STAGES": "engine.plan.stages",
    "EngineError": "engine.errors", "InvalidArgument": "engine.errors", "WrongType": "engine.errors",
    "PlanMismatch": "engine.errors", "DoesNotFit": "engine.errors",
    "release_model": "engine.runtime.residency",
    "catalog_device": "engine.device.spec", "vram_device": "engine.device.spec",
    "DeviceSpec": "engine.device.spec", "probe_device": "engine.device",
    "AEMode": "engine.plan.aemode", "apply_autoencode_policy": "engine.runtime.autoencode",
    "remove_autoencode_policy": "engine.runtime.autoencode",
    "decode_frames": "engine.runtime.autoencode", "encode_frames": "engine.runtime.autoencode",
    "apply_offload": "engine.runtime.offload", "remove_offload": "engine.runtime.offload",
    "set_attention_backend": "engine.runtime.attention",
    "VAEMemoryModel": "engine.estimate.vae.memory", "StageEstimator": "engine.estimate.unet.estimator",
    "trace_call": "engine.estimate.tracing.trace",
    "plan_svd": "engine.integrations.svd.plan", "SVDPlan": "engine.integrations.svd.plan",
    "SVDSettings": "engine.integrations.svd.settings",
    "apply_svd_plan": "engine.integrations.svd.apply", "remove_svd_plan": "engine.integrations.svd.apply",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
